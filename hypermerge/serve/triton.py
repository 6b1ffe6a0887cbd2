"""A Triton Inference Server model repository from an exported directory.

    REPO/NAME/config.pbtxt        backend "onnxruntime", dynamic batching, the graph's inputs/outputs
    REPO/NAME/1/model.onnx        (+ model.onnx.data): hard links where possible, else copies
    REPO/NAME/labels.txt          sequence-classification: label names, in logit order

The inputs and outputs are read from the ONNX graph itself (names, element types, shapes), so the
config states exactly the I/O contract of ``hypermerge export``: the batch axis becomes Triton's
implicit batch dimension (``max_batch_size`` > 0, dims without it), every other dynamic axis is -1.

Triton batches only requests whose tensors have equal shapes: clients pad token ids to a common
length (e.g. a fixed 128) to let the dynamic batcher merge them. Tokenization stays on the client
(the export directory's tokenizer); a causal LM's KV cache is passed in and out by the client
(``past_*`` / ``present_*``), one request per step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

from hypermerge._fs import atomic_output_dir, require_dir
from hypermerge.errors import BackendUnavailableError, ConfigError, ExportError
from hypermerge.runtime.contract import SEQUENCE_CLASSIFICATION, contract_from_onnx
from hypermerge.runtime.model import MODEL_FILE

# onnx.TensorProto element type -> Triton DataType (model_config.proto)
TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
                6: "TYPE_INT32", 7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16",
                11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}
KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass
class TritonResult:
    """What :func:`write_triton_repo` wrote."""

    repo: Path
    model_dir: Path
    config: Path
    files: list[str]
    linked: bool  # model files hard-linked (True) or copied


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: tuple[int, ...]  # without the batch axis when the model batches


def _tensor_specs(values, batched: bool) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in TRITON_TYPES:
            raise ExportError(f"the graph's {value.name!r} has an element type Triton has no name for "
                              f"({tensor_type.elem_type})")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        specs.append(TensorSpec(value.name, TRITON_TYPES[tensor_type.elem_type], dims[1:] if batched else dims))
    return specs


def graph_io(model_file: Path) -> tuple[list, list]:
    """The ONNX graph's inputs and outputs (``onnx.ValueInfoProto``), read without the weights.

    Raises:
        BackendUnavailableError: the onnx package is missing.
        ExportError: the file is not a readable ONNX model.
    """
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError("writing a Triton repository needs the onnx package",
                                      hint="pip install 'hypermerge[export]'") from None
    try:
        graph = onnx.load(str(model_file), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and others
        raise ExportError(f"cannot read the ONNX model ({exc})", path=model_file,
                          hint="re-export it with hypermerge export") from exc
    initializers = {init.name for init in graph.initializer}
    return [i for i in graph.input if i.name not in initializers], list(graph.output)


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def render_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], *, max_batch: int,
                  max_queue_delay_us: int, instances: int, kind: str, model_file: str,
                  label_output: str | None = None) -> str:
    """config.pbtxt text (protobuf text format of Triton's ``ModelConfig``)."""
    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch}",
             f'default_model_filename: "{model_file}"', "input ["]
    lines += [",\n".join(f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: {_dims(t.dims)}\n  }}'
                         for t in inputs)]
    lines += ["]", "output ["]
    blocks = []
    for t in outputs:
        label = '\n    label_filename: "labels.txt"' if t.name == label_output else ""
        blocks.append(f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: {_dims(t.dims)}{label}\n  }}')
    lines += [",\n".join(blocks), "]"]
    if max_batch > 0:
        preferred = [b for b in (4, 8, 16, 32, 64) if b <= max_batch] or [max_batch]
        lines += ["dynamic_batching {", f"  preferred_batch_size: {_dims(tuple(preferred))}",
                  f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}"]
    lines += ["instance_group [", "  {", f"    count: {instances}", f"    kind: {KINDS[kind]}", "  }", "]"]
    return "\n".join(lines) + "\n"


def _link_or_copy(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
        return True
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)
        return False


def write_triton_repo(export_dir: str | Path, repo: str | Path, *, name: str | None = None, max_batch: int = 32,
                      max_queue_delay_us: int = 2000, instances: int = 1, kind: str = "auto",
                      model_file: str = MODEL_FILE, overwrite: bool = False) -> TritonResult:
    """Write ``repo/name`` (config.pbtxt, version 1 with the ONNX model) for Triton's onnxruntime backend.

    Other models already in ``repo`` are left alone; ``repo/name`` itself is written atomically.

    Args:
        export_dir: a directory written by ``hypermerge export``.
        repo: the model repository (created if missing).
        name: the model's name in the repository (default: the export directory's name).
        max_batch: Triton's ``max_batch_size`` (0: no batching, the batch axis stays in dims).
        max_queue_delay_us: the dynamic batcher's wait for more requests.
        instances: model instances (``instance_group.count``).
        kind: auto, cpu or gpu (``instance_group.kind``).
        model_file: model.onnx, or model.int8.onnx where the export kept one.
        overwrite: replace an existing ``repo/name``.

    Raises:
        ConfigError: an invalid name or setting.
        ExportError: the export has no such model file, or its I/O is not a hypermerge contract.
        OutputExistsError: ``repo/name`` exists and not ``overwrite``.
    """
    export_dir = require_dir(export_dir, "exported model directory").absolute()
    name = name or export_dir.name
    problems = _setting_problems(name, max_batch, max_queue_delay_us, instances, kind)
    if problems:
        raise ConfigError("; ".join(problems))
    source = export_dir / model_file
    if not source.is_file():
        raise ExportError(f"no {model_file} in the exported directory", path=export_dir,
                          hint="export it first with hypermerge export")
    inputs, outputs = graph_io(source)
    contract = contract_from_onnx([i.name for i in inputs], [o.name for o in outputs])
    batched = max_batch > 0 and _batch_axis_first(inputs + outputs)
    labels = _labels(export_dir) if contract.task == SEQUENCE_CLASSIFICATION else []
    text = render_config(name, _tensor_specs(inputs, batched), _tensor_specs(outputs, batched),
                         max_batch=max_batch if batched else 0, max_queue_delay_us=max_queue_delay_us,
                         instances=instances, kind=kind, model_file=MODEL_FILE,
                         label_output="logits" if labels else None)
    repo = Path(repo).absolute()
    model_dir = repo / name
    files, linked = _write_model_dir(model_dir, text, source, labels, overwrite)
    return TritonResult(repo, model_dir, model_dir / "config.pbtxt", files, linked)


def _setting_problems(name: str, max_batch: int, max_queue_delay_us: int, instances: int, kind: str) -> list[str]:
    """Every invalid setting of :func:`write_triton_repo`, as messages."""
    problems = []
    if not _NAME.match(name):
        problems.append(f"model name {name!r} must be letters, digits, '_', '-' or '.'")
    if max_batch < 0:
        problems.append(f"max_batch must be ≥ 0 (got {max_batch})")
    if instances < 1:
        problems.append(f"instances must be ≥ 1 (got {instances})")
    if kind not in KINDS:
        problems.append(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    if max_queue_delay_us < 0:
        problems.append(f"max_queue_delay_us must be ≥ 0 (got {max_queue_delay_us})")
    return problems


def _batch_axis_first(values: list) -> bool:
    """Whether every tensor's first axis is dynamic: Triton's batch axis is implicit, so only then."""
    return all(len(v.type.tensor_type.shape.dim) > 0 and not v.type.tensor_type.shape.dim[0].HasField("dim_value")
               for v in values)


def _labels(export_dir: Path) -> list[str]:
    """The label names of a classifier export, in logit order (empty: its config names none)."""
    config_json = export_dir / "config.json"
    config = json.loads(config_json.read_text()) if config_json.exists() else {}
    if not config.get("id2label"):
        return []
    id2label = {int(k): v for k, v in config["id2label"].items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(max(id2label) + 1)]


def _write_model_dir(model_dir: Path, config_text: str, source: Path, labels: list[str],
                     overwrite: bool) -> tuple[list[str], bool]:
    """Write ``model_dir`` atomically; return its files and whether the model files were hard-linked."""
    linked = True
    with atomic_output_dir(model_dir, overwrite=overwrite) as tmp:
        (tmp / "config.pbtxt").write_text(config_text)
        version = tmp / "1"
        version.mkdir()
        # the graph names its external weights file; it keeps its name, the graph becomes model.onnx
        linked &= _link_or_copy(source, version / MODEL_FILE)
        for suffix in (".data", "_data"):
            for data in sorted(source.parent.glob(f"{source.name}{suffix}")):
                linked &= _link_or_copy(data, version / data.name)
        if labels:
            (tmp / "labels.txt").write_text("\n".join(labels) + "\n")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return files, linked

"""The ONNX I/O contract of each task: the names a graph takes and gives. The names are a contract
other tools rely on (they match Optimum's for encoders; causal LMs use flat ``past_key_{i}`` /
``past_value_{i}`` inputs and ``present_*`` outputs). The runtime reads a graph's task back from
them (:func:`contract_from_onnx`); the exporter (:mod:`hypermerge.export.tasks`) writes them."""

from __future__ import annotations

import dataclasses

from hypermerge.errors import ExportError

FEATURE_EXTRACTION = "feature-extraction"
SEQUENCE_CLASSIFICATION = "sequence-classification"
CAUSAL_LM = "causal-lm"
TASKS = (FEATURE_EXTRACTION, SEQUENCE_CLASSIFICATION, CAUSAL_LM)

# Names of the dynamic axes in the ONNX graph (Optimum's spelling, so tools that key on them work).
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"


@dataclasses.dataclass(frozen=True)
class IOContract:
    """The ONNX graph's inputs and outputs for one task.

    ``kv_heads``, ``head_dim`` and ``num_layers`` are set for causal LMs only: the past tensors are
    (batch, kv_heads, past_len, head_dim) per layer.
    """

    task: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0

    @property
    def past_names(self) -> tuple[str, ...]:
        return tuple(name for name in self.inputs if name.startswith("past_"))

    @property
    def present_names(self) -> tuple[str, ...]:
        return tuple(name for name in self.outputs if name.startswith("present_"))


def past_names(num_layers: int) -> list[str]:
    """``past_key_0, past_value_0, past_key_1, ...`` (the order the graph takes them in)."""
    return [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def contract_from_onnx(input_names: list[str], output_names: list[str], past_shape: list | None = None) -> IOContract:
    """Recover the contract from an ONNX graph's names (so any exported dir can be read without its report).

    Raises:
        ExportError: the names match no task's contract.
    """
    inputs, outputs = tuple(input_names), tuple(output_names)
    if "logits" in outputs and any(name.startswith("present_key_") for name in outputs):
        layers = sum(1 for name in inputs if name.startswith("past_key_"))
        kv_heads = past_shape[1] if past_shape and isinstance(past_shape[1], int) else 0
        head_dim = past_shape[3] if past_shape and isinstance(past_shape[3], int) else 0
        return IOContract(CAUSAL_LM, inputs, outputs, layers, kv_heads, head_dim)
    if outputs and outputs[0] == "last_hidden_state":
        return IOContract(FEATURE_EXTRACTION, inputs, outputs)
    if outputs and outputs[0] == "logits":
        return IOContract(SEQUENCE_CLASSIFICATION, inputs, outputs)
    raise ExportError(f"the ONNX graph's outputs {list(outputs)} match no hypermerge task",
                      hint="export it with hypermerge export")

"""PyTorch -> ONNX for each task, with ``torch.onnx.export(dynamo=True)``.

Each task gets a small wrapper module whose forward takes and returns plain tensors in the
contract's order (:mod:`hypermerge.export.tasks`). The causal-LM wrapper takes the KV cache as
flat ``past_key_{i}`` / ``past_value_{i}`` tensors and rebuilds a ``DynamicCache`` inside the graph:
transformers 5.x rejects tuple caches, and flat tensors are what ONNX runtimes can feed. One graph
serves prefill (past length 0) and decode (sequence length 1).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from hypermerge.errors import ExportError
from hypermerge.export.tasks import (
    BATCH,
    CAUSAL_LM,
    FEATURE_EXTRACTION,
    PAST,
    SEQUENCE,
    SEQUENCE_CLASSIFICATION,
    TOTAL,
    IOContract,
    past_names,
    present_names,
)
from hypermerge.fold.engine import check_finite_weights
from hypermerge.fold.hfdir import open_base

DEFAULT_OPSET = 18
# protobuf cannot hold a model over 2 GiB: above this the weights go to model.onnx.data
EXTERNAL_DATA_BYTES = 1536 * 2**20


def load_torch_model(model_dir: str | Path, task: str) -> torch.nn.Module:
    """The PyTorch model for ``task`` from a HF directory, float32, eval mode (the parity reference).

    Raises:
        CheckpointError: no safetensors weights (pickle weights are refused), NaN or Inf in a weight.
        ExportError: transformers cannot build the model for this task.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    base = open_base(model_dir)  # safetensors only, with a clear error otherwise
    auto = {FEATURE_EXTRACTION: AutoModel, SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
            CAUSAL_LM: AutoModelForCausalLM}[task]
    try:
        with _quiet():
            # eager attention: SDPA's export adds a NaN guard after every softmax and a gathered 4-D mask,
            # which made MiniLM ~10% slower on onnxruntime (CPU, b8×s64) than the same model with eager
            # attention; the two agree to fp32 rounding
            model = auto.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                         attn_implementation="eager")
    except (ValueError, KeyError, OSError) as exc:
        raise ExportError(f"transformers cannot load this model for {task} ({str(exc).splitlines()[0]})",
                          path=model_dir, hint="check --task, or that the directory is a complete HF model") from exc
    check_finite_weights(model, base)  # a NaN weight exports fine and poisons every output
    return model.eval()


class EncoderWrapper(torch.nn.Module):
    """input_ids, attention_mask[, token_type_ids] -> last_hidden_state or logits."""

    def __init__(self, model: torch.nn.Module, output: str, token_type_ids: bool):
        super().__init__()
        self.model, self.output, self.token_type_ids = model, output, token_type_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if self.token_type_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return getattr(out, self.output)


class CausalLMWrapper(torch.nn.Module):
    """input_ids, attention_mask (past + new), position_ids, past_key_0, past_value_0, ...
    -> logits, present_key_0, present_value_0, ..."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        self.model, self.num_layers = model, num_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)],
                             config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def position_ids_for(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Positions of the last ``new_tokens`` columns, counting only valid tokens (as HF generate does):
    left padding does not shift a row's positions."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -new_tokens:]


def cache_geometry(model: torch.nn.Module) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a causal LM's KV cache, read from one tiny forward
    (robust to GQA, GPT-2's fused heads and explicit head_dim configs)."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    layers = out.past_key_values.layers
    batch, kv_heads, _, head_dim = layers[0].keys.shape
    return len(layers), int(kv_heads), int(head_dim)


def wrap(model: torch.nn.Module, task: str) -> tuple[torch.nn.Module, IOContract]:
    """The export wrapper for ``task`` and its I/O contract."""
    if task == CAUSAL_LM:
        layers, kv_heads, head_dim = cache_geometry(model)
        contract = IOContract(task, ("input_ids", "attention_mask", "position_ids", *past_names(layers)),
                              ("logits", *present_names(layers)), layers, kv_heads, head_dim)
        return CausalLMWrapper(model, layers).eval(), contract
    has_types = "token_type_ids" in inspect.signature(model.forward).parameters
    inputs = ("input_ids", "attention_mask", *(("token_type_ids",) if has_types else ()))
    output = "last_hidden_state" if task == FEATURE_EXTRACTION else "logits"
    return EncoderWrapper(model, output, has_types).eval(), IOContract(task, inputs, (output,))


def example_inputs(contract: IOContract, vocab_size: int, batch: int = 2, seq: int = 5,
                   past: int = 0, left_pad: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs in the contract's layout: row 0 has ``left_pad`` padded positions (causal LMs
    pad on the left; encoders on the right, as their tokenizers do)."""
    generator = torch.Generator().manual_seed(seed)
    feeds: dict[str, torch.Tensor] = {"input_ids": torch.randint(0, vocab_size, (batch, seq), generator=generator)}
    if contract.task == CAUSAL_LM:
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        mask[0, :left_pad] = 0
        feeds["attention_mask"] = mask
        feeds["position_ids"] = position_ids_for(mask, seq)
        for name in contract.past_names:
            feeds[name] = torch.randn(batch, contract.kv_heads, past, contract.head_dim, generator=generator)
        return feeds
    mask = torch.ones(batch, seq, dtype=torch.long)
    if left_pad:
        mask[0, seq - left_pad:] = 0
    feeds["attention_mask"] = mask
    if "token_type_ids" in contract.inputs:
        feeds["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return feeds


def call_wrapper(wrapper: torch.nn.Module, contract: IOContract, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run the wrapper on contract-named inputs; returns outputs in the contract's order."""
    with torch.no_grad():
        if contract.task == CAUSAL_LM:
            # the cache appends to the tensors it is given: pass copies so ``feeds`` stays as it was
            past = tuple(feeds[name].clone() for name in contract.past_names)
            out = wrapper(feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"], past)
            return list(out)
        out = wrapper(*(feeds[name] for name in contract.inputs))
        return [out]


def _dynamic_shapes(contract: IOContract):
    from torch.export import Dim

    batch, seq = Dim(BATCH, min=1, max=4096), Dim(SEQUENCE, min=1, max=65536)
    if contract.task != CAUSAL_LM:
        return tuple({0: batch, 1: seq} for _ in contract.inputs)
    # the mask spans past + new tokens; torch.export cannot express a sum of two Dims as an input
    # axis, so it gets its own (the graph's shapes still tie them together)
    total, past = Dim(TOTAL, min=1, max=131072), Dim(PAST, min=0, max=131072)
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
            tuple({0: batch, 2: past} for _ in contract.past_names))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and transformers' chatter (warnings about optional torchvision ops...)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export",
                                                     "onnxscript", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with ours
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _summary(exc: BaseException) -> str:
    """The informative line of an exporter error (its message starts with generic advice)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if line.startswith("<class '"):
            return line[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


def export_onnx(model: torch.nn.Module, task: str, path: Path, *, opset: int = DEFAULT_OPSET,
                external_data: bool | None = None, scales=None) -> IOContract:
    """Export ``model`` for ``task`` to ``path`` (plus ``path.data`` for external weights).

    Args:
        external_data: store weights in ``model.onnx.data``; None decides by size (needed above 2 GiB).
        scales: a :class:`~hypermerge.export.adapter_inputs.ScaleInputs` attached to ``model``
            (``--adapter-inputs``): the graph gets its packed input last, with a default of ones.

    Returns:
        The I/O contract the graph follows.

    Raises:
        ExportError: torch.export or the ONNX translation failed (the first line of its error is quoted).
    """
    wrapper, contract = wrap(model, task)
    vocab = int(model.config.get_text_config().vocab_size)
    if task == CAUSAL_LM:
        # past > 0 and a padded row, so no axis is specialised to a constant while tracing
        feeds = example_inputs(contract, vocab, batch=2, seq=3, past=4, left_pad=2)
        args = (feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"],
                tuple(feeds[name] for name in contract.past_names))
    else:
        feeds = example_inputs(contract, vocab, batch=2, seq=8, left_pad=3)
        args = tuple(feeds[name] for name in contract.inputs)
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    input_names, dynamic_shapes = list(contract.inputs), _dynamic_shapes(contract)
    if scales is not None:  # one more input, of a fixed size
        wrapper, args = scales.wrap(wrapper, len(args)), (*args, scales.example())
        input_names, dynamic_shapes = [*input_names, scales.layout.input], (*dynamic_shapes, None)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                        input_names=input_names, output_names=list(contract.outputs),
                                        dynamic_shapes=dynamic_shapes, verbose=False,
                                        report=False)
    except Exception as exc:  # the exporter raises many types; all mean the same thing to the user
        raise ExportError(f"torch.onnx.export failed for {task} ({_summary(exc)})",
                          hint="run with --debug for the exporter's full log; try another --opset") from exc
    program.model.metadata_props.update({"hypermerge.task": task, "hypermerge.num_layers": str(contract.num_layers)})
    if scales is not None:
        scales.set(None)  # tracing left a traced tensor there; the PyTorch model is the base again
        scales.add_default(program.model)
    program.save(str(path), external_data=external_data)
    return contract


def hf_tokenizer(path: Path):
    """The directory's transformers tokenizer (the PyTorch reference's), or None when it has none."""
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)

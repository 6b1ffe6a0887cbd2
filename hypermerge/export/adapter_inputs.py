"""``hypermerge export --adapter-inputs``: HyperAdapt's row and column scales as a graph input.
This module is the export side (the PyTorch layers that read the input, the ONNX default, the parity
section); the layout and the adapter -> vector conversion a running model needs are
:mod:`hypermerge.runtime.adapter_scales` (re-exported here).

HyperAdapt adapts a frozen ``W`` (out x in) as ``diag(a) · W · diag(b)``: ``out + in`` values per
matrix. Instead of folding them into the weights, the graph computes ``y = a ⊙ (W (b ⊙ x)) + c``
with ``a`` and ``b`` read from an input, so one exported model (one engine in memory) serves any
number of HyperAdapt adapters chosen per request, and the identity scales give the base model.

**One packed input, not one per matrix.** all-MiniLM-L6-v2 has 36 adapted matrices (72 vectors),
SmolLM2-135M 210 (420 vectors). The graph takes them as one float32 vector ``adapter_scales`` whose
layout (offset and length of every ``a`` and ``b``) is in ``adapter_inputs.json`` and in the model's
metadata; constant ``Slice`` nodes cut it up inside the graph. A client feeds one array instead of
hundreds, building it is one ``np.ones`` plus a copy per matrix, and a new adapter is a new vector,
not a new set of bindings. The input has a default of ones (an initializer of the same name, which
onnxruntime lets a feed override), so a client that knows nothing about adapters gets the base model.

Which adapters fit: HyperAdapt, and IA³ where it is a diagonal scaling the graph can express
(``l_in`` is ``b``; ``l_out`` is ``a`` for a weight without a bias: IA³ also scales the bias, which
the graph keeps as it is). Anything else (LoRA's low-rank update, DoRA's norm, a new head) changes
the weights themselves: fold it into a copy of the export with ``hypermerge patch``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hypermerge.adapters.base import is_conv1d
from hypermerge.adapters.hyperadapt import HyperAdaptConfig, HyperAdaptLayer
from hypermerge.adapters.targets import select_targets
from hypermerge.errors import ParityError
from hypermerge.export.parity import check_parity, failure_summary

# the layout and the adapter -> vector conversion are the runtime's (numpy); re-exported here
from hypermerge.runtime.adapter_scales import (  # noqa: F401
    DIAGONAL_METHODS,
    FORMAT,
    INPUT_NAME,
    LAYOUT_FILE,
    METADATA_KEY,
    AdapterScalesCache,
    ScaleEntry,
    ScaleLayout,
    read_layout,
    scales_from_adapter,
)

# -- the graph side -----------------------------------------------------------------------------

class _ScaleSource:
    """Holds the packed scales for the current forward. The export wrapper sets it from its input;
    each layer slices its own ``a`` and ``b`` out of it. A plain object, not a module: torch.export
    traces through Python attribute reads but refuses tensor attributes assigned to modules."""

    def __init__(self, size: int):
        self.scales = torch.ones(size)


class InputScaledLayer(HyperAdaptLayer):
    """HyperAdapt's layer with ``a`` and ``b`` read from the packed input instead of parameters;
    the forward (``y = a ⊙ (W (b ⊙ x)) + c``) is HyperAdaptLayer's own."""

    def __init__(self, base_layer: nn.Module, weight_name: str, source: _ScaleSource, entry: ScaleEntry):
        # AdapterLayer's __init__ only: HyperAdaptLayer's would create the parameters
        super(HyperAdaptLayer, self).__init__(base_layer, HyperAdaptConfig(), weight_name)
        self._source, self._entry = source, entry

    @property
    def a(self) -> torch.Tensor:  # (out,)
        return self._source.scales[self._entry.a_offset:self._entry.a_offset + self._entry.out_features]

    @property
    def b(self) -> torch.Tensor:  # (in,)
        return self._source.scales[self._entry.b_offset:self._entry.b_offset + self._entry.in_features]

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"a": self.a, "b": self.b}


class _ScaledWrapper(nn.Module):
    """The task wrapper with one more input, the packed scales, taken last. torch.export needs a
    fixed signature (``*args`` counts as one input), hence one subclass per number of task inputs."""

    def __init__(self, inner: nn.Module, source: _ScaleSource):
        super().__init__()
        self.inner, self._source = inner, source

    def _call(self, scales: torch.Tensor, *model_args):
        self._source.scales = scales
        return self.inner(*model_args)


class _Scaled2(_ScaledWrapper):  # input_ids, attention_mask
    def forward(self, a, b, adapter_scales):
        return self._call(adapter_scales, a, b)


class _Scaled3(_ScaledWrapper):  # + token_type_ids
    def forward(self, a, b, c, adapter_scales):
        return self._call(adapter_scales, a, b, c)


class _Scaled4(_ScaledWrapper):  # causal LMs: input_ids, attention_mask, position_ids, (past...)
    def forward(self, a, b, c, d, adapter_scales):
        return self._call(adapter_scales, a, b, c, d)


_SCALED = {2: _Scaled2, 3: _Scaled3, 4: _Scaled4}


class ScaleInputs:
    """The packed-scales input of one model: made by :meth:`attach`, used by ``export_onnx``."""

    def __init__(self, layout: ScaleLayout, source: _ScaleSource):
        self.layout, self._source = layout, source

    @classmethod
    def attach(cls, model: nn.Module, target_modules=None) -> ScaleInputs:
        """Wrap HyperAdapt's targets of ``model`` (every linear layer of its transformer blocks by
        default) in place, with scales read from the packed input.

        Raises:
            ConfigError: no linear layer matched.
        """
        targets = select_targets(model, target_modules)
        entries, offset = [], 0
        for name, module in targets:
            weight = module.weight
            # GPT-2's Conv1D stores (in, out)
            out_features, in_features = (weight.shape[1], weight.shape[0]) if is_conv1d(module) else weight.shape
            entries.append(ScaleEntry(f"{name}.weight", offset, int(out_features), offset + int(out_features),
                                      int(in_features), module.bias is not None))
            offset += int(out_features) + int(in_features)
        layout = ScaleLayout(INPUT_NAME, offset, tuple(entries))
        source = _ScaleSource(offset)
        for (name, module), entry in zip(targets, entries, strict=True):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, InputScaledLayer(module, entry.weight, source, entry))
        return cls(layout, source)

    def set(self, scales: torch.Tensor | np.ndarray | None) -> None:
        """The scales the PyTorch model uses from now on (None: the identity)."""
        if scales is None:
            scales = torch.ones(self.layout.size)
        self._source.scales = torch.as_tensor(scales, dtype=torch.float32)

    def wrap(self, wrapper: nn.Module, arguments: int) -> nn.Module:
        """``wrapper`` (taking ``arguments`` positional inputs) with the packed scales as one more."""
        return _SCALED[arguments](wrapper, self._source)

    def example(self) -> torch.Tensor:
        return torch.ones(self.layout.size)

    def add_default(self, ir_model) -> None:
        """Give the graph input a default of ones and record the layout in the model's metadata."""
        import onnx_ir as ir

        value = next(v for v in ir_model.graph.inputs if v.name == self.layout.input)
        value.const_value = ir.tensor(self.layout.identity(), name=self.layout.input)
        ir_model.graph.register_initializer(value)
        ir_model.metadata_props[METADATA_KEY] = json.dumps(self.layout.to_dict(), separators=(",", ":"))

    def write(self, directory: Path) -> Path:
        path = Path(directory) / LAYOUT_FILE
        path.write_text(json.dumps(self.layout.to_dict(), indent=1) + "\n")
        return path

    def random(self, seed: int = 0, spread: float = 0.1) -> np.ndarray:
        """Scales near one, as a trained adapter holds (for the export's parity check)."""
        rng = np.random.default_rng(seed)
        return (1.0 + spread * rng.standard_normal(self.layout.size)).astype(np.float32)

    def runner(self, session, contract, scales: np.ndarray | None = None):
        """A runner (feeds -> outputs) that also feeds ``scales`` (random ones by default)."""
        names, fed = list(contract.outputs), self.random() if scales is None else scales
        return lambda feeds: session.run(names, {**feeds, self.layout.input: fed})


def scales_section(scales: ScaleInputs, session, contract, model: nn.Module, wrapper: nn.Module, *, verify: bool,
                   backend: str, tolerance, new_tokens: int, tokenizer) -> dict:
    """The report's ``adapter_inputs`` section; with ``verify``, parity with random scales (N(1, 0.1))
    against the PyTorch model computing HyperAdapt's forward with the same scales.

    Raises:
        ParityError: the graph does not follow the scales.
    """
    layout = scales.layout
    section = {"input": layout.input, "size": layout.size, "matrices": len(layout.entries), "file": LAYOUT_FILE,
               "default": "ones (the base model)", "methods": sorted(DIAGONAL_METHODS), "parity_random_scales": None}
    if not verify:
        return section
    vector = scales.random()
    scales.set(vector)
    try:
        parity = check_parity(scales.runner(session, contract, vector), model, wrapper, contract, backend=backend,
                              tolerance=tolerance, new_tokens=new_tokens, tokenizer=tokenizer)
    finally:
        scales.set(None)
    section["parity_random_scales"] = parity
    if not parity["passed"]:
        raise ParityError(f"with adapter scales fed, the ONNX model does not match PyTorch: {failure_summary(parity)}",
                          hint="run with --debug; export without --adapter-inputs meanwhile")
    return section

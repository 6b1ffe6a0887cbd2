"""``hypermerge export --adapter-inputs``: HyperAdapt's row and column scales as a graph input.

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

import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hypermerge.adapters.base import is_conv1d
from hypermerge.adapters.hyperadapt import HyperAdaptConfig, HyperAdaptLayer
from hypermerge.adapters.targets import match_suffix, select_targets
from hypermerge.errors import AdapterMismatchError, CheckpointError, ConfigError
from hypermerge.export.weights_map import WeightsMap, check_adapter_base

INPUT_NAME = "adapter_scales"
LAYOUT_FILE = "adapter_inputs.json"
FORMAT = "hypermerge-adapter-inputs"
METADATA_KEY = "hypermerge.adapter_inputs"


@dataclasses.dataclass(frozen=True)
class ScaleEntry:
    """Where one matrix's scales sit in the packed vector: ``a`` (out,) then ``b`` (in,)."""

    weight: str  # the base weight's name in the source checkpoint
    a_offset: int
    out_features: int
    b_offset: int
    in_features: int
    bias: bool  # whether the layer adds a bias after the scaling (IA³'s output scaling then cannot apply)


@dataclasses.dataclass(frozen=True)
class ScaleLayout:
    """The packed input's layout; ``adapter_inputs.json`` holds it."""

    input: str
    size: int
    entries: tuple[ScaleEntry, ...]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": 1, "input": self.input, "size": self.size, "dtype": "float32",
                "method": "hyperadapt", "forward": "y = a * (W @ (b * x)) + bias",
                "matrices": [dataclasses.asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, data: Mapping) -> ScaleLayout:
        entries = tuple(ScaleEntry(**e) for e in data["matrices"])
        return cls(str(data["input"]), int(data["size"]), entries)

    def identity(self) -> np.ndarray:
        return np.ones(self.size, dtype=np.float32)

    def by_weight(self) -> dict[str, ScaleEntry]:
        return {e.weight: e for e in self.entries}


def read_layout(export_dir: Path) -> ScaleLayout | None:
    """The layout of an export made with ``--adapter-inputs``, None for any other export.

    Raises:
        CheckpointError: the layout file is damaged.
    """
    path = Path(export_dir) / LAYOUT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return ScaleLayout.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{LAYOUT_FILE} is damaged ({exc})", path=path,
                              hint="re-export with hypermerge export --adapter-inputs") from exc


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
    from hypermerge.errors import ParityError
    from hypermerge.export.parity import check_parity, failure_summary

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


# -- the adapter side ----------------------------------------------------------------------------

def _hyperadapt(params: Mapping[str, torch.Tensor], entry: ScaleEntry) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return params["a"], params["b"]


def _ia3(params: Mapping[str, torch.Tensor], entry: ScaleEntry) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if "l_in" in params:
        return None, params["l_in"]
    if entry.bias:
        raise ConfigError(f"the IA³ adapter scales the output and the bias of {entry.weight}; the adapter inputs "
                          "scale the output before the bias is added, so they cannot carry it",
                          hint="fold it into a copy of the export with hypermerge patch")
    return params["l_out"], None


# method name -> (a, b) from the method's tensors for one matrix; None leaves that side at one
DIAGONAL_METHODS: dict[str, Callable] = {"hyperadapt": _hyperadapt, "ia3": _ia3}


def scales_from_adapter(layout: ScaleLayout, adapter: str | Path, weights_map: WeightsMap | None = None) -> np.ndarray:
    """The packed vector for an adapter checkpoint (hypermerge or PEFT), ones where it adapts nothing.

    Args:
        layout: the export's layout (``adapter_inputs.json``).
        adapter: the adapter directory.
        weights_map: the export's map; with it, an adapter whose recorded base model is a local
            directory is checked to be the export's base by content (see ``check_adapter_base``).

    Raises:
        CheckpointError: the adapter is missing or damaged, or holds NaN/Inf.
        ConfigError: the method's update is not a diagonal scaling (LoRA, DoRA...), or it trains
            whole modules: both need ``hypermerge patch``.
        AdapterMismatchError: it targets a matrix the export has no scales for, sizes differ, or
            its base model differs from the export's.
    """
    from hypermerge.adapters.checkpoint import read_adapter
    from hypermerge.fold.engine import all_finite

    checkpoint = read_adapter(adapter)
    method = checkpoint.method.name
    if method not in DIAGONAL_METHODS:
        raise ConfigError(f"a {method} adapter changes the weights themselves; the adapter inputs carry diagonal "
                          f"scalings only ({', '.join(DIAGONAL_METHODS)})", path=checkpoint.path,
                          hint="fold it into a copy of the export with hypermerge patch")
    if checkpoint.full_tensors():
        raise ConfigError(f"the adapter trains whole modules ({', '.join(sorted(checkpoint.full_tensors())[:3])}), "
                          "which the adapter inputs cannot carry", path=checkpoint.path,
                          hint="fold it into a copy of the export with hypermerge patch")
    entries = layout.by_weight()
    names = list(entries)
    matched = {}
    for target in checkpoint.targets:
        match = match_suffix(target, names)
        if match is None:
            raise AdapterMismatchError(f"the adapter adapts {target}, which this export has no scales for",
                                       path=checkpoint.path,
                                       hint="use an adapter made for this export's base model, or hypermerge patch")
        matched[target] = match
    if weights_map is not None:
        check_adapter_base(checkpoint, weights_map, list(matched.values()))
    vector = layout.identity()
    for target, match in matched.items():
        entry = entries[match]
        a, b = DIAGONAL_METHODS[method](checkpoint.layer_params(target), entry)
        for side, values, offset, size in (("a", a, entry.a_offset, entry.out_features),
                                           ("b", b, entry.b_offset, entry.in_features)):
            if values is None:
                continue
            if tuple(values.shape) != (size,):
                raise AdapterMismatchError(f"the adapter's {side} for {target} has shape {tuple(values.shape)}, the "
                                           f"export needs ({size},)", path=checkpoint.path,
                                           hint="the adapter was made for a model with other layer sizes")
            if not all_finite(values):
                raise CheckpointError(f"the adapter's {side} for {target} holds NaN or Inf", path=checkpoint.weights_path,
                                      hint="the adapter is corrupt or training diverged")
            vector[offset:offset + size] = values.float().numpy()
    return vector


class AdapterScalesCache:
    """Packed vectors by adapter directory, so a server resolves an adapter once, not per request.

    Keyed by the resolved path and the modification times of the adapter's two files: an adapter
    re-saved in place is read again. Least recently used entries are dropped beyond ``size``.
    Safe to share between threads.
    """

    def __init__(self, layout: ScaleLayout, size: int = 64, weights_map: WeightsMap | None = None):
        self.layout, self.size, self.weights_map = layout, size, weights_map
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._identity = layout.identity()
        self.loads = 0  # how many adapters were read from disk (the rest were cache hits)

    def get(self, adapter: str | Path | None) -> np.ndarray:
        """The vector for ``adapter`` (the identity for None). Do not modify the returned array."""
        if adapter is None:
            return self._identity
        path = Path(adapter).resolve()
        key = (str(path), *(_mtime(path / name) for name in ("adapter_config.json", "adapter_model.safetensors")))
        with self._lock:
            vector = self._entries.get(key)
            if vector is not None:
                self._entries.move_to_end(key)
                return vector
        vector = scales_from_adapter(self.layout, path, self.weights_map)
        vector.setflags(write=False)
        with self._lock:
            self.loads += 1
            self._entries[key] = vector
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return vector


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1

"""The checks ``export``, ``verify`` and ``patch`` share: the PyTorch reference an engine must
reproduce, a runner per backend, parity on onnxruntime and TensorRT, and dropping a backend that
was not kept from the latency section. One home, so ``patch`` depends on the exporter and never
the other way round.

    reference = Reference.load(source, task, tokenizer_dir, adapters=..., weights_map=...)
    parity = reference.parity(onnx_runner(session, contract), contract, backend=onnx_label(session), ...)
    require_parity(parity, "the ONNX model does not match PyTorch", hint=...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from hypermerge.adapters import fold_model, load_adapter
from hypermerge.adapters.targets import match_suffix
from hypermerge.errors import HypermergeError, ParityError
from hypermerge.export import tensorrt as trt_mod
from hypermerge.export.onnx_export import hf_tokenizer, load_torch_model, wrap
from hypermerge.export.parity import (
    CAUSAL_CASES,
    ENCODER_CASES,
    TOLERANCES,
    Case,
    Tolerance,
    check_parity,
    failure_summary,
)
from hypermerge.export.report import LatencySection
from hypermerge.export.tasks import CAUSAL_LM, IOContract
from hypermerge.fold.safetensors_io import TORCH_DTYPES
from hypermerge.runtime.files import ENGINE_FILE
from hypermerge.runtime.model import Runner
from hypermerge.runtime.ort import session_provider, session_runner
from hypermerge.runtime.weights_map import WeightsMap


def source_dtype(weights_map: WeightsMap, name: str) -> torch.dtype:
    """The dtype the source model stored ``name`` in (float32 where the map does not say)."""
    return TORCH_DTYPES.get(weights_map.fingerprint[name][1], torch.float32)


def folded_reference(source: Path, task: str, adapters: Sequence[str],
                     weights_map: WeightsMap | None) -> torch.nn.Module:
    """The PyTorch model a patched export must reproduce: the source with each adapter loaded
    and folded in memory in turn, its weights rounded to the source's dtype as ``fold`` writes them."""
    model = load_torch_model(source, task)
    for adapter in adapters:
        load_adapter(model, adapter)
        fold_model(model)
    names = list(weights_map.fingerprint) if weights_map is not None else []
    with torch.no_grad():
        for name, param in model.named_parameters():
            match = match_suffix(name, names)
            dtype = source_dtype(weights_map, match) if match else torch.float32
            if dtype != torch.float32:
                param.copy_(param.to(dtype).float())
    return model.eval()


def reference_model(source: Path, task: str, adapters: Sequence[str] = (),
                    weights_map: WeightsMap | None = None) -> torch.nn.Module:
    """The source model, with the adapters a patched export carries folded in (none: as it is)."""
    if adapters:
        return folded_reference(source, task, adapters, weights_map)
    return load_torch_model(source, task)


@dataclasses.dataclass
class Reference:
    """The PyTorch side of every parity check: the model (for ``generate``), its export wrapper
    (the reference forward) and the tokenizer the greedy prompts come from."""

    model: torch.nn.Module
    wrapper: torch.nn.Module
    tokenizer: object | None

    @classmethod
    def of(cls, model: torch.nn.Module, task: str, tokenizer_dir: Path) -> Reference:
        """Wrap ``model`` for ``task``; the tokenizer is read from ``tokenizer_dir`` (None without one)."""
        wrapper, _ = wrap(model, task)
        return cls(model, wrapper, hf_tokenizer(tokenizer_dir))

    @classmethod
    def load(cls, source: Path, task: str, tokenizer_dir: Path, adapters: Sequence[str] = (),
             weights_map: WeightsMap | None = None) -> Reference:
        """:func:`reference_model` of ``source``, wrapped for ``task``."""
        return cls.of(reference_model(source, task, adapters, weights_map), task, tokenizer_dir)

    @property
    def vocab(self) -> int:
        return int(self.model.config.get_text_config().vocab_size)

    def parity(self, run: Runner, contract: IOContract, *, backend: str, tolerance: Tolerance,
               new_tokens: int, cases: tuple[Case, ...] | None = None, greedy: bool = True) -> dict:
        """The ``parity`` section for the backend ``run`` (see :func:`~hypermerge.export.parity.check_parity`)."""
        return check_parity(run, self.model, self.wrapper, contract, backend=backend, tolerance=tolerance,
                            new_tokens=new_tokens, tokenizer=self.tokenizer, cases=cases, greedy=greedy)


def onnx_label(session) -> str:
    """The report's name for an onnxruntime session: ``onnxruntime:<its provider>``."""
    return f"onnxruntime:{session_provider(session)}"


def onnx_runner(session, contract: IOContract) -> Runner:
    """feeds -> outputs in the contract's order, on an onnxruntime session."""
    return session_runner(session, contract)


def require_parity(parity: dict, what: str, *, hint: str, path: Path | None = None) -> None:
    """Raise ParityError(``what: <the failing outputs>``) unless ``parity`` passed.

    Raises:
        ParityError: the section did not pass.
    """
    if not parity["passed"]:
        raise ParityError(f"{what}: {failure_summary(parity)}", path=path, hint=hint)


def cases_within(shape_range, task: str) -> tuple[Case, ...]:
    """The default parity cases that fit a TensorRT profile (the opt point if none does)."""
    cases = CAUSAL_CASES if task == CAUSAL_LM else ENCODER_CASES
    low, high = shape_range.min, shape_range.max

    def fits(case) -> bool:
        return (low.batch <= case.batch <= high.batch and low.seq <= case.seq <= high.seq
                and (task != CAUSAL_LM or low.past <= case.past <= high.past))

    inside = tuple(case for case in cases if fits(case))
    opt_point = shape_range.opt
    return inside or (Case(opt_point.batch, opt_point.seq, opt_point.past),)


def engine_runner(trt, export_dir: Path, contract: IOContract) -> Runner:
    """feeds -> outputs in the contract's order, on the directory's TensorRT engine."""
    return trt_mod.TensorRTRunner(trt, export_dir / ENGINE_FILE, order=list(contract.outputs))


def _engine_shape_range(section: dict, task: str):
    profile = section.get("profile")
    if not profile:
        return trt_mod.parse_shapes(None, task)
    return trt_mod.ShapeRange(*(trt_mod.ShapePoint(**profile[k]) for k in ("min", "opt", "max")))


def verify_engine(export_dir: Path, section: dict, contract: IOContract, reference: Reference,
                  new_tokens: int) -> tuple[Runner | None, str | None]:
    """Re-check a built engine's parity inside the profile it was built for, into ``section``
    (the report's ``tensorrt``: ``parity`` and ``reverified``).

    Returns:
        The engine's runner (None where TensorRT is not available here) and the failure, if any.
    """
    try:
        trt = trt_mod.require_tensorrt()
    except HypermergeError as error:
        section["reverified"] = f"no: {error.what}"
        return None, None
    precision = section.get("precision", "fp16")
    runner = engine_runner(trt, export_dir, contract)
    section["parity"] = reference.parity(runner, contract, backend=f"tensorrt:{precision}",
                                         tolerance=TOLERANCES[precision], new_tokens=new_tokens,
                                         cases=cases_within(_engine_shape_range(section, contract.task), contract.task))
    section["reverified"] = "yes"
    failure = None if section["parity"]["passed"] else f"TensorRT: {failure_summary(section['parity'])}"
    return runner, failure


def drop_backend(latency: dict, name: str) -> None:
    """Remove a backend that was not kept from a latency section held as report.json's dict, in
    place (``LatencySection.drop_backend`` on the typed section)."""
    section = LatencySection.from_dict(latency)
    section.drop_backend(name)
    latency.clear()
    latency.update(section.to_dict())

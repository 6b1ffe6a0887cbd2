"""``patch_export``: what ``hypermerge patch`` runs, as a short list of named stages.

    fold the adapter into the export's weights (in memory, every check before a byte is written)
    -> write the new directory -> its report -> parity against the folded PyTorch model
    -> refit the TensorRT engine -> the certificate

The weight-level work (the map, the fold, the initializers) is :mod:`hypermerge.patch.engine`'s.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from hypermerge._fs import atomic_output_dir
from hypermerge._version import __version__
from hypermerge.adapters.checkpoint import AdapterCheckpoint, read_adapter
from hypermerge.errors import ConfigError, ExportError, ParityError
from hypermerge.export import certificate as cert
from hypermerge.export import tensorrt as trt_mod
from hypermerge.export.api import open_export
from hypermerge.export.certificate import weights_sha256
from hypermerge.export.parity import TOLERANCES, Tolerance, failure_summary
from hypermerge.export.report import LatencySection, PatchSection, utc_now, write_report
from hypermerge.export.verification import (
    Reference,
    onnx_label,
    onnx_runner,
    require_parity,
    verify_engine,
)
from hypermerge.export.weights_map import (
    WEIGHTS_MAP_FILE,
    Initializers,
    digest_of,
    load_onnx_graph,
    write_weights_map,
)
from hypermerge.fold.hfdir import update_config
from hypermerge.patch.engine import PatchedWeights, fold_into_export, source_adapters, write_onnx
from hypermerge.patch.refit import refit_engine
from hypermerge.runtime.files import (
    ENGINE_FILE,
    MODEL_FILE,
    QUANTIZED_FILES,
    REPORT_JSON,
    REPORT_MD,
    STALE_FILES,
)
from hypermerge.runtime.ort import open_session, session_contract


@dataclasses.dataclass
class PatchResult:
    """What a patch wrote."""

    out: Path
    method: str
    adapter_format: str  # "hypermerge" or "peft"
    folded: int  # tensors whose values changed (weights, biases, fully trained modules)
    initializers: int  # ONNX initializers rewritten
    unchanged: list[str]  # targeted tensors the fold left exactly as they were
    base_check: str
    seconds: float
    parity: dict | None = None
    tensorrt: dict | None = None
    dropped: list[str] = dataclasses.field(default_factory=list)  # files not carried over, with why


@dataclasses.dataclass
class PatchOptions:
    """``hm.patch_export``'s keyword arguments (documented there)."""

    verify: bool = True
    trt: bool = False
    source: str | Path | None = None
    overwrite: bool = False
    tolerance: Tolerance | None = None
    new_tokens: int = 16
    provider: str = "auto"
    threads: int | None = None
    progress: bool = True
    allow_other_base: bool = False


@dataclasses.dataclass
class Patch:
    """One patch in progress: the export, the adapter, its folded weights and the new report."""

    export_dir: Path
    report: dict  # the export's, then the patched directory's
    checkpoint: AdapterCheckpoint
    weights: PatchedWeights
    options: PatchOptions
    trt: object = None  # the tensorrt module, with --trt
    dropped: list[str] = dataclasses.field(default_factory=list)

    @property
    def adapter_path(self) -> str:
        return str(self.checkpoint.path.absolute())

    @property
    def adapter_format(self) -> str:
        return self.checkpoint.metadata.get("source", "hypermerge")

    @property
    def source(self) -> Path:
        """The base model (the PyTorch reference): given, else the one recorded at export ('' if neither)."""
        return Path(self.options.source or (self.report.get("source") or {}).get("path") or "")

    @property
    def adapters(self) -> list[str]:
        """Every adapter folded into the patched directory, in order (this one last)."""
        return [*source_adapters(self.report), self.adapter_path]


def plan_patch(export_dir: str | Path, adapter: str | Path, options: PatchOptions) -> Patch:
    """Fold the adapter into the export's weights in memory; every check runs before anything is written.

    Raises:
        ConfigError: ``--trt`` on an export without an engine.
        Everything :func:`hypermerge.patch.engine.fold_into_export` raises.
    """
    export_dir, report = open_export(export_dir)
    trt = None
    if options.trt:
        if not (export_dir / ENGINE_FILE).is_file():
            raise ConfigError(f"--trt: the export has no TensorRT engine ({ENGINE_FILE})", path=export_dir,
                              hint="export with --trt first, or patch without --trt")
        trt = trt_mod.require_tensorrt()  # before anything is read or written
    checkpoint = read_adapter(adapter)
    weights = fold_into_export(checkpoint, export_dir, report, source=options.source,
                               allow_other_base=options.allow_other_base, progress=options.progress)
    return Patch(export_dir, report, checkpoint, weights, options, trt)


def copy_export_files(patch: Patch, tmp: Path) -> list[str]:
    """Everything but the model, its data, the map and the report (and the engine, when it is
    refitted); returns the stale files left out."""
    graph, export_dir = patch.weights.onnx_model.graph, patch.export_dir
    data_files = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    skip = {MODEL_FILE, patch.weights.weights_map.model_file, WEIGHTS_MAP_FILE, REPORT_JSON, REPORT_MD, *data_files}
    if patch.options.trt:
        skip.add(ENGINE_FILE)
    dropped = []
    for entry in sorted(export_dir.iterdir()):
        if entry.name in skip or entry.name.startswith(".") or "hm-tmp" in entry.name:
            continue
        if entry.name in STALE_FILES:
            dropped.append(entry.name)
            continue
        if entry.is_dir():
            shutil.copytree(entry, tmp / entry.name)
        else:
            shutil.copy2(entry, tmp / entry.name)
    return dropped


def write_patched(patch: Patch, tmp: Path) -> None:
    """The new directory: the export's files, the model with the new initializers, the config's
    overrides and the weights map with the new digests and this patch recorded."""
    weights, weights_map = patch.weights, patch.weights.weights_map
    patch.dropped = copy_export_files(patch, tmp)
    write_onnx(patch.export_dir, tmp, weights.onnx_model, weights.inits, weights.updated)
    update_config(tmp, patch.checkpoint.config_overrides)
    weights_map.sha256.update({c.name: digest_of(c.new) for c in weights.changes})
    weights_map.patches.append({"adapter": patch.adapter_path, "method": patch.checkpoint.method.name,
                                "format": patch.adapter_format, "hypermerge": __version__})
    write_weights_map(tmp, weights_map)
    weights.release()


def patch_section(patch: Patch) -> PatchSection:
    """The report's ``patch`` section (its ``seconds`` are set at the end)."""
    weights, checkpoint = patch.weights, patch.checkpoint
    return PatchSection(patch.adapter_path, checkpoint.method.name, patch.adapter_format, len(weights.changes),
                        len(weights.initializers), sorted(weights.unchanged), weights.base_check,
                        weights.content_check.to_dict(), checkpoint.content_sha256(), "unchanged (weights only)",
                        weights.map_built, [f"{name}: holds the base's weights" for name in patch.dropped])


def patched_report(patch: Patch, section: PatchSection) -> dict:
    """The export's report with the patch, the source's adapters, and the stale backends dropped."""
    source = patch.source
    report = {**patch.report, "patch": section.to_dict(), "patched_at": utc_now(), "hypermerge": __version__}
    report["source"] = {**(report.get("source") or {}), "path": str(source.absolute()) if str(source)
                        not in ("", ".") else None, "adapters": patch.adapters}
    # read back typed: dropping a backend edits this report's copy, not the export's report
    latency = LatencySection.from_dict(report["latency"]) if report.get("latency") else None
    for scheme, quantized_file in QUANTIZED_FILES.items():  # an encoder's dynamic int8 shares the int8 name
        if quantized_file in patch.dropped:
            report.pop("quantized", None)
            if latency:
                latency.drop_backend(f"onnxruntime_{scheme}")
    if ENGINE_FILE in patch.dropped:
        report.pop("tensorrt", None)
        if latency:
            latency.drop_backend("tensorrt")
    if latency:
        report["latency"] = latency.to_dict()
    return report


def patched_parity(patch: Patch, tmp: Path, report: dict) -> tuple[dict, Reference, object]:
    """The patched model against the base with every adapter folded in PyTorch.

    Returns:
        The parity section, the reference and the contract (the engine's check reuses them).

    Raises:
        ExportError: the base model is not there.
        ParityError: they do not match (the hint says when the base's weights changed since export).
    """
    o, source = patch.options, patch.source
    if not (source / "config.json").is_file():
        raise ExportError("the base model (the PyTorch reference for --verify) is not there",
                          path=source if str(source) not in ("", ".") else patch.export_dir,
                          hint="pass --source MODEL_DIR, or --no-verify")
    session = open_session(tmp / MODEL_FILE, o.provider, o.threads, exact=True)
    contract = session_contract(session)
    reference = Reference.load(source, contract.task, tmp, patch.adapters, patch.weights.weights_map)
    parity = reference.parity(onnx_runner(session, contract), contract, backend=onnx_label(session),
                              tolerance=o.tolerance or TOLERANCES["fp32"], new_tokens=o.new_tokens)
    if not parity["passed"]:
        changed = (report.get("source") or {}).get("weights_sha256") not in (None, weights_sha256(source))
        require_parity(parity, "the patched model does not match the folded PyTorch model", path=patch.export_dir,
                       hint="the base model's weights changed since export: re-export it" if changed
                       else "fold the adapter and export the folded model")
    return parity, reference, contract


def refitted_engine(patch: Patch, tmp: Path, report: dict, checked: tuple | None) -> dict:
    """``--trt``: the export's engine refitted with the new initializers, its parity checked again
    where the model's was. Returns the report's ``tensorrt`` section.

    Raises:
        ParityError: the refitted engine does not match the folded PyTorch model.
    """
    # the patched model's initializers: the changed ones, and any TensorRT asks for with them
    patched = Initializers(load_onnx_graph(tmp / MODEL_FILE), tmp)
    refit = refit_engine(patch.trt, patch.export_dir / ENGINE_FILE, tmp / ENGINE_FILE, patch.weights.initializers,
                         patched.array)
    section = report["tensorrt"] = {**(report.get("tensorrt") or {}), "refit": refit}
    if checked is not None:
        _, reference, contract = checked
        _, failure = verify_engine(tmp, section, contract, reference, patch.options.new_tokens)
        if failure:
            raise ParityError(f"the refitted TensorRT engine does not match the folded PyTorch model: {failure}",
                              path=patch.export_dir,
                              hint="TensorRT can drop a GEMM bias on refit: rebuild with hypermerge export --trt")
    return section


def certified(patch: Patch, report: dict, out_dir: Path) -> dict:
    """The patched export's certificate: adapter -> the export's base -> engine, and end to end.

    Raises:
        ParityError: the patched engine does not compute what base + adapter (unfolded) compute.
    """
    o, adapters, checkpoint = patch.options, patch.adapters, patch.checkpoint
    certificate = cert.patch_certificate(adapters[-1], checkpoint.content_sha256(), checkpoint.method.name,
                                         patch.adapter_format, patch.source,
                                         (report.get("source") or {}).get("weights_sha256"),
                                         patch.weights.content_check.to_dict(), adapters[:-1])
    e2e = {"passed": None, "why": "not run (--no-verify)"}
    if o.verify:
        e2e = cert.end_to_end(out_dir, certificate, task=report.get("task") or "auto", provider=o.provider,
                              threads=o.threads, new_tokens=o.new_tokens, adapters_before=adapters[:-1],
                              weights_map=patch.weights.weights_map)
        if e2e.get("passed") is False:
            raise ParityError(f"the patched engine does not compute what the adapter model computes: "
                              f"{failure_summary(e2e)}", path=out_dir.parent, hint="fold the adapter and export it")
    return cert.finish(certificate, out_dir, report.get("parity"), e2e)


def patch_export(export_dir: str | Path, adapter: str | Path, out: str | Path, *, verify: bool = True,
                 trt: bool = False, source: str | Path | None = None, overwrite: bool = False,
                 tolerance=None, new_tokens: int = 16, provider: str = "auto", threads: int | None = None,
                 progress: bool = True, allow_other_base: bool = False) -> PatchResult:
    """Fold ``adapter`` into the exported model in ``export_dir`` and write ``out`` (same graph).

    Args:
        export_dir: a directory written by ``hypermerge export`` (with ``weights_map.json``; older
            exports get a map built from their source model).
        adapter: a hypermerge or PEFT adapter directory, made for the export's base model.
        out: the new directory (written atomically; it must not exist unless ``overwrite``).
        verify: check the patched model against the base with the adapter folded in PyTorch.
        trt: refit the export's TensorRT engine with the new weights (needs TensorRT and a GPU).
        source: the base model directory (default: the one recorded at export), for ``verify``.
        tolerance: parity bound (default: fp32 atol 1e-4, rtol 1e-3, as export).
        new_tokens: greedy tokens compared with PyTorch (causal LMs).
        provider, threads: the onnxruntime session used for ``verify``.
        allow_other_base: patch even if the export's weights differ from the adapter's record
            of its base (recorded in the report).

    Returns:
        A PatchResult.

    Raises:
        CheckpointError: a missing or damaged export, adapter or map; NaN/Inf.
        AdapterMismatchError: the adapter was made for another base (names, shapes or, where its
            base is on disk, contents), or adds tensors the graph does not have.
        ExportError: a tensor the adapter changes is not located by the map; no source for verify.
        ConfigError: ``--trt`` on an export without an engine.
        BackendUnavailableError: ``--trt`` without TensorRT or a GPU.
        ParityError: the patched model does not match the folded PyTorch model (nothing is written).
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    start = time.perf_counter()
    options = PatchOptions(verify=verify, trt=trt, source=source, overwrite=overwrite, tolerance=tolerance,
                           new_tokens=new_tokens, provider=provider, threads=threads, progress=progress,
                           allow_other_base=allow_other_base)
    patch = plan_patch(export_dir, adapter, options)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_patched(patch, tmp)
        section = patch_section(patch)
        report = patched_report(patch, section)
        checked = patched_parity(patch, tmp, report) if verify else None
        report["parity"] = checked[0] if checked else None
        tensorrt = refitted_engine(patch, tmp, report, checked) if trt else None
        report["certificate"] = certified(patch, report, tmp)
        seconds = time.perf_counter() - start
        report["files"] = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
        section.seconds = round(seconds, 2)
        report["patch"] = section.to_dict()
        write_report(tmp, report)
    weights = patch.weights
    return PatchResult(Path(out).absolute(), patch.checkpoint.method.name, patch.adapter_format, len(weights.changes),
                       len(weights.initializers), sorted(weights.unchanged), weights.base_check, seconds,
                       parity=report["parity"], tensorrt=tensorrt, dropped=patch.dropped)

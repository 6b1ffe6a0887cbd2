"""One certificate from adapter to engine, carried in the export report.

An exported directory whose source came from ``hypermerge fold`` (its ``hypermerge_fold.json``
is copied along) gets a ``certificate`` section with the chain

    adapter (sha256 of its files) ─▶ base (sha256 of its weights; the fold's content check
    against the adapter's record) ─▶ folded weights (sha256; the fold's own --verify) ─▶ engine
    (sha256 of model.onnx and its data; folded-vs-ONNX parity)

and an end-to-end check where the adapter is still reachable: the base with the adapter loaded
*unfolded* in PyTorch against the engine on the same inputs (greedy decode token for token for
causal LMs). ``hypermerge patch`` writes the same chain for its output (no folded directory: the
adapter goes straight into the engine). ``hypermerge verify`` re-hashes every link and names the
first that broke (adapter changed, base changed, folded weights changed, engine changed), then
re-runs the end-to-end check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from hypermerge.adapters import load_adapter
from hypermerge.adapters.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from hypermerge.errors import HypermergeError, ParityError
from hypermerge.export.parity import TOLERANCES, failure_summary
from hypermerge.export.report import certificate_lines as markdown  # noqa: F401 (its old home)
from hypermerge.export.verification import Reference, onnx_label, onnx_runner, reference_model
from hypermerge.fold.engine import PROVENANCE_FILE  # written by fold, copied into the export with the config
from hypermerge.runtime.files import ENGINE_FILES, MODEL_FILE
from hypermerge.runtime.ort import open_session, session_contract

CHAIN = "adapter -> base -> folded weights -> engine"
FOLD_TOLERANCE = {"float16": "fp16", "bfloat16": "bf16"}  # the fold's dtype rounds every weight once


class CertificateError(ParityError):
    """A link of an export's certificate no longer holds (a file changed since it was certified)."""


@dataclasses.dataclass
class LinkCheck:
    """One link re-checked by ``verify``."""

    link: str  # "adapter", "base", "folded weights", "engine"
    held: bool | None  # None: the file is gone, so the link cannot be re-checked (not a failure)
    detail: str


def file_sha256(paths: list[Path]) -> str:
    """One sha256 over files (names and contents), in the given order; missing files are skipped."""
    digest = hashlib.sha256()
    for path in paths:
        if path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model_dir: Path) -> str:
    """One hash over the directory's safetensors files (to tell a changed source from a bad export)."""
    return file_sha256(sorted(Path(model_dir).glob("*.safetensors")))


def engine_sha256(export_dir: Path) -> str:
    """sha256 of the files that compute: model.onnx, its external data, the TensorRT engine."""
    return file_sha256([export_dir / name for name in ENGINE_FILES])


def adapter_sha256(adapter_dir: Path) -> str | None:
    """sha256 of an adapter's files, as fold records it (None if the directory is gone)."""
    if not (adapter_dir / CONFIG_FILE).is_file():
        return None
    return file_sha256([adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE])


def read_provenance(model_dir: Path) -> dict | None:
    try:
        raw = json.loads((model_dir / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def fold_certificate(source_dir: Path, source_sha256: str) -> dict | None:
    """The chain's links up to the folded weights, from the fold's provenance (None: not a fold)."""
    provenance = read_provenance(source_dir)
    if provenance is None or "adapter" not in provenance:
        return None
    base = Path(provenance.get("base_model") or "")
    return {
        "chain": CHAIN,
        "adapter": {"path": provenance["adapter"], "sha256": provenance.get("adapter_sha256"),
                    "method": provenance.get("method"), "format": provenance.get("adapter_format")},
        "base": {"path": str(base), "weights_sha256": weights_sha256(base) if base.is_dir() else None,
                 "content_check": provenance.get("base_check") or {"status": "not checked",
                                                                   "detail": "fold predates base checks"}},
        "folded": {"path": str(source_dir), "weights_sha256": source_sha256, "dtype": provenance.get("dtype"),
                   "fold_check": provenance.get("verify") or "not run (fold without --verify)"},
    }


def certify_export(model_dir: Path, out_dir: Path, report: dict, *, task: str, provider: str, threads: int,
                   new_tokens: int, verify: bool) -> None:
    """Add the adapter-to-engine certificate when the source came from ``hypermerge fold``.

    Raises:
        ParityError: the engine does not compute what base + adapter (unfolded) compute.
    """
    certificate = fold_certificate(model_dir, report["source"]["weights_sha256"])
    if certificate is None:
        return
    e2e = (end_to_end(out_dir, certificate, task=task, provider=provider, threads=threads, new_tokens=new_tokens)
           if verify else {"passed": None, "why": "not run (--no-verify)"})
    report["certificate"] = finish(certificate, out_dir, report["parity"], e2e)
    if e2e.get("passed") is False:
        raise ParityError(f"the engine does not compute what the adapter model computes: {failure_summary(e2e)}",
                          path=model_dir, hint="fold with --verify to locate the difference; see the parity report")


def patch_certificate(adapter: str, adapter_sha: str, method: str, adapter_format: str, base: Path,
                      base_sha: str | None, content_check: dict, adapters_before: list[str]) -> dict:
    """The chain's links for ``hypermerge patch``: no folded directory, the adapter goes into the engine."""
    return {"chain": CHAIN, "adapter": {"path": adapter, "sha256": adapter_sha, "method": method,
                                        "format": adapter_format},
            "base": {"path": str(base), "weights_sha256": base_sha if base.is_dir() else None,
                     "content_check": content_check},
            "folded": None, "adapters_before": adapters_before}


def finish(certificate: dict, export_dir: Path, parity: dict | None, end_to_end: dict) -> dict:
    """Add the engine link and the end-to-end check; ``passed`` when every check that ran passed."""
    certificate["engine"] = {"sha256": engine_sha256(export_dir),
                             "parity_vs_folded": None if parity is None else bool(parity.get("passed"))}
    certificate["end_to_end"] = end_to_end
    checks = [certificate["engine"]["parity_vs_folded"], end_to_end.get("passed")]
    fold_check = (certificate.get("folded") or {}).get("fold_check")
    if isinstance(fold_check, dict):
        checks.append(fold_check.get("passed", True))
    ran = [c for c in checks if c is not None]
    certificate["passed"] = all(ran) if ran else None  # None: nothing was checked (--no-verify)
    return certificate


def end_to_end(export_dir: Path, certificate: dict, *, task: str, provider: str, threads: int | None,
               new_tokens: int, adapters_before: list[str] | None = None, weights_map=None) -> dict:
    """The base with the adapter loaded unfolded in PyTorch, against the engine, on the parity cases.

    Returns:
        The parity section with ``passed``, or ``{"passed": None, "why": ...}`` when it cannot run.
    """
    adapter, base = Path(certificate["adapter"]["path"]), Path(certificate["base"]["path"])
    if not (adapter / "adapter_config.json").is_file():
        return {"passed": None, "why": f"the adapter {adapter} is not reachable"}
    if not (base / "config.json").is_file():
        return {"passed": None, "why": f"the base {base} is not reachable"}
    try:
        model = reference_model(base, task, adapters_before or (), weights_map)
        load_adapter(model, adapter)
    except HypermergeError as error:
        return {"passed": None, "why": f"the adapter model could not be built: {error.what}"}
    reference = Reference.of(model.eval(), task, export_dir)
    session = open_session(export_dir / MODEL_FILE, provider, threads, exact=True)
    contract = session_contract(session)
    tolerance = TOLERANCES[FOLD_TOLERANCE.get(str((certificate.get("folded") or {}).get("dtype")), "fp32")]
    return reference.parity(onnx_runner(session, contract), contract, tolerance=tolerance, new_tokens=new_tokens,
                            backend=f"{onnx_label(session)} vs base+adapter (unfolded, PyTorch)")


def check_links(export_dir: Path, certificate: dict) -> list[LinkCheck]:
    """Re-hash every link of a recorded certificate, in chain order."""
    checks = []
    adapter = certificate.get("adapter") or {}
    if adapter.get("sha256"):
        now = adapter_sha256(Path(adapter["path"]))
        checks.append(_link("adapter", now, adapter["sha256"]))
    base = certificate.get("base") or {}
    if base.get("weights_sha256"):
        path = Path(base["path"])
        now = weights_sha256(path) if path.is_dir() else None
        checks.append(_link("base", now, base["weights_sha256"]))
    folded = certificate.get("folded") or {}
    if folded.get("weights_sha256") and folded.get("path"):
        path = Path(folded["path"])
        now = weights_sha256(path) if path.is_dir() else None
        checks.append(_link("folded weights", now, folded["weights_sha256"]))
    engine = certificate.get("engine") or {}
    if engine.get("sha256"):
        checks.append(_link("engine", engine_sha256(export_dir), engine["sha256"]))
    return checks


def _link(link: str, now: str | None, recorded: str) -> LinkCheck:
    if now is None:
        return LinkCheck(link, None, f"{link} not reachable: not re-checked")
    return LinkCheck(link, now == recorded, f"{link} unchanged" if now == recorded else f"{link} changed")


def verify_links(export_dir: Path, report: dict) -> dict | None:
    """Raise CertificateError naming the first broken link; returns the certificate (None: none recorded)."""
    certificate = report.get("certificate")
    if not isinstance(certificate, dict):
        return None
    checks = check_links(export_dir, certificate)
    for check in checks:
        if check.held is False:
            raise CertificateError(f"the certificate is broken at the {check.link} link: {check.detail} since it "
                                   "was certified", path=export_dir,
                                   hint=_HINTS.get(check.link, "re-export the model"))
    certificate["rechecked"] = {check.link: check.detail for check in checks}
    return certificate


_HINTS = {
    "adapter": "fold and export the adapter again (or restore the adapter it was made from)",
    "base": "restore the base model, or fold and export again from the new base",
    "folded weights": "restore the folded model, or export it again",
    "engine": "the exported files were modified: export again",
}


def summary(certificate: dict | None) -> dict[str, Any] | None:
    """A compact form for the CLI: passed and the end-to-end errors."""
    if not certificate:
        return None
    e2e = certificate.get("end_to_end") or {}
    return {"passed": certificate.get("passed"), "end_to_end": e2e.get("passed"),
            "max_abs_err": e2e.get("max_abs_err"), "greedy": e2e.get("greedy_decode_match")}

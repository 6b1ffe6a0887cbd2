"""ONNX Runtime sessions: provider choice and thread settings in one place."""

from __future__ import annotations

from pathlib import Path

from hypermerge.errors import BackendUnavailableError, ConfigError, ExportError
from hypermerge.runtime.contract import IOContract, contract_from_onnx

# "auto" tries these in order and takes what this onnxruntime build offers
AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed",
                                      hint="pip install 'hypermerge[serve]' or 'hypermerge[export]' (onnxruntime-gpu for CUDA)") from None
    return onnxruntime


def resolve_providers(provider: str = "auto") -> list[str]:
    """Execution providers for ``provider`` (auto, cpu, cuda, tensorrt), best first.

    Raises:
        ConfigError: unknown provider name.
        BackendUnavailableError: the asked-for provider is not in this onnxruntime build.
    """
    available = set(_ort().get_available_providers())
    if provider == "auto":
        return [name for name in AUTO_ORDER if name in available]
    if provider not in PROVIDERS:
        raise ConfigError(f"unknown provider {provider!r}", hint=f"use one of: auto, {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider][0]
    if wanted not in available:
        raise BackendUnavailableError(f"onnxruntime here has no {wanted} (it has {', '.join(sorted(available))})",
                                      hint="pip install onnxruntime-gpu on a machine with CUDA")
    return [name for name in PROVIDERS[provider] if name in available]


def open_session(path: str | Path, provider: str = "auto", threads: int | None = None, *,
                 exact: bool = False, session_config: dict[str, str] | None = None):
    """An ``InferenceSession`` on ``path``.

    Args:
        provider: auto (TensorRT EP, then CUDA EP, then CPU, whichever is present), cpu, cuda or tensorrt.
        threads: intra-op threads (None: onnxruntime's default, one per core).
        exact: for parity checks: keep CUDA from using TF32 matmuls, which would hide real errors
            behind its own ~1e-3 noise.
        session_config: onnxruntime session config entries (``SessionOptions.add_session_config_entry``),
            e.g. ``{"session.intra_op.allow_spinning": "0"}``.

    Raises:
        ExportError: the file is missing or onnxruntime rejects it.
    """
    ort = _ort()
    path = Path(path)
    names = resolve_providers(provider)  # an unknown or missing provider is reported first
    if not path.is_file():
        raise ExportError("ONNX model not found", path=path, hint="export it first with hypermerge export")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    providers: list = []
    for name in names:
        if name == "CUDAExecutionProvider" and exact:
            providers.append((name, {"use_tf32": "0"}))
        else:
            providers.append(name)
    # onnxruntime's CPU SkipLayerNormalization kernel, which its own fusion substitutes for
    # Add + Add + LayerNormalization, was the slower of the two on our exports (MiniLM b8×s64: 5-15%)
    disabled = ["SkipLayerNormFusion"] if providers == ["CPUExecutionProvider"] else []
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers,
                                    disabled_optimizers=disabled)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ExportError(f"onnxruntime cannot load the model ({str(exc).splitlines()[0][:300]})", path=path,
                          hint="re-export it with hypermerge export") from exc


def session_provider(session) -> str:
    """The provider a session actually runs on (the first one onnxruntime accepted)."""
    return session.get_providers()[0]


def session_contract(session) -> IOContract:
    """The task contract of a loaded model, read from its input and output names."""
    past = [i.shape for i in session.get_inputs() if i.name.startswith("past_key_")]
    return contract_from_onnx([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()],
                              past[0] if past else None)


def session_runner(session, contract: IOContract):
    """``feeds -> outputs`` in the contract's output order (what the parity checks call)."""
    names = list(contract.outputs)
    return lambda feeds: session.run(names, feeds)

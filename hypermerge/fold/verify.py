"""``fold --verify``: the folded model must compute what the adapter model computes.

Loads the base with the adapter (``hm.load_adapter``, so PEFT directories work too) and the folded
directory with transformers, runs both on a few fixed random token sequences (one padded), and
compares the first output (logits or hidden states) at the positions the attention mask keeps.
This loads both models, so unlike the fold itself it is not constant-memory; it is off by default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hypermerge.adapters.checkpoint import load_adapter
from hypermerge.errors import ConfigError, ParityError

# Largest relative difference (max |a - b| / max |a|) accepted per output dtype. float32 folding
# reorders a few sums (W x + s B A x vs (W + s B A) x): ~1e-6 in practice. Half precision output
# rounds every weight once: ~1e-3 for float16, ~1e-2 for bfloat16.
DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
SAMPLE_SHAPES = ((2, 16), (1, 5))


def _model_class(config: dict[str, Any]):
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def sample_inputs(vocab_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A few token batches of different shapes, the first with padding, drawn from a fixed seed.

    Args:
        vocab_size: token ids are drawn below it.
        seed: the generator's seed.

    Returns:
        ``input_ids`` / ``attention_mask`` dicts, one per shape in SAMPLE_SHAPES.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for batch, seq in SAMPLE_SHAPES:
        ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if batch > 1:
            mask[-1, seq // 2:] = 0  # right padding on the last row
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _first_output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        output = model(**batch)
    first = output[0] if isinstance(output, tuple) else next(iter(output.values()))
    return first.float()


def verify_fold(adapter: Path, base: Path, folded: Path, *, dtype: torch.dtype | None = None,
                tolerance: float | None = None) -> dict[str, Any]:
    """Compare the adapter model (base + adapter) with the folded model on sample inputs.

    Args:
        adapter: the adapter directory (hypermerge or PEFT).
        base: the base model directory.
        folded: the folded model directory.
        dtype: the folded model's dtype (None: as stored); picks the default tolerance.
        tolerance: the largest relative difference accepted.

    Returns:
        A report: max abs and rel difference, the tolerance, the inputs' shapes, passed=True.

    Raises:
        ParityError: the difference exceeds the tolerance (the report is in the message).
        ConfigError: the model does not take token ids.
    """
    config = json.loads((folded / "config.json").read_text())
    cls = _model_class(config)
    reference_dtype = torch.float32
    # The adapter model runs in float32: it is the exact reference the folded weights should match.
    overrides = {k: config[k] for k in ("id2label", "label2id") if k in config}
    adapted = load_adapter(cls.from_pretrained(base, dtype=reference_dtype, use_safetensors=True, **overrides).eval(),
                           adapter)
    folded_model = cls.from_pretrained(folded, dtype=reference_dtype, use_safetensors=True).eval()
    if getattr(folded_model, "main_input_name", "input_ids") != "input_ids":
        raise ConfigError(f"--verify needs a model that takes token ids ({cls.__name__} takes "
                          f"{folded_model.main_input_name})", hint="run without --verify and check the model yourself")
    vocab = getattr(folded_model.config, "vocab_size", None) or 100
    stored_dtype = dtype or _stored_dtype(config)
    limit = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(stored_dtype, 1e-4)
    max_abs, max_rel = 0.0, 0.0
    for batch in sample_inputs(vocab):
        expected = _first_output(adapted, batch)
        actual = _first_output(folded_model, batch)
        keep = batch["attention_mask"].bool()
        if expected.dim() >= 2 and expected.shape[:2] == keep.shape:
            expected, actual = expected[keep], actual[keep]  # compare valid positions only
        diff = (actual - expected).abs().max().item()
        scale = expected.abs().max().clamp_min(1e-12).item()
        max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / scale)
    report = {"max_abs": max_abs, "max_rel": max_rel, "tolerance": limit, "passed": max_rel <= limit,
              "inputs": [list(s) for s in SAMPLE_SHAPES], "model_class": cls.__name__}
    if not report["passed"]:
        raise ParityError(f"the folded model differs from the adapter model by {max_rel:.3g} (relative, max abs "
                          f"{max_abs:.3g}), above the tolerance {limit:.3g}; no output was written", path=adapter,
                          hint="check that the adapter and the base belong together, or pass --tolerance "
                               "if the output dtype explains the difference")
    return report


def _stored_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)

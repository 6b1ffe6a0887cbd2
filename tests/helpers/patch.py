"""Helpers for the patch and adapter-inputs tests: tiny bases, adapters of every registered method
plus a PEFT LoRA, and the reference every patched model must reproduce (the base with the adapter
folded in PyTorch)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import peft
import torch
import transformers

import hypermerge as hm
from hypermerge.export.onnx_export import call_wrapper, example_inputs, load_torch_model, wrap
from hypermerge.export.parity import Case, causal_feeds
from tests.helpers.common import TEST_CONFIGS, TOKENIZER_FILES, minilm_dir, perturb_adapter, tiny_config

ARCHS = ("llama", "bert", "gpt2")
TASKS = {"llama": "causal-lm", "bert": "sequence-classification", "gpt2": "causal-lm", "minilm": "feature-extraction"}
# every registered method (AdaLoRA and later ones join by registering) and a PEFT LoRA made by PEFT
METHODS = [*sorted(hm.METHODS), "peft-lora"]
PEFT_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "output.dense"],
                "gpt2": ["c_attn", "mlp.c_proj"], "minilm": ["query", "value", "output.dense"]}


def save_base(arch: str, path: Path, seed: int = 0, hidden: int | None = None) -> Path:
    """A tiny random model as a HF directory.

    llama gets MiniLM's vocabulary and tokenizer files (so ``generate`` on text runs); bert keeps
    transformers' initialisation (zero biases, which the exporter merges into shared initializers);
    gpt2 gets random biases (real checkpoints have them; zero ones the exporter drops from ``Gemm``).
    """
    config = tiny_config(arch)
    if hidden is not None:
        config.hidden_size = hidden
    torch.manual_seed(seed)
    if arch == "llama":
        config.vocab_size = 30522
        model = transformers.AutoModelForCausalLM.from_config(config)
    elif arch == "bert":
        model = transformers.BertForSequenceClassification(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed + 1)
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    model.eval().save_pretrained(path)
    if arch == "llama":
        for name in TOKENIZER_FILES:
            if (minilm_dir() / name).exists():
                shutil.copy(minilm_dir() / name, path / name)
    return path


def base_model(arch: str, base: Path) -> torch.nn.Module:
    return load_torch_model(base, TASKS[arch])


def make_adapter(method: str, arch: str, base: Path, out: Path, seed: int = 0) -> Path:
    """An adapter of ``method`` for ``base``, moved away from its initialisation as training would."""
    model = base_model(arch, base)
    if method == "peft-lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[arch]))
        perturb_adapter(model, seed, scale=0.1)
        model.save_pretrained(out)
        return out
    hm.inject(model, TEST_CONFIGS[method]())
    perturb_adapter(model, seed)
    hm.save_adapter(model, out, base_model=base)
    return out


def folded_torch(arch: str, base: Path, adapter: Path) -> torch.nn.Module:
    """The reference: the base with the adapter loaded and folded in memory."""
    return hm.fold_model(hm.load_adapter(base_model(arch, base), adapter))


def sample_feeds(arch: str, model: torch.nn.Module) -> list[tuple[dict, np.ndarray]]:
    """Two input batches in the export's contract (padding included; a real KV cache for causal LMs)."""
    wrapper, contract = wrap(model, TASKS[arch])
    vocab = int(model.config.get_text_config().vocab_size)
    if contract.task == "causal-lm":
        cases = [causal_feeds(wrapper, contract, vocab, case, seed) for seed, case in
                 enumerate((Case(3, 7, pad=3), Case(2, 1, past=6, pad=2)))]
        return [(feeds, mask.numpy()) for feeds, mask in cases]
    out = []
    for seed, (batch, seq, pad) in enumerate(((2, 9, 3), (3, 5, 0))):
        feeds = example_inputs(contract, vocab, batch=batch, seq=seq, left_pad=pad, seed=seed)
        out.append((feeds, feeds["attention_mask"].numpy()))
    return out


def assert_matches_torch(arch: str, onnx_dir: Path, reference: torch.nn.Module, rel: float = 1e-5,
                         adapter: Path | None = None) -> float:
    """The exported model's outputs (with ``adapter`` fed, for exports with adapter inputs) equal
    ``reference``'s at valid positions within ``rel`` of the output's largest value; returns the
    largest relative difference seen."""
    session = hm.OnnxModel.load(onnx_dir, provider="cpu")
    wrapper, contract = wrap(reference, TASKS[arch])
    worst = 0.0
    for feeds, mask in sample_feeds(arch, reference):
        actual = session.run({k: v.numpy() for k, v in feeds.items()}, adapter=adapter)
        expected = [t.numpy() for t in call_wrapper(wrapper, contract, feeds)]
        for name, a, e in zip(contract.outputs, actual, expected, strict=True):
            if name.startswith("present_"):
                a, e = a.transpose(0, 2, 1, 3)[mask.astype(bool)], e.transpose(0, 2, 1, 3)[mask.astype(bool)]
            elif contract.task != "sequence-classification":
                new = mask[:, -a.shape[1]:].astype(bool)
                a, e = a[new], e[new]
            diff = float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-12))
            assert diff <= rel, f"{name}: relative difference {diff:.3g} > {rel}"
            worst = max(worst, diff)
    return worst

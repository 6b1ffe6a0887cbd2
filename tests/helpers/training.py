"""Helpers for the training tests: tiny bases with a character-level tokenizer, tiny data sets, and
recipes that train in seconds."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import torch
import transformers
import yaml
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, TrainerCallback

from tests.helpers.common import model_class, tiny_config

_SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>"]
_CHARS = sorted(set(string.ascii_lowercase + string.digits + string.punctuation + " "))


def save_char_tokenizer(path: Path) -> Path:
    """A character-level tokenizer (73 ids, fits the tiny models' vocab of 128) saved beside a model."""
    vocab = {token: i for i, token in enumerate(_SPECIALS + _CHARS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path


def save_tiny_base(arch: str, path: Path, seed: int = 0) -> Path:
    """A tiny random model (tests/helpers/common.py's config) with a character-level tokenizer.

    The weights are drawn with std 0.2 instead of 0.02: at the usual scale a 2-layer random model
    maps every input to nearly the same features, and no adapter can learn anything in a few steps.
    """
    config = tiny_config(arch)
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    if arch == "bert":
        model = transformers.BertForSequenceClassification(config)
    else:
        model = model_class(arch).from_config(config)
    model.save_pretrained(path)
    return save_char_tokenizer(path)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sentiment_rows(count: int, seed: int) -> list[dict]:
    """Short reviews whose label is carried by one word: learnable in a few steps."""
    rng = random.Random(seed)
    good, bad = ["great", "superb", "lovely", "fine"], ["awful", "dull", "poor", "bad"]
    subjects = ["the film", "this plot", "the cast", "its music", "the ending"]
    rows = []
    for i in range(count):
        label = i % 2
        word = rng.choice(good if label else bad)
        rows.append({"text": f"{rng.choice(subjects)} was {word}", "label": ["negative", "positive"][label]})
    return rows


def arithmetic_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


# Small ranks and hypernetworks: the tiny bases have 32-wide layers.
ADAPTER_OPTIONS = {"lora": {"r": 4, "alpha": 8}, "dora": {"r": 2, "alpha": 4}, "fakerank": {"r": 4, "target_r": 2},
                   "adalora": {"init_r": 4, "target_r": 2, "alpha": 4},
                   "hyperadalora": {"init_r": 4, "target_r": 2, "hyper_dim": 16, "hyper_heads": 2},
                   "hyperlora": {"r": 2, "alpha": 4, "hyper_dim": 8, "hyper_heads": 2}}
# Every weight moving at the adapters' rate makes a full fine-tune diverge.
LEARNING_RATES = {"full": 5e-3}


def tiny_recipe(tiny: dict, task: str = "sequence-classification", method: str = "hyperadapt",
                adapter: dict | None = None, data: dict | None = None, **training) -> dict:
    """A recipe that trains a tiny base for a few seconds. The validation set is the training set,
    so the final eval loss measures what the run learnt against the first step's loss."""
    if task == "sequence-classification":
        base, files, fields = tiny["bert"], tiny["cls_train"], {"max_length": 32}
    else:
        base, files, fields = tiny["llama"], tiny["lm_train"], {"text_field": "prompt", "label_field": "answer",
                                                                 "max_length": 16}
    return {
        "model": {"path": str(base)},
        "task": task,
        "data": {"train": str(files), "validation": str(files), **fields, **(data or {})},
        "adapter": {"method": method, **ADAPTER_OPTIONS.get(method, {}), **(adapter or {})},
        "training": {"learning_rate": LEARNING_RATES.get(method, 2e-2), "batch_size": 8, "max_steps": 30, "logging_steps": 1,
                     "save_steps": 10, "seed": 0, **training},
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


class Interrupt(TrainerCallback):
    """Stops the run at a step, as a Ctrl-C or a killed job would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt

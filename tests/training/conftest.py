"""Fixtures for the training tests."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.training import arithmetic_rows, save_tiny_base, sentiment_rows, write_jsonl


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of tiny bases (bert for classification, llama for causal LM) and of tiny data files."""
    root = tmp_path_factory.mktemp("tiny-train")
    bert = save_tiny_base("bert", root / "bert")
    llama = save_tiny_base("llama", root / "llama")
    data = {
        "cls_train": write_jsonl(root / "cls_train.jsonl", sentiment_rows(32, 0)),
        "lm_train": write_jsonl(root / "lm_train.jsonl", arithmetic_rows(32, 0)),
    }
    return {"bert": bert, "llama": llama, **data}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on a busy machine, where a second
    OpenMP thread spins waiting for a core (seen: 10 ms vs 200 ms a step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

from __future__ import annotations

import hypermerge.training.data as data


def test_arithmetic_is_seeded_and_splits_are_disjoint():
    first, second = data.arithmetic_splits(seed=3), data.arithmetic_splits(seed=3)
    assert first == second
    prompts = {split: {e.text for e in rows} for split, rows in first.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    example = first["train"][0]
    a, operation, b = example.text.removeprefix("What is ").removesuffix("? Answer:").split()
    assert int(example.label) == data.ARITHMETIC_OPERATIONS[operation](int(a), int(b))


def test_sentiment_splits_are_balanced_and_fixed(tmp_path, monkeypatch):
    splits = data.sentiment_splits()
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [8000, 1000, 1043]
    positives = sum(e.label for e in splits["train"]) / len(splits["train"])
    assert 0.45 < positives < 0.55
    assert splits == data.sentiment_splits()  # the cached parse gives the same splits


def test_damaged_download_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERMERGE_CACHE", str(tmp_path))
    target = data.cache_dir() / data.VADER_SDIST
    target.parent.mkdir(parents=True)
    target.write_bytes(b"half a download")
    path = data.vader_sdist()
    assert data._sha256(path) == data.VADER_SHA256

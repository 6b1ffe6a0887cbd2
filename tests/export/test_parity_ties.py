"""Greedy-decode parity: a divergence at a near-tie of PyTorch's own logits is accepted, any
other divergence fails, and every diverging row is judged (not just the first)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hypermerge.export import parity

VOCAB = 16


class LastLogits(torch.nn.Module):
    """A stand-in LM whose last-position logits favour token 5 over token 7 by ``gaps[row]``,
    the row being told apart by the prompt's first token."""

    def __init__(self, gaps: dict[int, float]):
        super().__init__()
        self.gaps = gaps

    def forward(self, input_ids):
        logits = torch.zeros(1, input_ids.shape[1], VOCAB)
        logits[0, -1, 5] = 3.0
        logits[0, -1, 7] = 3.0 - self.gaps[int(input_ids[0, 0])]
        return SimpleNamespace(logits=logits)


def run_case(monkeypatch, gaps_by_row: dict[int, float], diverging_rows: list[int]) -> dict:
    ids, mask = parity.greedy_prompts(VOCAB)
    expected = np.full((ids.shape[0], 4), 5, dtype=np.int64)
    actual = expected.copy()
    for row in diverging_rows:
        actual[row, 2:] = 7
    first_tokens = {row: int(ids[row][mask[row].astype(bool)][0]) for row in range(ids.shape[0])}
    gaps = {first_tokens[row]: gap for row, gap in gaps_by_row.items()}
    monkeypatch.setattr(parity, "torch_greedy", lambda *a, **k: expected)
    monkeypatch.setattr(parity, "decode", lambda *a, **k: actual)
    return parity.greedy_match(None, LastLogits(gaps), None, VOCAB, 4, tolerance=parity.TOLERANCES["fp32"])


@pytest.fixture
def distinct_rows():
    ids, mask = parity.greedy_prompts(VOCAB)
    firsts = [int(ids[r][mask[r].astype(bool)][0]) for r in range(ids.shape[0])]
    if len(set(firsts[:2])) < 2:
        pytest.fail("the greedy prompts' first two rows should start differently")
    return ids.shape[0]


def test_a_near_tie_is_accepted(monkeypatch, distinct_rows):
    result = run_case(monkeypatch, {0: 1e-6}, [0])
    assert result["match"] and result["tie"]
    assert result["first_mismatch"]["logit_gap"] == pytest.approx(1e-6, abs=1e-7)


def test_a_clear_preference_is_a_mismatch(monkeypatch, distinct_rows):
    result = run_case(monkeypatch, {0: 0.5}, [0])
    assert not result["match"] and "tie" not in result
    assert "beyond the" in parity.failure_summary({"outputs": {}, "greedy_decode": result, "tolerance": {}})


def test_every_diverging_row_is_judged(monkeypatch, distinct_rows):
    result = run_case(monkeypatch, {0: 1e-6, 1: 0.5}, [0, 1])
    assert not result["match"]

"""Soak, overload and cancellation of `hypermerge serve` (issue 18), with the pass criteria of the
issue, on the tests' tiny exports over loopback. Slow, and bounded in time: the soak lasts
``HYPERMERGE_SOAK_SECONDS`` (10 minutes by default), the overload 60 s. The runs themselves are
benchmarks/serve_soak.py's (which also reports them for benchmarks/RESULTS.md on MiniLM)."""

from __future__ import annotations

import pytest

from benchmarks.serve_soak import (
    P99_DRIFT_LIMIT,
    RECOVERY_LIMIT_S,
    RSS_GROWTH_LIMIT,
    run_cancellation,
    run_overload,
    run_soak,
    soak_seconds,
)

pytestmark = pytest.mark.slow


# The tiny model's capacity on a shared 2-core machine moved 3.5x within ten minutes (940 req/s in
# one capacity measurement, 272 in the next), and a rate sustainable in a quiet minute was not in a
# busy one: a quarter of the measured capacity stays under it, and a deep queue absorbs the host's
# stalls (the load generator itself was starved for up to 1.7 s at a time), so that what the soak
# judges is the server's stability (errors, drift, memory), not the neighbours' load. Refusals
# under load are the overload test's subject.
SOAK_FRACTION, SOAK_QUEUE = 0.25, 4096


def test_soak_at_the_sustainable_rate(exports):
    """Zero errors, p99 stable: the later minutes' within 1.5x the earlier ones' (each minute's
    typical p99, the median of its 10-s p99s; the last five minutes' median against the first five's:
    benchmarks.serve_soak.halves_drift says why), RSS growth under 10 %."""
    result = run_soak(exports["feature-extraction"], soak_seconds(), fraction=SOAK_FRACTION, max_queue=SOAK_QUEUE,
                      capacity_seconds=30.0)
    assert result.requests > 0 and result.errors == 0, result
    assert result.p99_halves_drift <= P99_DRIFT_LIMIT, result  # the raw minute p99s are in result.windows
    assert result.rss_growth < RSS_GROWTH_LIMIT, result


def test_overload_at_four_times_the_sustainable_rate(exports):
    """Every answer 200, 429 or 503; accepted requests' p99 within the queue's bound; normal
    latency again within 5 s of the burst's end; the server counted its refusals."""
    result = run_overload(exports["feature-extraction"], 60.0)
    assert set(result.statuses) <= {"200", "429", "503"}, result
    assert result.statuses.get("200", 0) > 0 and result.statuses.get("429", 0) > 0, result  # overloaded, yet serving
    assert result.rejected_metric == result.statuses.get("429", 0) + result.statuses.get("503", 0), result
    assert result.accepted_p99_ms <= result.p99_bound_ms, result
    assert result.recovery_s is not None and result.recovery_s <= RECOVERY_LIMIT_S, result


def test_hundred_streams_cut_mid_generation_stop_computing(exports):
    """The generated-tokens counter stops rising (at most a token per stream after the cut), every
    stream is counted as cancelled, and the server serves the next request."""
    result = run_cancellation(exports["causal-lm"], 100)
    assert result.tokens_after_cut <= result.streams, result
    assert result.cancelled_running + result.cancelled_queued == result.streams, result
    assert result.completion_after == 200, result

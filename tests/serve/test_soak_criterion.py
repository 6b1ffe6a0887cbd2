"""The soak's stability criterion (benchmarks.serve_soak.halves_drift) on synthetic minutes: it fails a
latency that grows with time and passes a steady one that a neighbour's burst hits in one minute."""

from __future__ import annotations

import pytest

from benchmarks.serve_soak import P99_DRIFT_LIMIT, halves_drift


def test_a_p99_that_grows_with_time_fails():
    growing = [1.0 + 2.0 * k / 9 for k in range(10)]  # 1 ms to 3 ms over ten minutes
    assert halves_drift(growing) > P99_DRIFT_LIMIT


def test_a_steady_p99_with_a_burst_in_its_last_minute_passes():
    steady = [8.3, 7.9, 8.8, 8.1, 7.6, 8.4, 8.0, 7.7, 8.2, 52.8]
    assert steady[-1] / steady[0] > P99_DRIFT_LIMIT  # what the last-against-first ratio would have failed
    assert halves_drift(steady) <= P99_DRIFT_LIMIT


def test_a_shorter_soak_compares_its_outer_windows():
    assert halves_drift([2.0, 9.0, 2.0, 4.0, 5.0]) == pytest.approx(4.5 / 5.5)
    with pytest.raises(ValueError):
        halves_drift([3.0])

"""Arrival processes: the statistics a load generator promises, and determinism per seed."""

import numpy as np
import pytest

from smartspec.bench.arrivals import (Phase, gamma_arrivals, make_arrivals, mean_rate, parse_phases,
                                      phased_arrivals, poisson_arrivals)


def _cv(x: np.ndarray) -> float:
    return float(x.std() / x.mean())


def test_poisson_rate_and_exponential_gaps():
    times = poisson_arrivals(20000, rate=5.0, seed=3)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert (times.size - 1) / times[-1] == pytest.approx(5.0, rel=0.03)
    assert _cv(gaps) == pytest.approx(1.0, abs=0.04)  # exponential gaps have CV 1
    # memoryless: P(gap > 1/rate) = e^-1
    assert np.mean(gaps > 0.2) == pytest.approx(np.exp(-1), abs=0.015)


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_keeps_rate_and_sets_cv(cv):
    gaps = np.diff(gamma_arrivals(30000, rate=10.0, cv=cv, seed=1))
    assert 1.0 / gaps.mean() == pytest.approx(10.0, rel=0.04)
    assert _cv(gaps) == pytest.approx(cv, rel=0.06)


def test_same_seed_same_trace_other_seed_other_trace():
    assert np.array_equal(poisson_arrivals(100, 2.0, seed=7), poisson_arrivals(100, 2.0, seed=7))
    assert not np.array_equal(poisson_arrivals(100, 2.0, seed=7), poisson_arrivals(100, 2.0, seed=8))


def test_phased_counts_follow_each_phase():
    phases = [Phase(100.0, 2.0), Phase(50.0, 20.0), Phase(100.0, 0.0), Phase(100.0, 5.0)]
    times = phased_arrivals(phases, seed=2)
    assert np.all(np.diff(times) >= 0)
    edges = np.cumsum([0.0] + [p.duration_s for p in phases])
    counts = np.histogram(times, bins=edges)[0]
    for count, phase in zip(counts, phases):
        expected = phase.rate * phase.duration_s
        assert abs(count - expected) <= 5 * np.sqrt(max(expected, 1.0))
    assert counts[2] == 0  # a silent phase is silent


def test_phased_with_n_repeats_the_cycle():
    phases = parse_phases("10:4,10:0")
    times = phased_arrivals(phases, n=200, seed=0)
    assert times.size == 200
    assert times[-1] > 20.0  # needed more than one 20 s cycle for ~40 per cycle
    in_silence = (times % 20.0) >= 10.0
    assert not in_silence.any()
    assert mean_rate(phases) == 2.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="DURATION_S:RATE"):
        parse_phases("10-2")
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_arrivals(10, 0.0)
    with pytest.raises(ValueError, match="every phase has rate 0"):
        phased_arrivals([Phase(1.0, 0.0)], n=5)
    with pytest.raises(ValueError, match="unknown arrival process"):
        make_arrivals(10, 1.0, process="uniform")

"""Request arrival times for open-loop load: Poisson, gamma and phased traces.

Pure and seeded: the same arguments give the same times, so a benchmark point and its simulation
can be driven by one identical trace. Times are seconds from the start of the run, sorted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Phase:
    """A stretch of the trace with a constant mean arrival rate."""

    duration_s: float
    rate: float  # requests per second; 0 = silence

    def __post_init__(self) -> None:
        if not (self.duration_s > 0):
            raise ValueError(f"phase duration_s must be > 0, got {self.duration_s}")
        if not (self.rate >= 0):
            raise ValueError(f"phase rate must be >= 0, got {self.rate}")


def _gaps(rng: np.random.Generator, n: int, rate: float, cv: float) -> np.ndarray:
    """n inter-arrival gaps with mean 1/rate and coefficient of variation cv (cv=1: exponential)."""
    if not (rate > 0):
        raise ValueError(f"rate must be > 0, got {rate}")
    if not (cv > 0):
        raise ValueError(f"cv must be > 0, got {cv}")
    # gamma(shape, scale): mean = shape*scale, CV = 1/sqrt(shape)
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (rate * shape), size=n)


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """n arrival times of a Poisson process with `rate` requests/s; the first arrives at t=0."""
    return gamma_arrivals(n, rate, cv=1.0, seed=seed)


def gamma_arrivals(n: int, rate: float, cv: float, seed: int = 0) -> np.ndarray:
    """n arrival times whose gaps are gamma distributed (mean 1/rate, given CV; cv>1 = bursty)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    gaps = _gaps(rng, n, rate, cv)
    times = np.cumsum(gaps)  # times: [n]
    return times - times[0] if n else times


def phased_arrivals(phases: Sequence[Phase], n: int | None = None, cv: float = 1.0,
                    seed: int = 0) -> np.ndarray:
    """Arrivals over consecutive phases of constant rate (a load that changes over time).

    With `n` None the phases run once; otherwise they repeat, cyclically, until n arrivals exist.
    Within a phase gaps are gamma(cv) at that phase's rate; at a phase boundary the clock restarts
    (exact for Poisson, which is memoryless).
    """
    if not phases:
        raise ValueError("phases must not be empty")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n is not None and n > 0 and all(p.rate == 0 for p in phases):
        raise ValueError("every phase has rate 0: no arrival would ever come")
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    count = 0
    start = 0.0
    cycle = 0
    while True:
        for phase in phases:
            if phase.rate > 0:
                # draw generously, keep the gaps that land inside the phase
                expect = phase.rate * phase.duration_s
                draw = int(expect + 6 * np.sqrt(expect) + 16)
                while True:
                    times = np.cumsum(_gaps(rng, draw, phase.rate, cv))
                    if times[-1] > phase.duration_s:
                        break
                    draw *= 2
                inside = times[times < phase.duration_s] + start
                out.append(inside)
                count += inside.size
            start += phase.duration_s
        cycle += 1
        if n is None or count >= n:
            break
    times = np.concatenate(out) if out else np.zeros(0)
    return times if n is None else times[:n]


def parse_phases(text: str) -> list[Phase]:
    """'60:2,60:24,60:2' -> three phases of 60 s at 2, 24 and 2 requests/s."""
    phases = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            duration, rate = part.split(":")
            phases.append(Phase(float(duration), float(rate)))
        except ValueError as exc:
            raise ValueError(f"bad phase {part!r}: expected DURATION_S:RATE ({exc})") from None
    if not phases:
        raise ValueError(f"no phases in {text!r}")
    return phases


def mean_rate(phases: Sequence[Phase]) -> float:
    """Time-weighted mean arrival rate of one pass over the phases."""
    total = sum(p.duration_s for p in phases)
    return sum(p.duration_s * p.rate for p in phases) / total


def make_arrivals(n: int, rate: float | None, *, process: str = "poisson", cv: float = 1.0,
                  phases: Sequence[Phase] | None = None, seed: int = 0) -> np.ndarray:
    """One entry point for the CLIs: phases when given, else `process` at `rate`."""
    if phases:
        return phased_arrivals(phases, n=n, cv=cv, seed=seed)
    if rate is None:
        raise ValueError("rate is required without phases")
    if process == "poisson":
        return poisson_arrivals(n, rate, seed=seed)
    if process == "gamma":
        return gamma_arrivals(n, rate, cv=cv, seed=seed)
    raise ValueError(f"unknown arrival process {process!r}: expected 'poisson' or 'gamma'")

"""What a simulated worker is asked to do: arrival times and prompt/output lengths per request."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    arrival_s: np.ndarray  # [N] sorted seconds
    prompt_tokens: np.ndarray  # [N] >= 1
    output_tokens: np.ndarray  # [N] >= 1 (completion tokens; the simulator ignores EOS)

    def __post_init__(self) -> None:
        n = self.arrival_s.shape[0]
        if self.prompt_tokens.shape != (n,) or self.output_tokens.shape != (n,):
            raise ValueError("arrival_s, prompt_tokens and output_tokens must have the same length")
        if n and (self.prompt_tokens.min() < 1 or self.output_tokens.min() < 1):
            raise ValueError("prompt and output lengths must be >= 1")
        if n > 1 and np.any(np.diff(self.arrival_s) < 0):
            raise ValueError("arrival_s must be sorted")

    @property
    def size(self) -> int:
        return int(self.arrival_s.shape[0])


def parse_length(spec: str | int) -> tuple[int, int]:
    """'128' -> (128, 128); '100:400' -> uniform integers in [100, 400]."""
    text = str(spec)
    low, _, high = text.partition(":")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"bad length {spec!r}: expected N or LOW:HIGH") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"bad length {spec!r}: need 1 <= LOW <= HIGH")
    return lo, hi


def sample_lengths(spec: str | int, n: int, rng: np.random.Generator) -> np.ndarray:
    lo, hi = parse_length(spec)
    return rng.integers(lo, hi + 1, size=n)  # [n]


def make_workload(arrival_s: np.ndarray, prompt_tokens: str | int, output_tokens: str | int,
                  seed: int = 0) -> Workload:
    rng = np.random.default_rng([seed, 7])
    n = int(arrival_s.shape[0])
    return Workload(np.asarray(arrival_s, dtype=np.float64), sample_lengths(prompt_tokens, n, rng),
                    sample_lengths(output_tokens, n, rng))

"""Learning the per-count table of the cost model: what a step of N query tokens costs beyond the line.

The linear terms (core/cost_model.py) price a query token at one c_tok whatever the batch; the
matrix kernels do not (on the reference CPU a step of 12 plain rows costs as much as one of 24
tokens). `TokenCountResiduals` keeps, for every count N up to TOKEN_COUNT_LIMIT, a forgetting mean
of how far the measured verify time sat from the line at that N, shrunk toward 0 by
`SHRINK_STEPS` pseudo-steps of no difference, so a count seen once moves its entry a fifth of the
way, one seen often ~90% (core/cost_fit.py sets the forgetting), and a count never seen adds nothing.

The online fit (core/cost_fit.py) uses it both ways (backfitting): the line is fitted to
measured - table[N], so a kernel plateau at a few counts no longer bends the line's coefficients
for every other count (a plain step at batch 12 taught c_spec 23-29 ms before this), and the table
is fed measured - line. The shrinkage makes the pair a contraction: an offset the two could trade
between them decays instead of drifting.

Each count forgets only when it is observed (forgetting per own observation, not per step), so a
count seen every hundred steps keeps its entry between visits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from smartspec.core.cost_model import TOKEN_COUNT_LIMIT

# Pseudo-observations of "no difference from the line" in every count's mean.
SHRINK_STEPS = 4.0


@dataclass
class TokenCountResiduals:
    """Forgetting means of (measured verify - line) per query token count N = 0..TOKEN_COUNT_LIMIT."""

    forgetting: float
    sums: np.ndarray = field(default_factory=lambda: np.zeros(TOKEN_COUNT_LIMIT + 1))  # [T]
    weights: np.ndarray = field(default_factory=lambda: np.zeros(TOKEN_COUNT_LIMIT + 1))  # [T]

    def observe(self, count: float, residual_ms: float) -> None:
        """One step of `count` query tokens whose verify part measured `residual_ms` above the line.
        Counts outside the table, or not whole, and non-finite residuals are ignored."""
        if not (math.isfinite(count) and count == int(count) and 0 <= count <= TOKEN_COUNT_LIMIT):
            return
        if not math.isfinite(residual_ms):
            return
        n = int(count)
        self.sums[n] = self.forgetting * self.sums[n] + residual_ms
        self.weights[n] = self.forgetting * self.weights[n] + 1.0

    def table(self, floor_ms: float, scale: float = 1.0) -> tuple[float, ...]:
        """CostModel.token_count_ms: every entry up to the largest count observed, none below
        `floor_ms` (-c_fixed of the line they go with, so no prediction is negative), times `scale`
        (the online fit's speed factor)."""
        seen = np.flatnonzero(self.weights > 0)
        if seen.size == 0:
            return ()
        entries = self.sums[: seen[-1] + 1] / (self.weights[: seen[-1] + 1] + SHRINK_STEPS)  # [n_max + 1]
        return tuple((np.maximum(entries, floor_ms) * scale).tolist())

    def to_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.tolist(), "weights": self.weights.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], forgetting: float) -> "TokenCountResiduals":
        """Raises ValueError for state no fit produces (other lengths, non-finite or negative weights)."""
        try:
            sums = np.asarray(data["sums"], dtype=np.float64)
            weights = np.asarray(data["weights"], dtype=np.float64)
        except (KeyError, TypeError, OverflowError) as exc:
            raise ValueError(f"stored token-count table unreadable: {exc}") from None
        if sums.shape != (TOKEN_COUNT_LIMIT + 1,) or weights.shape != sums.shape:
            raise ValueError("stored token-count table has the wrong length")
        if not (np.isfinite(sums).all() and np.isfinite(weights).all() and (weights >= 0).all()):
            raise ValueError("stored token-count table is not finite")
        return cls(forgetting, sums, weights)

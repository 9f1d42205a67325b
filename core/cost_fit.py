"""Learning the cost model's coefficients from measured steps (core/cost_model.py has the formula).

Both parts of the step time are linear in their coefficients (`verify_features`: 7 numbers,
`draft_features`: 4), so each is a non-negative least-squares problem over a small feature vector:

- `nonnegative_least_squares`: the exact solver (Lawson-Hanson on the normal equations);
- `ForgettingLeastSquares`: recursive least squares with exponential forgetting, in information form;
- `OnlineCostFit`: the controller's per-cost-profile fit (verify, draft and overhead), kept in Redis;
- `fit_profile`: the one-shot fit of a worker's startup profile (its hello).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from smartspec.core.cost_model import (
    DEFAULT_COST_MODEL,
    DRAFT_FIELDS,
    VERIFY_FIELDS,
    CostModel,
    draft_features,
    verify_features,
)


def nonnegative_least_squares(gram: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """argmin_{x >= 0} x'Gx - 2 m'x for a small positive-definite G, exactly.

    Lawson-Hanson's active set method on the normal equations: free the coordinate whose
    gradient most wants to rise, solve on the free set, step back to the boundary when a free
    coordinate would go negative. It ends at the KKT point, which for a positive-definite G is
    the unique optimum. With 7 coefficients that is a handful of tiny solves per call (the
    controller calls it every step), where trying all 2^7 supports took ~1 ms. G is rescaled to
    a unit diagonal first, so one tolerance serves coefficients of very different units.
    """
    size = len(moment)
    scale = 1.0 / np.sqrt(np.maximum(np.diag(gram), 1e-300))  # [d]
    g = gram * scale[:, None] * scale[None, :]  # [d, d], unit diagonal
    m = moment * scale  # [d]
    tolerance = 1e-10 * max(1.0, float(np.abs(m).max(initial=0.0)))
    x = np.zeros(size)
    free = np.zeros(size, dtype=bool)
    for _ in range(4 * size + 8):  # Lawson-Hanson ends within a few passes; the bound only guards cycling
        ascent = m - g @ x  # minus half the gradient: [d]
        wanting = ~free & (ascent > tolerance)
        if not wanting.any():
            return x * scale
        free[int(np.argmax(np.where(wanting, ascent, -np.inf)))] = True
        for _ in range(size):
            idx = np.flatnonzero(free)
            trial = np.zeros(size)
            try:
                trial[idx] = np.linalg.solve(g[np.ix_(idx, idx)], m[idx])
            except np.linalg.LinAlgError:
                return _nonnegative_least_squares_by_supports(gram, moment)
            if (trial[idx] > 0).all():
                x = trial
                break
            blocking = free & (trial <= 0)
            step = float(np.min(x[blocking] / (x[blocking] - trial[blocking])))
            x = x + step * (trial - x)
            free &= x > tolerance
            x[~free] = 0.0
    return _nonnegative_least_squares_by_supports(gram, moment)


def _nonnegative_least_squares_by_supports(gram: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """The same optimum by brute force (every support's unconstrained minimiser, best feasible
    one wins): 2^d solves, the fallback for a singular G and the reference in the tests."""
    size = len(moment)
    best, best_value = np.zeros(size), 0.0  # the empty support: x = 0, objective 0
    for support_size in range(1, size + 1):
        for support in itertools.combinations(range(size), support_size):
            idx = list(support)
            try:
                part = np.linalg.solve(gram[np.ix_(idx, idx)], moment[idx])
            except np.linalg.LinAlgError:
                continue
            if np.any(part < 0):
                continue
            value = -float(moment[idx] @ part)  # at the restricted optimum x'Gx = m'x
            if value < best_value - 1e-12 * max(1.0, abs(best_value)):
                best = np.zeros(size)
                best[idx] = part
                best_value = value
    return best


@dataclass
class ForgettingLeastSquares:
    """Recursive least squares with exponential forgetting, kept in information form.

    State is the weighted Gram matrix G = sum_t lam^(n-t) w_t x_t x_t' and moment
    m = sum_t lam^(n-t) w_t x_t y_t, seeded with a prior (G0, G0 theta0). This is the same
    estimator as the covariance-form RLS update, but with d <= 7 a direct solve each time is
    cheap, numerically steadier than propagating P = G^-1, and lets the non-negativity be an
    exact projection (`nonnegative_least_squares`) instead of a clip. A small floor of the prior
    (`prior_floor` x G0) is never forgotten, so directions the data never excites (c_spec while
    every k = 0, say) stay pinned near the prior instead of going singular.

    Why not a windowed fit: the window's samples would have to live in Redis and be refit each
    step; this state is two small arrays whatever the history length.
    """

    gram: np.ndarray  # [d, d]
    moment: np.ndarray  # [d]
    prior_gram: np.ndarray  # [d, d]
    prior_theta: np.ndarray  # [d]
    forgetting: float
    prior_floor: float = 1e-3

    @classmethod
    def seeded(cls, prior_theta: np.ndarray, prior_gram: np.ndarray, forgetting: float,
               prior_floor: float = 1e-3) -> "ForgettingLeastSquares":
        return cls(
            gram=prior_gram.copy(),
            moment=prior_gram @ prior_theta,
            prior_gram=prior_gram.copy(),
            prior_theta=prior_theta.copy(),
            forgetting=forgetting,
            prior_floor=prior_floor,
        )

    def observe(self, features: np.ndarray, target: float, weight: float) -> None:
        self.gram = self.forgetting * self.gram + weight * np.outer(features, features)
        self.moment = self.forgetting * self.moment + weight * features * target

    def solution(self) -> np.ndarray:
        gram = self.gram + self.prior_floor * self.prior_gram
        moment = self.moment + self.prior_floor * (self.prior_gram @ self.prior_theta)
        return nonnegative_least_squares(gram, moment)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gram": self.gram.tolist(),
            "moment": self.moment.tolist(),
            "prior_gram": self.prior_gram.tolist(),
            "prior_theta": self.prior_theta.tolist(),
            "forgetting": self.forgetting,
            "prior_floor": self.prior_floor,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ForgettingLeastSquares":
        return cls(
            gram=np.asarray(data["gram"], dtype=np.float64),
            moment=np.asarray(data["moment"], dtype=np.float64),
            prior_gram=np.asarray(data["prior_gram"], dtype=np.float64),
            prior_theta=np.asarray(data["prior_theta"], dtype=np.float64),
            forgetting=float(data["forgetting"]),
            prior_floor=float(data["prior_floor"]),
        )


def _relative_weight(step_ms: float) -> float:
    """Step-time noise is roughly multiplicative, and what the policy needs is the step time to a
    few percent, so both parts weight a step by 1/(its draft + verify time)^2: relative error of the
    step. (Weighting the draft part by its own time would let a near-zero n-gram draft dominate.)
    The 1 ms floor keeps an empty step from getting infinite weight. (Weighting by the measured
    rather than the predicted time biases the fit low by about noise^2, 0.25% at 5% noise.)
    """
    return 1.0 / max(step_ms, 1.0) ** 2


def _prior_gram(typical_features: np.ndarray, typical_ms: float, weight: float) -> np.ndarray:
    """A diagonal prior worth `weight` typical steps in each coefficient's direction (in the same
    relative units as `_relative_weight`, so "weight" really means steps)."""
    scale = np.maximum(np.abs(typical_features), 1e-9) / max(typical_ms, 1.0)
    return weight * np.diag(scale**2)


@dataclass
class OnlineCostFit:
    """The per-cost-profile online fit: verify part, draft part and overhead learned separately.

    `observe` once per measured step, `model()` for the current non-negative coefficients,
    `to_dict` / `from_dict` to keep it in Redis as JSON.
    """

    verify: ForgettingLeastSquares
    draft: ForgettingLeastSquares
    overhead_sum: float  # forgetting-weighted sum of measured overhead (total - draft - verify)
    overhead_count: float
    forgetting: float
    steps: int = 0

    @classmethod
    def create(
        cls,
        prior: CostModel = DEFAULT_COST_MODEL,
        *,
        prior_weight: float = 5.0,
        forgetting: float = 0.99,
        typical_batch: int = 8,
        typical_k: int = 4,
        typical_context: int = 512,
    ) -> "OnlineCostFit":
        """Start from `prior`, which counts as `prior_weight` typical steps before it is forgotten.

        `forgetting` in (0, 1]: each step multiplies past evidence by it (0.99 ~ the last 100
        steps matter). The typical batch only scales the prior so its weight means "steps".
        """
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        if prior_weight <= 0:
            raise ValueError(f"prior_weight must be > 0, got {prior_weight}")
        ks = np.full(typical_batch, float(typical_k))
        contexts = np.full(typical_batch, float(typical_context))
        typical_ms = prior.draft_ms(ks, contexts) + prior.verify_ms(ks, contexts)
        return cls(
            verify=ForgettingLeastSquares.seeded(
                prior.verify_coefficients,
                _prior_gram(verify_features(ks, contexts), typical_ms, prior_weight),
                forgetting,
            ),
            draft=ForgettingLeastSquares.seeded(
                prior.draft_coefficients,
                _prior_gram(draft_features(ks, contexts), typical_ms, prior_weight),
                forgetting,
            ),
            overhead_sum=prior_weight * prior.overhead_ms,
            overhead_count=prior_weight,
            forgetting=forgetting,
        )

    def observe(self, ks, contexts, prefills, draft_ms: float, verify_ms: float,
                total_ms: float | None = None) -> None:
        """One measured step: per-request k_i, context_i, prefill_i, and its measured times."""
        for name, value in (("draft_ms", draft_ms), ("verify_ms", verify_ms)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if len(ks) == 0:
            return
        weight = _relative_weight(draft_ms + verify_ms)
        self.verify.observe(verify_features(ks, contexts, prefills), verify_ms, weight)
        self.draft.observe(draft_features(ks, contexts), draft_ms, weight)
        if total_ms is not None and math.isfinite(total_ms):
            self.overhead_sum = self.forgetting * self.overhead_sum + max(0.0, total_ms - draft_ms - verify_ms)
            self.overhead_count = self.forgetting * self.overhead_count + 1.0
        self.steps += 1

    def model(self) -> CostModel:
        verify = self.verify.solution()
        draft = self.draft.solution()
        overhead = self.overhead_sum / self.overhead_count if self.overhead_count > 0 else 0.0
        values = dict(zip(VERIFY_FIELDS, verify.tolist())) | dict(zip(DRAFT_FIELDS, draft.tolist()))
        return CostModel(**values, overhead_ms=max(0.0, overhead))

    def to_dict(self) -> dict[str, Any]:
        return {
            "terms": {"verify": list(VERIFY_FIELDS), "draft": list(DRAFT_FIELDS)},
            "verify": self.verify.to_dict(),
            "draft": self.draft.to_dict(),
            "overhead_sum": self.overhead_sum,
            "overhead_count": self.overhead_count,
            "forgetting": self.forgetting,
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OnlineCostFit":
        """Raises ValueError for a fit over other terms (one stored before the model changed):
        its matrices would be read against the wrong coefficients, so the caller reseeds."""
        terms = data.get("terms")
        expected = {"verify": list(VERIFY_FIELDS), "draft": list(DRAFT_FIELDS)}
        if terms != expected:
            raise ValueError(f"stored cost fit is over the terms {terms}, this model's are {expected}")
        return cls(
            verify=ForgettingLeastSquares.from_dict(data["verify"]),
            draft=ForgettingLeastSquares.from_dict(data["draft"]),
            overhead_sum=float(data["overhead_sum"]),
            overhead_count=float(data["overhead_count"]),
            forgetting=float(data["forgetting"]),
            steps=int(data["steps"]),
        )


def fit_profile(samples: Iterable[Any], prior: CostModel = DEFAULT_COST_MODEL,
                prior_weight: float = 1.0) -> CostModel:
    """Fit the hello's startup profile (ProfileSample-like objects: batch_size, speculation_length,
    context_tokens, draft_ms, verify_ms). No forgetting: the samples are one measurement campaign.

    A profile at one context length cannot tell c_fixed from c_kv; the (weak) prior settles it.
    """
    samples = list(samples)
    if not samples:
        return prior
    batches = [max(1, int(s.batch_size)) for s in samples]
    fit = OnlineCostFit.create(
        prior,
        prior_weight=prior_weight,
        forgetting=1.0,
        typical_batch=int(np.median(batches)),
        typical_k=max(1, int(np.median([s.speculation_length for s in samples]))),
        typical_context=max(1, int(np.median([s.context_tokens for s in samples]))),
    )
    for sample, batch in zip(samples, batches):
        ks = [int(sample.speculation_length)] * batch
        contexts = [int(sample.context_tokens)] * batch
        fit.observe(ks, contexts, None, draft_ms=float(sample.draft_ms), verify_ms=float(sample.verify_ms))
    return fit.model().replace(overhead_ms=prior.overhead_ms)

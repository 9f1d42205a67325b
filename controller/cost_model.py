"""Predicted step time of one batch, and how its coefficients are learned from measured steps.

    verify_ms = c_fixed + c_spec * [any k_i > 0] + c_tok * sum_i (k_i + 1 + prefill_i)
                + c_kv * sum_i context_i
    draft_ms  = sum over depths j = 1..max_i k_i of
                d_fixed + d_tok * #{i : k_i >= j} + d_kv * sum_{i : k_i >= j} context_i
              = d_fixed * max_i k_i + d_tok * sum_i k_i + d_kv * sum_i k_i * context_i
    step_ms   = draft_ms + verify_ms + overhead_ms

Both parts are linear in their coefficients, so each is a least-squares problem over a small
feature vector (`verify_features`: 4 numbers, `draft_features`: 3 numbers).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from smartspec.v1 import common_pb2

VERIFY_FIELDS = ("c_fixed_ms", "c_spec_ms", "c_tok_ms", "c_kv_ms")
DRAFT_FIELDS = ("d_fixed_ms", "d_tok_ms", "d_kv_ms")


class CostModelError(ValueError):
    """A coefficient is negative or not finite; `field` names it (maps to INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _as_batch(values: Sequence[float] | np.ndarray | None, like: np.ndarray) -> np.ndarray:
    if values is None:
        return np.zeros_like(like, dtype=np.float64)
    return np.broadcast_to(np.asarray(values, dtype=np.float64), like.shape)


def verify_features(ks, contexts, prefills=None) -> np.ndarray:
    """[1, any k>0, sum(k+1+prefill), sum context] per batch. ks, contexts: [..., B] -> [..., 4]."""
    k = np.asarray(ks, dtype=np.float64)  # k: [..., B]
    ctx = _as_batch(contexts, k)  # ctx: [..., B]
    pre = _as_batch(prefills, k)  # pre: [..., B]
    ones = np.ones(k.shape[:-1])
    speculating = (k > 0).any(axis=-1).astype(np.float64)
    query_tokens = (k + 1.0 + pre).sum(axis=-1)
    return np.stack([ones, speculating, query_tokens, ctx.sum(axis=-1)], axis=-1)


def draft_features(ks, contexts) -> np.ndarray:
    """[max k, sum k, sum k*context] per batch: ks, contexts: [..., B] -> [..., 3]."""
    k = np.asarray(ks, dtype=np.float64)  # k: [..., B]
    ctx = _as_batch(contexts, k)
    depth = k.max(axis=-1, initial=0.0)
    return np.stack([depth, k.sum(axis=-1), (k * ctx).sum(axis=-1)], axis=-1)


def _scalar_or_array(values: np.ndarray) -> float | np.ndarray:
    return float(values) if values.ndim == 0 else values


@dataclass(frozen=True)
class CostModel:
    """Coefficients of the predicted step time, all in milliseconds, all >= 0."""

    c_fixed_ms: float = 0.0
    c_spec_ms: float = 0.0
    c_tok_ms: float = 0.0
    c_kv_ms: float = 0.0
    d_fixed_ms: float = 0.0
    d_tok_ms: float = 0.0
    d_kv_ms: float = 0.0
    overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CostModelError(f.name, f"must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise CostModelError(f.name, f"must be finite and >= 0, got {value}")
            object.__setattr__(self, f.name, float(value))

    # -- prediction (ks, contexts, prefills: sequences of length B, or arrays [..., B]) --

    @property
    def verify_coefficients(self) -> np.ndarray:
        return np.array([getattr(self, name) for name in VERIFY_FIELDS])  # [4]

    @property
    def draft_coefficients(self) -> np.ndarray:
        return np.array([getattr(self, name) for name in DRAFT_FIELDS])  # [3]

    def verify_ms(self, ks, contexts, prefills=None) -> float | np.ndarray:
        return _scalar_or_array(verify_features(ks, contexts, prefills) @ self.verify_coefficients)

    def draft_ms(self, ks, contexts) -> float | np.ndarray:
        return _scalar_or_array(draft_features(ks, contexts) @ self.draft_coefficients)

    def predict_ms(self, ks, contexts, prefills=None) -> float | np.ndarray:
        """Whole step: draft + verify + overhead. A [N, B] input gives [N] predictions."""
        total = (
            verify_features(ks, contexts, prefills) @ self.verify_coefficients
            + draft_features(ks, contexts) @ self.draft_coefficients
            + self.overhead_ms
        )
        return _scalar_or_array(total)

    # -- (de)serialisation --

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CostModel":
        """Missing fields are 0 (as in proto3); unknown ones are an error, not silently dropped."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CostModelError(unknown[0], "unknown cost model field")
        return cls(**dict(data))

    def to_proto(self) -> common_pb2.CostModel:
        return common_pb2.CostModel(**self.to_dict())

    @classmethod
    def from_proto(cls, message: common_pb2.CostModel) -> "CostModel":
        return cls(**{f.name: getattr(message, f.name) for f in fields(cls)})

    def replace(self, **changes: float) -> "CostModel":
        return CostModel(**{**self.to_dict(), **changes})


# Fitted by hand to DESIGN.md's CPU measurements (SmolLM2-135M, fp32, 2 cores, 200 tokens of
# context): batch 1: 90 ms for one token, 160 ms verifying 9; batch 32: 250 ms for one token each,
# 1,050 ms for 9 each. Solving the verify formula through those four points gives c_tok ~ 2.94,
# c_spec ~ 46.5, c_kv ~ 0.0111, c_fixed ~ 84.8. The draft terms are zero: an n-gram lookup is free.
DEFAULT_COST_MODEL = CostModel(
    c_fixed_ms=84.84,
    c_spec_ms=46.45,
    c_tok_ms=2.944,
    c_kv_ms=0.01109,
    d_fixed_ms=0.0,
    d_tok_ms=0.0,
    d_kv_ms=0.0,
    overhead_ms=0.0,
)


# ---------------------------------------------------------------------------------------------
# Online fit
# ---------------------------------------------------------------------------------------------


def nonnegative_least_squares(gram: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """argmin_{x >= 0} x'Gx - 2 m'x for a small positive-definite G (d <= ~6), exactly.

    Every active set is tried: the optimum is the unconstrained minimiser on its own support,
    so the best feasible candidate over all 2^d supports is the global optimum. With d = 4 that
    is 16 tiny solves, cheaper and simpler than an iterative NNLS.
    """
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
    estimator as the covariance-form RLS update, but with d <= 4 a direct solve each time is
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
            "verify": self.verify.to_dict(),
            "draft": self.draft.to_dict(),
            "overhead_sum": self.overhead_sum,
            "overhead_count": self.overhead_count,
            "forgetting": self.forgetting,
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OnlineCostFit":
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
        fit.observe(ks, contexts, None, float(sample.draft_ms), float(sample.verify_ms))
    return fit.model().replace(overhead_ms=prior.overhead_ms)

"""Predicted step time of one batch, and how its coefficients are learned from measured steps.

B rows, row i speculating k_i tokens over context_i cached tokens (prefill_i prompt tokens to
prefill), W = max_i (k_i + 1) the padded query width, L = max_i context_i the padded key length:

    verify_ms = c_fixed + c_spec * [any k_i > 0] + c_spec_row * #{i : k_i > 0}
                + c_tok * sum_i (k_i + 1 + prefill_i) + c_kv * sum_i context_i
                + c_row * B + c_width * B * W * L
    draft_ms  = d_row * #{i : k_i > 0} + sum over depths j = 1..max_i k_i of
                (d_fixed + d_tok * #{i : k_i >= j} + d_kv * sum_{i : k_i >= j} context_i)
              = d_row * #{i : k_i > 0} + d_fixed * max_i k_i + d_tok * sum_i k_i
                + d_kv * sum_i k_i * context_i
    step_ms   = draft_ms + verify_ms + overhead_ms

Why each term (worker/engine.py, worker/model/llama.py): projections, MLP and lm_head run on the
real query tokens only (c_tok), but attention runs over the padded [B, W] queries against every
row's keys up to the longest row (c_width: B * W * L score cells), so the widest row makes every
row pay its width, and the widest context makes every row pay its length. A step with proposals
builds a wider mask and packs more logits (c_spec); each row with proposals is verified and rolled
back (c_spec_row); every row costs host bookkeeping (appending tokens, detokenising, the
proposer's look-ahead: c_row) and reading its KV (c_kv). The proposer is asked once per
speculating row (d_row) and runs once per depth (d_fixed: a draft model's forward).

Both parts are linear in their coefficients, so each is a least-squares problem over a small
feature vector (`verify_features`: 7 numbers, `draft_features`: 4 numbers).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from smartspec.v1 import common_pb2
from smartspec.core.errors import FieldError

VERIFY_FIELDS = ("c_fixed_ms", "c_spec_ms", "c_spec_row_ms", "c_tok_ms", "c_kv_ms", "c_row_ms", "c_width_ms")
DRAFT_FIELDS = ("d_fixed_ms", "d_row_ms", "d_tok_ms", "d_kv_ms")


class CostModelError(FieldError):
    """A coefficient is negative or not finite; `field` names it (maps to INVALID_ARGUMENT)."""


def _as_batch(values: Sequence[float] | np.ndarray | None, like: np.ndarray) -> np.ndarray:
    if values is None:
        return np.zeros_like(like, dtype=np.float64)
    return np.broadcast_to(np.asarray(values, dtype=np.float64), like.shape)


def padded_attention_cells(ks, contexts) -> np.ndarray:
    """B * max_i (k_i + 1) * max_i context_i: the score cells attention computes, padding included.
    ks, contexts: [..., B] -> [...]. 0 for an empty batch."""
    k = np.asarray(ks, dtype=np.float64)  # k: [..., B]
    ctx = _as_batch(contexts, k)  # ctx: [..., B]
    rows = k.shape[-1]
    if rows == 0:
        return np.zeros(k.shape[:-1])
    return rows * (k.max(axis=-1) + 1.0) * ctx.max(axis=-1)


def verify_features(ks, contexts, prefills=None) -> np.ndarray:
    """[1, any k>0, #k>0, sum(k+1+prefill), sum context, B, B*W*L] per batch (order of
    VERIFY_FIELDS). ks, contexts, prefills: [..., B] -> [..., 7]."""
    k = np.asarray(ks, dtype=np.float64)  # k: [..., B]
    ctx = _as_batch(contexts, k)  # ctx: [..., B]
    pre = _as_batch(prefills, k)  # pre: [..., B]
    ones = np.ones(k.shape[:-1])  # [...]
    speculating = k > 0  # [..., B]
    return np.stack([
        ones,
        speculating.any(axis=-1).astype(np.float64),
        speculating.sum(axis=-1).astype(np.float64),
        (k + 1.0 + pre).sum(axis=-1),
        ctx.sum(axis=-1),
        ones * k.shape[-1],
        padded_attention_cells(k, ctx),
    ], axis=-1)


def draft_features(ks, contexts) -> np.ndarray:
    """[max k, #k>0, sum k, sum k*context] per batch (order of DRAFT_FIELDS): [..., B] -> [..., 4]."""
    k = np.asarray(ks, dtype=np.float64)  # k: [..., B]
    ctx = _as_batch(contexts, k)
    depth = k.max(axis=-1, initial=0.0)
    return np.stack([depth, (k > 0).sum(axis=-1).astype(np.float64), k.sum(axis=-1), (k * ctx).sum(axis=-1)],
                    axis=-1)


def _scalar_or_array(values: np.ndarray) -> float | np.ndarray:
    return float(values) if values.ndim == 0 else values


@dataclass(frozen=True)
class CostModel:
    """Coefficients of the predicted step time, all in milliseconds, all >= 0."""

    c_fixed_ms: float = 0.0  # per step
    c_spec_ms: float = 0.0  # per step with any k_i > 0
    c_tok_ms: float = 0.0  # per query token (k_i + 1 + prefill_i)
    c_kv_ms: float = 0.0  # per context token, summed over rows
    d_fixed_ms: float = 0.0  # per draft depth (max_i k_i of them)
    d_tok_ms: float = 0.0  # per proposed token
    d_kv_ms: float = 0.0  # per proposed token per context token of its row
    overhead_ms: float = 0.0  # per step, outside draft + verify (mean of what the worker measured)
    c_spec_row_ms: float = 0.0  # per row with k_i > 0 (verify and rollback of its proposals)
    c_row_ms: float = 0.0  # per row (host bookkeeping: sampling, appending, detokenising)
    c_width_ms: float = 0.0  # per padded attention cell: B * max_i (k_i + 1) * max_i context_i
    d_row_ms: float = 0.0  # per row the proposer is asked (k_i > 0)

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
        return np.array([getattr(self, name) for name in VERIFY_FIELDS])  # [7]

    @property
    def draft_coefficients(self) -> np.ndarray:
        return np.array([getattr(self, name) for name in DRAFT_FIELDS])  # [4]

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


# Fitted to steps a real engine measured on this machine class (SmolLM2-135M-Instruct, fp32, 2 CPU
# cores, 2 torch threads, prompt lookup made to offer exactly k), batch 1-32 x six compositions:
# two runs at 150-600 tokens of context and one at 800-2,000 (812 steps, no forgetting), rounded:
#   scripts/validate_cost_model.py --fit-default docs/bench/cost-model-validation{,-rerun,-long}.json
# What they show: a step costs ~45 ms before any token; each real query token ~1.3 ms (projections,
# MLP, lm_head); the padded attention 0.53 us per cell (one row at k = 8 among 12 rows at k = 0
# with 400 tokens of context: +20 ms of width beside +11 ms for its 8 tokens); ~3.7 us per row per
# context token; a step with proposals ~5 ms more and ~0.5 ms per speculating row. Other per-row
# host work (verification is batched) and prompt lookup cost next to nothing. The same machine ran
# 10-15% faster or slower from one run to the next (the online fit follows that). Not captured
# (BLAS picks kernels by the token count): one token is ~15 ms faster than the line through the
# rest, 2-3 tokens ~15-25 ms slower; see BENCHMARKS.md, "Cost model validation".
DEFAULT_COST_MODEL = CostModel(
    c_fixed_ms=44.6,
    c_spec_ms=5.48,
    c_spec_row_ms=0.483,
    c_tok_ms=1.34,
    c_kv_ms=0.00367,
    c_row_ms=0.00935,
    c_width_ms=0.000528,
    d_fixed_ms=0.00248,
    d_row_ms=0.0106,
    d_tok_ms=0.0,
    d_kv_ms=0.0,
    overhead_ms=0.0947,
)


# ---------------------------------------------------------------------------------------------
# Online fit
# ---------------------------------------------------------------------------------------------


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
        fit.observe(ks, contexts, None, float(sample.draft_ms), float(sample.verify_ms))
    return fit.model().replace(overhead_ms=prior.overhead_ms)

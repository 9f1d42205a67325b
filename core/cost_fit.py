"""Learning the cost model's coefficients from measured steps (core/cost_model.py has the formula).

Both parts of the step time are linear in their coefficients (`verify_features`: 7 numbers,
`draft_features`: 4), so each is a non-negative least-squares problem over a small feature vector:

- `nonnegative_least_squares` (core/nnls.py): the exact solver (Lawson-Hanson on the normal equations);
- `ForgettingLeastSquares`: recursive least squares with exponential forgetting, in information form;
- `OnlineCostFit`: the controller's per-cost-profile fit (verify, draft and overhead), kept in Redis;
- `DraftCostFit`: one costly proposer's own terms, when a worker chooses proposers per request;
- `fit_profile`: the one-shot fit of a worker's startup profile (its hello).

Beside the line, the online fit learns the cost model's per-count table (`token_count_ms`: what a
step of N query tokens costs beyond the line; core/token_count_fit.py), backfitted: the line is
fitted to the measured verify time less the table's entry for the step's N, the table to the
measured time less the line.

The machine's speed of the moment: a shared CPU (or a GPU under its neighbours' load) runs the
same batch 30% faster or slower from one minute to the next. The coefficients follow that only as
fast as the least squares forget (~100 steps), and only in the directions recent steps excite: after
a stretch of plain steps the terms only speculation pays (c_spec, per-row verification) are still
priced at the old speed, so the next speculative step was predicted 10-25% cheap on a machine that
had slowed. So the online fit keeps one more number, `speed`: every prediction is the fitted model
times it, it follows measured / predicted with weight `speed_weight` per step (each step read as at
most SPEED_STEP_RATIO either way), and the sums are fed the measured times divided by it, so they
learn the shape of the cost at a steady speed.

Robustness: the online fit is shared by every worker of a cost profile, so one bad step (a GC pause,
a stalled machine, a broken or hostile worker) must move it a bounded amount. Each step is read
against the current model's prediction for that very batch: a measured part (draft, verify) more
than `clip` predicted steps above its prediction counts as exactly that much (residual clipping, a
Huber-like loss in relative units), a step is weighted by the larger of its predicted and its
(clipped) measured time, never by a tiny measured one alone (a "0 ms" step cannot outweigh a
hundred real ones), and the overhead sample is clipped on its own scale (`OVERHEAD_FLOOR`). A real change of hardware
still comes through: every step may move the prediction up by up to `clip` steps, so a machine
twice as slow is followed within a few steps. Arithmetic never raises: a step whose numbers
overflow the sums is skipped, and a solution that is not finite falls back to the prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from smartspec.core.cost_model import (
    DEFAULT_COST_MODEL,
    DRAFT_FIELDS,
    VERIFY_FIELDS,
    CostModel,
    draft_features,
    token_count_correction,
    verify_features,
)
from smartspec.core.nnls import nonnegative_least_squares
from smartspec.core.token_count_fit import TokenCountResiduals


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
    # the coefficients the last solve left positive: the next solve's starting guess (not state:
    # any guess gives the same solution, so it is neither saved nor compared)
    _support: np.ndarray | None = field(default=None, repr=False, compare=False)

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
        self.gram, self.moment = self.updated(features, target, weight)

    def updated(self, features: np.ndarray, target: float, weight: float) -> tuple[np.ndarray, np.ndarray]:
        """(gram, moment) after observing one sample, without storing them."""
        with np.errstate(over="ignore", invalid="ignore"):
            gram = self.forgetting * self.gram + weight * np.outer(features, features)
            moment = self.forgetting * self.moment + weight * features * target
        return gram, moment

    def solution(self) -> np.ndarray:
        """The non-negative coefficients; the prior's where the sums give nothing finite."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            gram = self.gram + self.prior_floor * self.prior_gram
            moment = self.moment + self.prior_floor * (self.prior_gram @ self.prior_theta)
            if np.isfinite(gram).all() and np.isfinite(moment).all():
                theta = nonnegative_least_squares(gram, moment, self._support)
                if np.isfinite(theta).all():
                    self._support = theta > 0
                    return theta
        return np.maximum(np.nan_to_num(self.prior_theta, nan=0.0, posinf=0.0, neginf=0.0), 0.0)

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
        """Raises ValueError for state no fit produces (wrong shapes, non-finite numbers)."""
        try:
            fit = cls(
                gram=np.asarray(data["gram"], dtype=np.float64),
                moment=np.asarray(data["moment"], dtype=np.float64),
                prior_gram=np.asarray(data["prior_gram"], dtype=np.float64),
                prior_theta=np.asarray(data["prior_theta"], dtype=np.float64),
                forgetting=float(data["forgetting"]),
                prior_floor=float(data["prior_floor"]),
            )
        except OverflowError as exc:
            raise ValueError(f"stored least-squares state out of range: {exc}") from None
        size = fit.moment.shape
        if (len(size) != 1 or fit.gram.shape != size * 2 or fit.prior_gram.shape != size * 2
                or fit.prior_theta.shape != size):
            raise ValueError("stored least-squares state has inconsistent shapes")
        arrays = (fit.gram, fit.moment, fit.prior_gram, fit.prior_theta)
        if not all(np.isfinite(a).all() for a in arrays) or not math.isfinite(fit.forgetting + fit.prior_floor):
            raise ValueError("stored least-squares state is not finite")
        return fit


def _relative_weight(step_ms: float) -> float:
    """Step-time noise is roughly multiplicative, and what the policy needs is the step time to a
    few percent, so both parts weight a step by 1/(its draft + verify time)^2: relative error of the
    step. (Weighting the draft part by its own time would let a near-zero n-gram draft dominate.)
    The 1 ms floor keeps an empty step from getting infinite weight. The online fit passes the
    larger of the predicted and the (clipped) measured time, so a step claiming next to no time
    gets no more weight than its prediction gives it. Never raises (1 / x^2 of a huge x is 0).
    """
    inverse = 1.0 / max(step_ms, 1.0) if step_ms == step_ms else 0.0  # NaN: no weight
    return inverse * inverse


def _prior_gram(typical_features: np.ndarray, typical_ms: float, weight: float) -> np.ndarray:
    """A diagonal prior worth `weight` typical steps in each coefficient's direction (in the same
    relative units as `_relative_weight`, so "weight" really means steps)."""
    scale = np.maximum(np.abs(typical_features), 1e-9) / max(typical_ms, 1.0)
    return weight * np.diag(scale**2)


# One predicted step: a part may measure up to its prediction plus one whole predicted step and count
# in full; beyond that it counts as that much.
DEFAULT_CLIP = 1.0
# The overhead (total - draft - verify) is one number per step, usually well under a millisecond:
# a sample counts as at most the current mean plus `clip` times the larger of that mean, this share
# of the predicted step, and 1 ms.
OVERHEAD_FLOOR = 0.05
# The per-count table forgets per observation of its count, faster than the line forgets per step:
# an entry learnt while the line was still far off (a GPU worker starting from the CPU default)
# fades within ~60 visits of its count; a count seen often holds ~33 visits, so the shrinkage
# (token_count_fit.SHRINK_STEPS) leaves ~90% of its departure.
TOKEN_COUNT_FORGETTING = 0.97
# A step counts in its count's entry as at most this share of the line above or below it (the
# largest departures measured on the reference CPU: -33% at one token, +40% at two or three), so
# twenty absurd steps move a count's prediction by a bounded factor, as they move the line.
TOKEN_COUNT_BAND = 0.4


# The speed factor stays within these bounds of the fitted model; a step moves it as if it measured
# at most SPEED_STEP_RATIO times its prediction (or 1 / that): a drift of a few percent per step is
# followed at once, a run of absurd steps moves it ~2% each (a real change of hardware comes
# through the fit's own coefficients as well).
MIN_SPEED, MAX_SPEED = 0.1, 10.0
SPEED_STEP_RATIO = 1.25
DEFAULT_SPEED_WEIGHT = 0.1
# Any speed with the sums scaled to match predicts the same, so nothing pins the speed but this:
# each step it gives back this share of its distance from 1 (in log space), which the sums then
# learn where steps excite them. A change that lasts is carried by the speed for ~1 / this steps;
# noise cannot walk it far (~10% at 5% noise per step).
SPEED_REVERSION = 0.002


def follow_speed(speed: float, ratio: float, weight: float) -> float:
    """The speed after a step measured `ratio` x its prediction (made at `speed`): a moving average
    in log space, the ratio held within 1 / SPEED_STEP_RATIO .. SPEED_STEP_RATIO, drawn back toward
    1 by SPEED_REVERSION, the result within [MIN_SPEED, MAX_SPEED]."""
    ratio = min(max(ratio, 1.0 / SPEED_STEP_RATIO), SPEED_STEP_RATIO)
    return min(max(speed ** (1.0 - SPEED_REVERSION) * ratio**weight, MIN_SPEED), MAX_SPEED)


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
    # Residual clip, in predicted steps: a measured part counts as at most its prediction plus
    # `clip` times the predicted step (None: no clipping, measured-time weights, the plain fit).
    clip: float | None = DEFAULT_CLIP
    # What a step of N query tokens costs beyond the line (None: no table, the line alone, as a
    # startup profile is fitted).
    token_counts: TokenCountResiduals | None = None
    # The machine's speed of the moment: every prediction is the fitted model times `speed`, which
    # follows measured / predicted with this weight per step (None: no speed factor, 1). The sums
    # above hold the machine at speed 1.
    speed_weight: float | None = None
    speed: float = 1.0
    # The model of the current sums (not stored: derived), so a step's clipping reuses the
    # solution the previous step's model() already computed.
    _model: CostModel | None = field(default=None, repr=False, compare=False)

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
        clip: float | None = DEFAULT_CLIP,
        token_counts: bool = True,
        speed_weight: float | None = DEFAULT_SPEED_WEIGHT,
    ) -> "OnlineCostFit":
        """Start from `prior`, which counts as `prior_weight` typical steps before it is forgotten
        (its line: the per-count table starts empty; `token_counts=False`: no table at all).

        `forgetting` in (0, 1]: each step multiplies past evidence by it (0.99 ~ the last 100
        steps matter). The typical batch only scales the prior so its weight means "steps".
        """
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        if prior_weight <= 0:
            raise ValueError(f"prior_weight must be > 0, got {prior_weight}")
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a positive number of predicted steps or None, got {clip}")
        if speed_weight is not None and not 0.0 < speed_weight < 1.0:
            raise ValueError(f"speed_weight must be in (0, 1) or None, got {speed_weight}")
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
            clip=clip,
            token_counts=TokenCountResiduals(TOKEN_COUNT_FORGETTING) if token_counts else None,
            speed_weight=speed_weight,
        )

    def observe(self, ks, contexts, prefills, draft_ms: float, verify_ms: float,
                total_ms: float | None = None) -> None:
        """One measured step: per-request k_i, context_i, prefill_i, and its measured times.

        Raises ValueError only for times that are not measurements (NaN, infinite, negative);
        huge ones are clipped (see the module docstring), and a step whose numbers the sums cannot
        hold (features beyond float range) is skipped."""
        for name, value in (("draft_ms", draft_ms), ("verify_ms", verify_ms)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if len(ks) == 0:
            return
        with np.errstate(over="ignore", invalid="ignore"):
            verify_x = verify_features(ks, contexts, prefills)  # [7]
            draft_x = draft_features(ks, contexts)  # [4]
        if not (np.isfinite(verify_x).all() and np.isfinite(draft_x).all()):
            return
        draft_ms, verify_ms = float(draft_ms), float(verify_ms)
        overhead = None
        if total_ms is not None and math.isfinite(total_ms):
            overhead = max(0.0, float(total_ms) - draft_ms - verify_ms)
        reads_model = self.clip is not None or self.token_counts is not None or self.speed_weight is not None
        current = self.model() if reads_model else None
        count = float(verify_x[3])  # N: the step's query tokens
        entry = token_count_correction(current.token_count_ms, count) if current is not None else 0.0
        if current is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                line_verify = float(verify_x @ current.verify_coefficients)
                predicted_verify = line_verify + entry
                predicted_draft = float(draft_x @ current.draft_coefficients)
            if not (math.isfinite(predicted_verify) and math.isfinite(predicted_draft)):
                return
        if self.clip is None:
            weight = _relative_weight(draft_ms + verify_ms)
        else:
            band = self.clip * max(predicted_verify + predicted_draft, 1.0)
            verify_ms = min(verify_ms, predicted_verify + band)
            draft_ms = min(draft_ms, predicted_draft + band)
            weight = _relative_weight(max(predicted_verify + predicted_draft, draft_ms + verify_ms))
            if overhead is not None:  # a constant per step: clipped on its own scale (5% of a step at least)
                overhead = min(overhead, current.overhead_ms + self.clip * max(
                    current.overhead_ms, OVERHEAD_FLOOR * (predicted_verify + predicted_draft), 1.0))
        if self.speed_weight is not None:
            # the sums hold the machine at speed 1: this step's times in those units, then the speed
            # follows how far this step sat from the prediction (clipped times: one stall moves it
            # a bounded amount)
            predicted_ms = predicted_verify + predicted_draft
            measured_ms = verify_ms + draft_ms
            scale = self.speed
            verify_ms, draft_ms, entry = verify_ms / scale, draft_ms / scale, entry / scale
            line_verify /= scale
            if overhead is not None:
                overhead /= scale
            weight *= scale * scale
        verify_sums = self.verify.updated(verify_x, verify_ms - entry, weight)  # the line: what the table leaves
        draft_sums = self.draft.updated(draft_x, draft_ms, weight)
        if not all(np.isfinite(a).all() for a in (*verify_sums, *draft_sums)):
            return
        (self.verify.gram, self.verify.moment), (self.draft.gram, self.draft.moment) = verify_sums, draft_sums
        if self.token_counts is not None:
            # the table: what the line leaves, within TOKEN_COUNT_BAND of the line (a few samples
            # make an entry, so one absurd step must not be able to double a count's prediction)
            bound = TOKEN_COUNT_BAND * max(line_verify, 1.0)
            self.token_counts.observe(count, min(max(verify_ms - line_verify, -bound), bound))
        if overhead is not None:
            self.overhead_sum = self.forgetting * self.overhead_sum + overhead
            self.overhead_count = self.forgetting * self.overhead_count + 1.0
        if self.speed_weight is not None and predicted_ms > 0 and measured_ms > 0:
            self.speed = follow_speed(self.speed, measured_ms / predicted_ms, self.speed_weight)
        self.steps += 1
        self._model = None

    def model(self) -> CostModel:
        if self._model is None:
            verify = self.verify.solution()
            draft = self.draft.solution()
            overhead = self.overhead_sum / self.overhead_count if self.overhead_count > 0 else 0.0
            if not math.isfinite(overhead):
                overhead = 0.0
            speed = self.speed if self.speed_weight is not None else 1.0
            values = (dict(zip(VERIFY_FIELDS, (verify * speed).tolist()))
                      | dict(zip(DRAFT_FIELDS, (draft * speed).tolist())))
            table = (self.token_counts.table(-values["c_fixed_ms"] / speed, speed)
                     if self.token_counts is not None else ())
            self._model = CostModel(**values, overhead_ms=max(0.0, overhead * speed), token_count_ms=table)
        return self._model

    def to_dict(self) -> dict[str, Any]:
        return {
            "terms": {"verify": list(VERIFY_FIELDS), "draft": list(DRAFT_FIELDS)},
            "verify": self.verify.to_dict(),
            "draft": self.draft.to_dict(),
            "overhead_sum": self.overhead_sum,
            "overhead_count": self.overhead_count,
            "forgetting": self.forgetting,
            "steps": self.steps,
            "clip": self.clip,
            "token_counts": None if self.token_counts is None else self.token_counts.to_dict(),
            "speed_weight": self.speed_weight,
            "speed": self.speed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OnlineCostFit":
        """Raises ValueError for a fit over other terms (one stored before the model changed):
        its matrices would be read against the wrong coefficients, so the caller reseeds."""
        terms = data.get("terms")
        expected = {"verify": list(VERIFY_FIELDS), "draft": list(DRAFT_FIELDS)}
        if terms != expected:
            raise ValueError(f"stored cost fit is over the terms {terms}, this model's are {expected}")
        clip = data.get("clip", DEFAULT_CLIP)  # a fit stored before clipping existed gets it now
        if "token_counts" not in data:  # a fit stored before the per-count table existed: an empty one now
            token_counts: TokenCountResiduals | None = TokenCountResiduals(TOKEN_COUNT_FORGETTING)
        elif data["token_counts"] is None:
            token_counts = None
        else:
            token_counts = TokenCountResiduals.from_dict(data["token_counts"], TOKEN_COUNT_FORGETTING)
        fit = cls(
            verify=ForgettingLeastSquares.from_dict(data["verify"]),
            draft=ForgettingLeastSquares.from_dict(data["draft"]),
            overhead_sum=float(data["overhead_sum"]),
            overhead_count=float(data["overhead_count"]),
            forgetting=float(data["forgetting"]),
            steps=int(data["steps"]),
            clip=None if clip is None else float(clip),
            token_counts=token_counts,
            # a fit stored before the speed factor existed gets one now, at speed 1
            speed_weight=(DEFAULT_SPEED_WEIGHT if "speed_weight" not in data else
                          None if data["speed_weight"] is None else float(data["speed_weight"])),
            speed=float(data.get("speed", 1.0)),  # a fit stored before the speed factor: speed 1
        )
        if not (fit.speed_weight is None or 0.0 < fit.speed_weight < 1.0) or not (
                math.isfinite(fit.speed) and MIN_SPEED <= fit.speed <= MAX_SPEED):
            raise ValueError("stored cost fit has a bad speed factor")
        if not (math.isfinite(fit.overhead_sum) and math.isfinite(fit.overhead_count)
                and (fit.clip is None or (math.isfinite(fit.clip) and fit.clip > 0))):
            raise ValueError("stored cost fit has non-finite overhead sums or a bad clip")
        return fit


@dataclass
class DraftCostFit:
    """One costly proposer's own time (its `draft_features` terms only), learned from its own calls.

    A worker choosing between proposers per request (worker/proposers/choice.py) times each member's
    `propose` separately, so a draft model's per-depth and per-token cost is fitted on the rows it
    drafted, not blended with rows prompt lookup filled for free; the step's verify part stays with
    the planner's cost model. Unlike the shared OnlineCostFit, every sample is this worker's own
    measurement of one proposer at one scale, so samples weigh the same (no relative weights, no
    clipping) and the prior counts as `prior_weight` calls in each coefficient's direction (one:
    the profile is a guess at the real calls' shapes): a draft model seeded with a cost near zero
    (no startup profile) is priced within ~10% after a dozen of its calls, not hundreds."""

    draft: ForgettingLeastSquares
    steps: int = 0
    _model: CostModel | None = field(default=None, repr=False, compare=False)  # solved once per call observed

    @classmethod
    def create(cls, prior: CostModel, *, prior_weight: float = 1.0, forgetting: float = 0.99,
               typical_batch: int = 8, typical_k: int = 4, typical_context: int = 512) -> "DraftCostFit":
        x = draft_features(np.full(typical_batch, float(typical_k)), np.full(typical_batch, float(typical_context)))
        prior_gram = prior_weight * np.diag(np.maximum(np.abs(x), 1e-9) ** 2)  # [4, 4]: prior_weight calls
        return cls(ForgettingLeastSquares.seeded(prior.draft_coefficients, prior_gram, forgetting))

    def observe(self, ks, contexts, draft_ms: float) -> None:
        """One call of the proposer: k_i and context_i of the rows it drafted, and its measured ms."""
        if len(ks) == 0 or not math.isfinite(draft_ms) or draft_ms < 0:
            return
        with np.errstate(over="ignore", invalid="ignore"):
            x = draft_features(ks, contexts)  # [4]
        if np.isfinite(x).all():
            self.draft.observe(x, float(draft_ms), 1.0)
            self.steps += 1
            self._model = None

    def model(self) -> CostModel:
        """The fitted d_* terms (every c_* term 0: this is the proposer's time alone). The planner
        asks every step; the fit changes only when the proposer ran, so it is solved then."""
        if self._model is None:
            self._model = CostModel(**dict(zip(DRAFT_FIELDS, self.draft.solution().tolist())))
        return self._model


def attended_context(context_after, accepted, prefill) -> np.ndarray:
    """[B] context each row's step attended over: the context after the step, less what it added
    (its accepted proposals, its own token, its prefill chunk); the cost model's context_i."""
    added = np.asarray(accepted) + 1 + np.asarray(prefill)
    return np.maximum(0, np.asarray(context_after) - added)


def fit_profile(samples: Iterable[Any], prior: CostModel = DEFAULT_COST_MODEL,
                prior_weight: float = 1.0) -> CostModel:
    """Fit the hello's startup profile (ProfileSample-like objects: batch_size, speculation_length,
    context_tokens, draft_ms, verify_ms). No forgetting: the samples are one measurement campaign.

    A profile at one context length cannot tell c_fixed from c_kv; the (weak) prior settles it.
    The samples are fitted as measured (no residual clipping: they are one campaign, each timed as
    the median of several repeats, and may rightly sit far from the prior, e.g. on a GPU).
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
        clip=None,
        token_counts=False,   # one campaign at a few counts: the line alone seeds the online fit
        speed_weight=None,    # one campaign: no drift to follow
    )
    for sample, batch in zip(samples, batches):
        ks = [int(sample.speculation_length)] * batch
        contexts = [int(sample.context_tokens)] * batch
        fit.observe(ks, contexts, None, draft_ms=float(sample.draft_ms), verify_ms=float(sample.verify_ms))
    return fit.model().replace(overhead_ms=prior.overhead_ms)

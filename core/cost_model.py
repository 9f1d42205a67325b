"""Predicted step time of one batch (core/cost_fit.py learns its coefficients from measured steps).

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
feature vector (`verify_features`: 7 numbers, `draft_features`: 4 numbers): see core/cost_fit.py.

What no line can see: the kernels a matrix product runs depend on how many rows it has, i.e. on
the step's query token count N = sum_i (k_i + 1 + prefill_i). On the reference CPU a one-token
step is ~15 ms faster than the line through its neighbours, 2-8 tokens sit on a plateau, and a
step of 10-14 plain rows costs as much as one of 20-28 tokens (BLAS blocking; BENCHMARKS.md §7);
on a GPU, CUDA-graph padding makes the same shape by design (tokens up to the captured size are
free). So verify_ms also carries a learned table, `token_count_ms[N]`, added to the line for a step
of exactly N query tokens (N <= TOKEN_COUNT_LIMIT; beyond the table the line alone: past a few
dozen rows the products are close to linear). Entries may be negative but never below -c_fixed,
so no prediction is negative (core/token_count_fit.py learns them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

from smartspec.v1 import common_pb2
from smartspec.core.errors import FieldError

VERIFY_FIELDS = ("c_fixed_ms", "c_spec_ms", "c_spec_row_ms", "c_tok_ms", "c_kv_ms", "c_row_ms", "c_width_ms")
DRAFT_FIELDS = ("d_fixed_ms", "d_row_ms", "d_tok_ms", "d_kv_ms")
# The largest query token count the per-count table (`CostModel.token_count_ms`) may describe.
TOKEN_COUNT_LIMIT = 64


class CostModelError(FieldError):
    """A coefficient is negative or not finite; `field` names it (maps to INVALID_ARGUMENT)."""


def _float(value: Any) -> float:
    """float(value), or +-inf for an int beyond float range (never OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _floats(values: Any) -> np.ndarray:
    """`values` as a float64 array; Python ints beyond float range become +-inf instead of raising.
    (Predictions of such batches are inf: the arithmetic here never raises, whatever it is given.)"""
    try:
        return np.asarray(values, dtype=np.float64)
    except OverflowError:
        return np.vectorize(_float, otypes=[np.float64])(np.asarray(values, dtype=object))


def _as_batch(values: Sequence[float] | np.ndarray | None, like: np.ndarray) -> np.ndarray:
    if values is None:
        return np.zeros_like(like, dtype=np.float64)
    return np.broadcast_to(_floats(values), like.shape)


def padded_attention_cells(ks, contexts) -> np.ndarray:
    """B * max_i (k_i + 1) * max_i context_i: the score cells attention computes, padding included.
    ks, contexts: [..., B] -> [...]. 0 for an empty batch."""
    k = _floats(ks)  # k: [..., B]
    ctx = _as_batch(contexts, k)  # ctx: [..., B]
    rows = k.shape[-1]
    if rows == 0:
        return np.zeros(k.shape[:-1])
    with np.errstate(over="ignore", invalid="ignore"):
        return rows * (k.max(axis=-1) + 1.0) * ctx.max(axis=-1)


def token_count_correction(table: Sequence[float] | np.ndarray, counts) -> float | np.ndarray:
    """table[N] for each query token count N within the table, 0 beyond it (or where N is not a
    whole number of tokens). counts: [...] -> [...]."""
    n = _floats(counts)  # [...]
    table = np.asarray(table, dtype=np.float64)  # [T]
    if table.size == 0:
        return _scalar_or_array(np.zeros_like(n))
    with np.errstate(invalid="ignore"):
        inside = (n >= 0) & (n < table.size) & (n == np.floor(n))
        index = np.where(inside, n, 0).astype(np.int64)
    return _scalar_or_array(np.where(inside, table[index], 0.0))


def verify_features(ks, contexts, prefills=None) -> np.ndarray:
    """[1, any k>0, #k>0, sum(k+1+prefill), sum context, B, B*W*L] per batch (order of
    VERIFY_FIELDS). ks, contexts, prefills: [..., B] -> [..., 7]."""
    k = _floats(ks)  # k: [..., B]
    ctx = _as_batch(contexts, k)  # ctx: [..., B]
    pre = _as_batch(prefills, k)  # pre: [..., B]
    ones = np.ones(k.shape[:-1])  # [...]
    speculating = k > 0  # [..., B]
    with np.errstate(over="ignore", invalid="ignore"):
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
    k = _floats(ks)  # k: [..., B]
    ctx = _as_batch(contexts, k)
    with np.errstate(over="ignore", invalid="ignore"):
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
    # added to verify_ms of a step of exactly N query tokens, index N (see the module docstring)
    token_count_ms: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "token_count_ms":
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CostModelError(f.name, f"must be a number, got {type(value).__name__}")
            number = _float(value)
            if not math.isfinite(number) or number < 0:
                raise CostModelError(f.name, f"must be finite and >= 0, got {number}")
            object.__setattr__(self, f.name, number)
        object.__setattr__(self, "token_count_ms", self._checked_table(self.token_count_ms))

    def _checked_table(self, values: Any) -> tuple[float, ...]:
        if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
            raise CostModelError("token_count_ms", f"must be a list of numbers, got {type(values).__name__}")
        table = []
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CostModelError("token_count_ms", f"must hold numbers, got {type(value).__name__}")
            table.append(_float(value))
        if len(table) > TOKEN_COUNT_LIMIT + 1:
            raise CostModelError("token_count_ms", f"at most {TOKEN_COUNT_LIMIT + 1} entries, got {len(table)}")
        for number in table:
            # never below -c_fixed: the line is at least c_fixed, so no verify prediction is negative
            if not math.isfinite(number) or number < -self.c_fixed_ms:
                raise CostModelError("token_count_ms", f"entries must be finite and >= -c_fixed_ms "
                                                       f"({-self.c_fixed_ms}), got {number}")
        return tuple(table)

    # -- prediction (ks, contexts, prefills: sequences of length B, or arrays [..., B]) --

    @property
    def verify_coefficients(self) -> np.ndarray:
        return np.array([getattr(self, name) for name in VERIFY_FIELDS])  # [7]

    @property
    def draft_coefficients(self) -> np.ndarray:
        return np.array([getattr(self, name) for name in DRAFT_FIELDS])  # [4]

    # Predictions never raise: a batch beyond float range predicts inf (numpy's overflow is silenced).
    def verify_ms(self, ks, contexts, prefills=None) -> float | np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            features = verify_features(ks, contexts, prefills)  # [..., 7]
            return _scalar_or_array(features @ self.verify_coefficients + self.token_count_term(features))

    def token_count_term(self, features: np.ndarray) -> np.ndarray:
        """The per-count table's share of verify_ms for `verify_features` rows [..., 7] -> [...]."""
        if not self.token_count_ms:
            return np.zeros(features.shape[:-1])
        return np.asarray(token_count_correction(self.token_count_ms, features[..., 3]))

    def draft_ms(self, ks, contexts) -> float | np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return _scalar_or_array(draft_features(ks, contexts) @ self.draft_coefficients)

    def predict_ms(self, ks, contexts, prefills=None) -> float | np.ndarray:
        """Whole step: draft + verify + overhead. A [N, B] input gives [N] predictions."""
        with np.errstate(over="ignore", invalid="ignore"):
            return self.verify_ms(ks, contexts, prefills) + self.draft_ms(ks, contexts) + self.overhead_ms

    # -- (de)serialisation --

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every float, and the controller sends a model every step.
        data: dict[str, Any] = {name: getattr(self, name) for name in _FIELD_NAMES}
        data["token_count_ms"] = list(self.token_count_ms)
        return data

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
        values: dict[str, Any] = {name: getattr(message, name) for name in _FIELD_NAMES}
        return cls(**values, token_count_ms=tuple(message.token_count_ms))

    def replace(self, **changes: Any) -> "CostModel":
        return CostModel(**{**self.to_dict(), **changes})


_FIELD_NAMES = tuple(f.name for f in fields(CostModel) if f.name != "token_count_ms")  # the scalar ones


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


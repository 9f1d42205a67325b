"""Exact goodput maximisation over, per request, which proposer to ask and for how many tokens.

    maximise  G(p, k) = sum_i E_i(p_i, k_i) / T(p, k)   over p_i in {0..P-1}, k_i in {0..cap_ip}
    E_i(p, k) = 1 + f_ip (a_ip + ... + a_ip^k)
    T(p, k)   = base + sum_i f_ip_i (w_ip_i k_i + s_ip_i [k_i > 0])
                + verify_depth(max_i k_i) + sum_p d_fixed_p * max_{i : p_i = p} k_i

with a_ip the chance that proposer p's proposals for row i are accepted and f_ip the share of
asked-for positions it fills (as in optimizer.py). The verifier is shared: base (T at k = 0) and
verify_depth(m) = c_spec [m > 0] + c_width * B * L * m come from `verify_cost`'s c_* terms, as do
the verify parts of a row's own terms. Each proposer brings its own draft terms (its d_* fields):
w_ip = c_tok + d_tok_p + d_kv_p * context_i, s_ip = c_spec_row + d_row_p, and d_fixed_p per depth
of the rows that use it (a draft model runs once per depth for all of its rows; model-free
proposers have d_fixed = 0). As in optimizer.py, a row's own terms scale with f_ip and the depth
terms are charged on the plan. A pair the proposer cannot serve (not `available`, or cap 0) only
allows k = 0, which is the same for every proposer: E = 1, no cost, so k = 0 is reported as p = -1.
Ties go to the smaller k, then to the lower proposer index (less compute for the same goodput).

Why the search below is exact. The rows interact only through maxima: the shared verify depth
depends on the largest k in the batch, and each proposer with d_fixed > 0 adds a cost that depends
on the largest k among its own rows; everything else is a sum of per-row terms. So fix a cap tuple
(m for the whole batch, m_d <= m for each depth-costing proposer d) and charge those maxima as if
they were reached: the rows then decouple, and each picks its best (p, k) under the caps (k <= m
for a free proposer, k <= m_d for d) on its own. A plan whose true maxima lie below the charged
caps is only charged too much, never too little, and every plan is charged exactly under the tuple
equal to its own maxima, which is among those tried; so the best over all tuples is the true
optimum of sum_i E_i - lambda T for that lambda. Dinkelbach (as in optimize_goodput) turns that
inner maximisation into the ratio's optimum: start at lambda = G(0), set lambda to the goodput of
each round's argmax until it stops growing. With one proposer this is optimize_goodput, k for k.

Cost: a free proposer needs no cap of its own, so there are (K+1)^(1 + #depth proposers) tuples
(81 for one draft model at K = 8), each a sum over B of a per-row maximum that a running maximum
along k gives for all caps at once. Only proposers with d_fixed > 0 that some row can use are
enumerated; more than MAX_DEPTH_PROPOSERS of them is refused rather than silently slow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from smartspec.core.cost_model import CostModel
from smartspec.core.policies.optimizer import (
    GoodputSolution,
    base_step_ms,
    batch_depth_ms,
    expected_tokens_by_k,
    padded_keys,
    row_cost_terms,
)

MAX_DEPTH_PROPOSERS = 3  # (K+1)^(1 + n) cap tuples: 6,561 per row at n = 3, K = 8


@dataclass(frozen=True)
class ChoiceSolution(GoodputSolution):
    """A GoodputSolution that also names each row's proposer."""

    proposers: np.ndarray  # [B] int: the proposer each row asks, -1 where k = 0


@dataclass(frozen=True)
class _Tables:
    """Everything about the batch that does not depend on lambda, for k = 0..K (K = deepest cap).
    Laid out [k, proposer, row]: k outermost so running maxima along k are a few whole-slab
    maxima, and each proposer's [K+1, B] slab is contiguous along the rows that get summed."""

    tokens: np.ndarray  # E_ip(k): [K+1, P, B]
    own_ms: np.ndarray  # f_ip (w_ip k + s_ip [k > 0]): [K+1, P, B]
    base_ms: float  # T at k = 0
    verify_depth_ms: np.ndarray  # c_spec [m > 0] + c_width B L m: [K+1]
    draft_fixed_ms: np.ndarray  # d_fixed_p: [P]

    def step_ms(self, proposers: np.ndarray, ks: np.ndarray) -> float:
        """T of a plan (proposers: [B], any index where k = 0)."""
        draft_depth_ms = sum(self.draft_fixed_ms[p] * int(ks[proposers == p].max(initial=0))  # its rows' max k
                             for p in np.flatnonzero(self.draft_fixed_ms))
        return float(self.base_ms + self.own_ms[ks, proposers, np.arange(ks.size)].sum()
                     + self.verify_depth_ms[int(ks.max(initial=0))] + draft_depth_ms)


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A [n] vector laid along `axis` of an ndim-dimensional array, for broadcasting."""
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def _tables(acceptance: np.ndarray, fill: np.ndarray, contexts: np.ndarray, prefills: np.ndarray,
            verify_cost: CostModel, proposer_costs: Sequence[CostModel], max_k: int,
            base_ms: float | None = None) -> _Tables:
    batch, count = acceptance.shape
    k = np.arange(max_k + 1, dtype=np.float64)[:, None, None]  # [K+1, 1, 1]
    draft = np.array([[c.d_tok_ms, c.d_kv_ms, c.d_row_ms, c.d_fixed_ms] for c in proposer_costs]).reshape(count, 4)
    per_token, per_request = row_cost_terms(  # w_ip f_ip, s_ip f_ip: [P, B] each
        verify_cost.c_tok_ms + draft[:, 0:1], draft[:, 1:2], verify_cost.c_spec_row_ms + draft[:, 2:3],
        contexts, fill.T)
    return _Tables(
        tokens=expected_tokens_by_k(acceptance.T, max_k, fill.T),  # [K+1, P, B]
        own_ms=per_token * k + per_request * (k > 0).astype(np.float64),  # [K+1, P, B]
        base_ms=base_step_ms(verify_cost, contexts, prefills) if base_ms is None else base_ms,
        verify_depth_ms=batch_depth_ms(verify_cost.c_spec_ms, verify_cost.c_width_ms * padded_keys(contexts), max_k),
        draft_fixed_ms=draft[:, 3],
    )


def _running_max(values: np.ndarray) -> np.ndarray:
    """max over k' <= k along axis 0: [K+1, ...] -> [K+1, ...]. (A loop of whole-slab maxima: numpy's
    maximum.accumulate runs element by element and is several times slower at these sizes.)"""
    out = values.copy()
    for c in range(1, values.shape[0]):
        np.maximum(out[c - 1], out[c], out=out[c])
    return out


def _inputs(acceptance, fill, contexts, prefills, proposer_costs):
    """acceptance, fill clipped to [0, 1] as [B, P]; contexts, prefills as [B] floats."""
    a = np.clip(np.asarray(acceptance, dtype=np.float64), 0.0, 1.0)  # [B, P]
    if a.ndim != 2:
        raise ValueError(f"acceptance must be [batch, proposers], got shape {a.shape}")
    if a.shape[1] != len(proposer_costs):
        raise ValueError(f"{a.shape[1]} proposers in acceptance but {len(proposer_costs)} proposer costs")
    f = np.ones_like(a) if fill is None else np.clip(np.asarray(fill, dtype=np.float64), 0.0, 1.0)  # [B, P]
    contexts = np.asarray(contexts, dtype=np.float64).reshape(-1)  # [B]
    prefills = np.asarray(prefills, dtype=np.float64).reshape(-1)  # [B]
    if f.shape != a.shape or contexts.shape != (a.shape[0],) or prefills.shape != (a.shape[0],):
        raise ValueError(f"fill {f.shape}, contexts {contexts.shape}, prefills {prefills.shape} "
                         f"do not match acceptance {a.shape}")
    return a, f, contexts, prefills


def optimize_choices(acceptance, fill, k_cap, contexts, prefills, verify_cost: CostModel,
                     proposer_costs: Sequence[CostModel], max_k: int, available=None,
                     max_rounds: int = 64, start_goodput: float | None = None) -> ChoiceSolution:
    """The (proposer, k) per row maximising expected tokens per expected step time, exactly.

    acceptance, fill: [B, P] per row and proposer (fill None: every asked-for position filled).
    k_cap: [B, P] ints, the most tokens proposer p can look ahead for row i (None: max_k).
    available: [B, P] bools (None: all); an unavailable pair allows only k = 0.
    verify_cost: its c_* terms and overhead_ms (its d_* are ignored); proposer_costs: P cost
    models whose d_* terms are that proposer's draft cost (their c_* are ignored).
    Ties go to the smaller k, then to the lower proposer index; rows at k = 0 report proposer -1.
    start_goodput: where to start the search for lambda (e.g. the previous step's optimum, for a
    batch that changed little): near the optimum it saves one or two rounds of ~3-4; any value,
    above the optimum included, gives the same optimum.
    Raises ValueError when the verify cost predicts a zero-length step, on mismatched shapes, and
    when more than MAX_DEPTH_PROPOSERS usable proposers have d_fixed > 0.
    """
    a, f, contexts, prefills = _inputs(acceptance, fill, contexts, prefills, proposer_costs)
    batch, count = a.shape
    max_k = max(0, int(max_k))
    caps = np.full(a.shape, max_k, dtype=np.int64) if k_cap is None else np.asarray(k_cap, dtype=np.int64)  # [B, P]
    usable = np.ones(a.shape, dtype=bool) if available is None else np.asarray(available, dtype=bool)  # [B, P]
    if caps.shape != a.shape or usable.shape != a.shape:
        raise ValueError(f"k_cap {caps.shape} and available {usable.shape} must match acceptance {a.shape}")
    caps = np.clip(caps, 0, max_k)  # [B, P]
    if available is not None:
        caps = np.where(usable, caps, 0)  # nothing offered means k = 0 only
    base_ms = base_step_ms(verify_cost, contexts, prefills)
    if not base_ms > 0:
        raise ValueError("cost model predicts a zero step time; goodput is undefined")
    baseline = batch / base_ms
    top = int(caps.max(initial=0))  # no row can ask for more: the caps beyond it change nothing
    idle = np.zeros(batch, dtype=np.int64)
    if batch == 0 or top == 0:
        return ChoiceSolution(idle, float(batch), base_ms, baseline, proposers=idle - 1)

    tables = _tables(a, f, contexts, prefills, verify_cost, proposer_costs, top, base_ms)
    k = np.arange(top + 1)  # [K+1]
    usable_anywhere = caps.max(axis=0) > 0  # [P]
    depth_costing = [p for p in range(count) if tables.draft_fixed_ms[p] > 0 and usable_anywhere[p]]
    if len(depth_costing) > MAX_DEPTH_PROPOSERS:
        raise ValueError(f"{len(depth_costing)} usable proposers with a per-depth cost; "
                         f"at most {MAX_DEPTH_PROPOSERS} are enumerated")
    free = [p for p in range(count) if p not in depth_costing]
    depths, n_free = len(depth_costing), len(free)
    grid = (top + 1,) * (1 + depths)  # (m, m_d for each depth-costing d)
    # The search runs with the free proposers first, so their best is one reduction over a slice
    # (they share the batch cap m); `back` maps that order's columns to the caller's.
    order = free + depth_costing  # [P]
    reordered = order != list(range(count))
    back = np.argsort(order) if reordered else None  # [P]
    allowed_k = k[:, None, None] <= (caps.T[order] if reordered else caps.T)  # [K+1, P, B]
    gains = np.where(allowed_k, tables.tokens[:, order] if reordered else tables.tokens, -np.inf)  # E or -inf
    own_ms = tables.own_ms[:, order] if reordered else tables.own_ms  # [K+1, P, B]

    # What each cap tuple charges beyond the rows' own terms; +inf where some m_d > m (dominated:
    # that proposer's rows are held to m anyway, so the same plans are charged more).
    batch_cap = _along(k, 0, 1 + depths)  # m: [K+1, 1, ...]
    charged_ms = _along(tables.verify_depth_ms, 0, 1 + depths)  # [K+1, 1, ...]
    for j, p in enumerate(depth_costing):
        own_cap = _along(k, 1 + j, 1 + depths)  # m_d: [1, ..., K+1 at axis 1+j, ...]
        charged_ms = charged_ms + np.where(own_cap <= batch_cap, tables.draft_fixed_ms[p] * own_cap, np.inf)
    if charged_ms.shape != grid:  # a depth-costing proposer's cap made it full already
        charged_ms = np.broadcast_to(charged_ms, grid)  # [K+1]^(1 + depths)
    plain = None if n_free else np.ones((top + 1, batch))  # k = 0 for every row (E = 1, no cost): [K+1, B]

    rows = np.arange(batch)  # [B]
    best = (idle - 1, idle, float(batch), base_ms)
    # lam is always the ratio of `best` except in a hinted first round, which only yields a plan
    hinted = start_goodput is not None and math.isfinite(start_goodput) and start_goodput > baseline
    lam = float(start_goodput) if hinted else baseline
    for _ in range(max_rounds):
        objective = gains - lam * own_ms  # E_ip(k) - lam f_ip (w_ip k + s_ip [k > 0]): [K+1, P, B]
        within = _running_max(objective)  # best with k <= c, per proposer and row: [K+1, P, B]
        # per row, the best over free proposers with k <= m (k = 0, worth 1, is in every slab at 0)
        row_best = within[:, :n_free].max(axis=1) if n_free else plain  # [K+1, B]
        row_best = row_best.reshape((top + 1,) + (1,) * depths + (batch,))  # [K+1, 1, ..., B]
        for j in range(depths):  # -> [K+1, ..., K+1 at axis 1+j, ..., B]
            row_best = np.maximum(row_best, within[:, n_free + j].reshape(
                (1,) * (1 + j) + (top + 1,) + (1,) * (depths - 1 - j) + (batch,)))
        by_caps = row_best.sum(axis=-1) - lam * charged_ms  # [K+1]^(1 + depths)
        top_index = int(np.argmax(by_caps))  # smallest caps first on ties
        if not hinted and by_caps.flat[top_index] - lam * base_ms <= 1e-12 * lam * base_ms:
            break  # F(lam) ~ 0: no plan beats lam (the ratio test below would stop too; skip the recovery)
        cap_tuple = np.unravel_index(top_index, grid)
        proposer_cap = np.array([cap_tuple[0]] * n_free + [int(c) for c in cap_tuple[1:]])  # [P], search order
        allowed = np.where((k[:, None] <= proposer_cap)[:, :, None], objective, -np.inf)  # [K+1, P, B]
        ks = allowed.max(axis=1).argmax(axis=0)  # the smallest k reaching the row's best: [B]
        at_k = allowed[ks, :, rows]  # [B, P], search order
        proposers = (at_k[:, back] if reordered else at_k).argmax(axis=1)  # the lowest caller's index there: [B]
        tokens = float(tables.tokens[ks, proposers, rows].sum())
        step_ms = tables.step_ms(proposers, ks)
        ratio = tokens / step_ms
        if hinted:  # from here on plain Dinkelbach, from this plan's ratio (or plain decoding's)
            hinted = False
            if ratio > baseline:
                best, lam = (np.where(ks > 0, proposers, -1), ks, tokens, step_ms), ratio
            else:
                lam = baseline
            continue
        if ratio <= lam * (1.0 + 1e-12):  # F(lam) == 0: lam is the optimum
            break
        best, lam = (np.where(ks > 0, proposers, -1), ks, tokens, step_ms), ratio
    proposers, ks, tokens, step_ms = best
    return ChoiceSolution(ks.astype(np.int64), tokens, step_ms, baseline, proposers=proposers.astype(np.int64))


def predict_choices(acceptance, fill, contexts, prefills, verify_cost: CostModel,
                    proposer_costs: Sequence[CostModel], proposers, ks) -> tuple[float, float]:
    """(expected tokens, expected step ms) of a given plan, in the optimiser's own terms."""
    a, f, contexts, prefills = _inputs(acceptance, fill, contexts, prefills, proposer_costs)
    ks = np.asarray(ks, dtype=np.int64).reshape(-1)  # [B]
    proposers = np.asarray(proposers, dtype=np.int64).reshape(-1)  # [B]
    if ks.shape != (a.shape[0],) or proposers.shape != ks.shape:
        raise ValueError(f"proposers {proposers.shape} and ks {ks.shape} must be one per row of {a.shape}")
    if np.any((ks > 0) & ((proposers < 0) | (proposers >= a.shape[1]))) or np.any(ks < 0):
        raise ValueError("every row with k > 0 needs a proposer index in range, and k >= 0")
    proposers = np.where(ks > 0, proposers, 0)  # k = 0 costs and yields the same whoever is named
    tables = _tables(a, f, contexts, prefills, verify_cost, proposer_costs, int(ks.max(initial=0)))
    tokens = float(tables.tokens[ks, proposers, np.arange(ks.size)].sum())
    return tokens, tables.step_ms(proposers, ks)

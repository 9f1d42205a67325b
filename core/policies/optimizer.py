"""Exact goodput maximisation over per-request speculation lengths (the SmartSpec objective).

    maximise  G(k) = sum_i E_i(k_i) / T(k)   over k in {0..K}^B
    E_i(k)    = 1 + f_i (a_i + ... + a_i^k)
    T(k)      = base + sum_i f_i (w_i k_i + s_i [k_i > 0]) + depth(max_i k_i)

where a_i is the chance that each offered proposal is accepted, f_i the expected share of the k
asked-for positions the proposer fills (1 for a draft model; prompt lookup often offers nothing),
and, from the cost model (see cost_model.py; L = max_i context_i),

    base      = c_fixed + overhead + c_tok * sum_i (1 + prefill_i) + c_kv * sum_i context_i
                + c_row * B + c_width * B * L                                        (T at k = 0)
    w_i       = c_tok + d_tok + d_kv * context_i      marginal cost of one more proposal for request i
    s_i       = c_spec_row + d_row                    cost of request i speculating at all
    depth(m)  = c_spec * [m > 0] + d_fixed * m + c_width * B * L * m
                                                      terms shared by the whole batch: the padded
                                                      attention width is set by the widest row

An unfilled position is never verified, so it costs nothing and yields nothing: both the gain and
the per-token cost scale with f_i. The shared depth(m) is charged in full whenever anything is
planned (the batch pays it if any row fills), which errs toward less speculation. A request's own
terms (w_i, s_i) are paid only when it is filled, so they scale with f_i.

Dinkelbach: G* is the lambda at which F(lambda) = max_k [sum_i E_i(k_i) - lambda T(k)] is zero.
Start from lambda = G(0) and set lambda <- G(argmax) until it stops growing (superlinear, a
handful of rounds). The inner maximisation is exact despite the coupling through max_i k_i:
for each cap m in 0..K, every request picks its own best k_i <= m (the rows are independent
once the shared depth(m) is fixed: each row's cost f_i (w_i k + s_i [k > 0]) is its own, of any
shape in k), and we take the best cap. Charging depth(m) for a vector whose true max is below m
only overestimates its cost, and the cap equal to the true max is among those tried, so the best
over caps is the true maximum. All caps at once: a running maximum along k of the [B, K+1] table.

The per-count table (CostModel.token_count_ms: what a step of exactly N query tokens costs beyond
the line) adds h(N) to T, with N = N0 + sum_i k_i and N0 = sum_i (1 + prefill_i): the count is
charged on the plan, as the batch-wide terms are (a proposer that runs dry verifies fewer; the
worker's own re-plan knows how many each row has). That term couples every row through one number,
so where the table can matter (some count the batch can reach has an entry) the inner maximisation
changes, still exactly:
- when every row's objective E_i(k) - lam f_i (w_i k + s_i [k > 0]) is concave in k (its gain per
  extra proposal never grows), the best sum with exactly s proposals under cap m takes the s
  largest increments of the rows' objectives: one sort per cap gives it for every s at once, and
  the best (m, s) with the table's h(N0 + s) and depth(m) is read off;
- otherwise (a row whose k = 1 is dearer than its k = 2 because of s_i), a dynamic programme over
  those rows with the count as its state, counts past the table's last entry sharing one
  saturated state (h = 0 there), joined to the sorted rows by a max-plus convolution over the
  count (`token_count_plan`).
Past the table (N0 beyond it, as in any large batch) the separable solve above runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from smartspec.core.cost_model import CostModel


def expected_tokens_by_k(acceptance: np.ndarray, max_k: int, fill: np.ndarray | None = None) -> np.ndarray:
    """E(k) for k = 0..K along a new leading axis: acceptance, fill [...] -> [K+1, ...].
    a^j by repeated products (a pow per element costs several times more), so exact at a = 1
    (1 + f k) and a = 0 (1)."""
    a = np.asarray(acceptance, dtype=np.float64)  # [...]
    accepted = np.zeros((max_k + 1,) + a.shape)  # sum_{j<=k} a^j: [K+1, ...]
    power = np.ones_like(a)
    for k in range(1, max_k + 1):
        power *= a  # a^k
        np.add(accepted[k - 1], power, out=accepted[k])
    if fill is not None:
        accepted *= np.asarray(fill, dtype=np.float64)
    accepted += 1.0
    return accepted  # E: [K+1, ...]


def expected_tokens_table(acceptance: np.ndarray, max_k: int, fill: np.ndarray | None = None) -> np.ndarray:
    """E_i(k) for k = 0..K. acceptance, fill: [B] -> [B, K+1]."""
    return expected_tokens_by_k(acceptance, max_k, fill).T  # [B, K+1]


def expected_tokens(acceptance: float, k: int, fill: float = 1.0) -> float:
    """Expected tokens from one request asked for k proposals: accepted prefix plus the bonus token."""
    return float(expected_tokens_table(np.array([acceptance]), k, np.array([fill]))[0, k])


@dataclass(frozen=True)
class CostTerms:
    """T(k) = base_ms + per_token_ms @ k + per_request_ms @ [k > 0] + depth_ms[max k]
    + count_ms[sum_i k_i], split as the optimiser needs it: a per-row part (separable), a part
    that depends only on max k, and the per-count table's part (only where the batch can reach it)."""

    base_ms: float
    per_token_ms: np.ndarray  # [B]
    per_request_ms: np.ndarray  # [B]
    depth_ms: np.ndarray  # [K+1], depth_ms[0] = 0
    # count_ms[s]: the table's entry for N0 + s query tokens; its last entry (0) stands for every
    # count past the table. Empty: no entry the batch can reach, T has no count term.
    count_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [S]

    def row_ms(self, max_k: int) -> np.ndarray:
        """Each row's own cost at k = 0..K: [B, K+1] (0 at k = 0)."""
        k = np.arange(max_k + 1)  # [K+1]
        return self.per_token_ms[:, None] * k + self.per_request_ms[:, None] * (k > 0)  # [B, K+1]

    def step_ms(self, ks: np.ndarray) -> float:
        top = int(ks.max(initial=0))
        ms = float(self.base_ms + self.per_token_ms @ ks + self.per_request_ms @ (ks > 0) + self.depth_ms[top])
        if self.count_ms.size:
            ms += float(self.count_ms[min(int(ks.sum()), self.count_ms.size - 1)])
        return ms


def padded_keys(contexts: np.ndarray) -> float:
    """B * L: the attention cells one column of padded query width costs (every row's keys up to
    the longest row). contexts: [B]."""
    contexts = np.asarray(contexts, dtype=np.float64)  # [B]
    return contexts.size * float(contexts.max(initial=0.0))


def base_step_ms(cost: CostModel, contexts: np.ndarray, prefills: np.ndarray) -> float:
    """T with every k = 0: what the batch costs before anyone speculates (no draft term in it)."""
    contexts = np.asarray(contexts, dtype=np.float64)  # [B]
    prefills = np.asarray(prefills, dtype=np.float64)  # [B]
    return (cost.c_fixed_ms + cost.overhead_ms
            + cost.c_tok_ms * float((1.0 + prefills).sum()) + cost.c_kv_ms * float(contexts.sum())
            + cost.c_row_ms * contexts.size + cost.c_width_ms * padded_keys(contexts))


def row_cost_terms(token_ms, token_context_ms, speculate_ms, contexts: np.ndarray,
                   fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A row's own terms, (w_i, s_i) scaled by f_i: w_i = token_ms + token_context_ms * context_i
    per proposal, s_i = speculate_ms for speculating at all. Scalars or arrays that broadcast
    against contexts [B] (e.g. one coefficient per proposer, [P, 1]); fill has the result's shape."""
    per_token = (token_ms + token_context_ms * contexts) * fill  # [..., B]
    return per_token, speculate_ms * fill  # [..., B], [..., B]


def batch_depth_ms(spec_ms: float, per_depth_ms: float, max_k: int) -> np.ndarray:
    """The terms paid once for the batch at depth m = max k: [K+1], 0 at m = 0."""
    depth = np.arange(max_k + 1, dtype=np.float64)  # m: [K+1]
    return spec_ms * (depth > 0) + per_depth_ms * depth


def reachable_counts(table, base_tokens: float, most_tokens: float) -> np.ndarray:
    """count_ms of CostTerms: the table's entries for N0 .. (its last non-zero entry), then one 0
    for every count past it; empty when no count in [N0, N0 + most_tokens] has an entry."""
    table = np.asarray(table, dtype=np.float64)  # [T]
    nonzero = np.flatnonzero(table)
    if nonzero.size == 0 or base_tokens != int(base_tokens):
        return np.zeros(0)
    first = int(base_tokens)
    last = int(nonzero[-1])  # counts past this one add nothing
    if first > last or int(nonzero[nonzero >= first][0]) > first + most_tokens:
        return np.zeros(0)
    return np.append(table[first: last + 1], 0.0)  # [S]: s = 0 .. last - N0, then "past the table"


def cost_terms(cost: CostModel, contexts: np.ndarray, prefills: np.ndarray, max_k: int,
               fill: np.ndarray | None = None) -> CostTerms:
    """The expected step time's terms; a row's own terms are scaled by f_i (only filled positions
    are verified, only a filled row is verified at all)."""
    contexts = np.asarray(contexts, dtype=np.float64)  # [B]
    fill = np.ones_like(contexts) if fill is None else np.asarray(fill, dtype=np.float64)  # [B]
    per_token_ms, per_request_ms = row_cost_terms(cost.c_tok_ms + cost.d_tok_ms, cost.d_kv_ms,
                                                  cost.c_spec_row_ms + cost.d_row_ms, contexts, fill)
    return CostTerms(
        base_ms=base_step_ms(cost, contexts, prefills),
        per_token_ms=per_token_ms,  # [B]
        per_request_ms=per_request_ms,  # [B]
        depth_ms=batch_depth_ms(cost.c_spec_ms, cost.d_fixed_ms + cost.c_width_ms * padded_keys(contexts), max_k),
        count_ms=reachable_counts(cost.token_count_ms, float(np.sum(1.0 + np.asarray(prefills, dtype=np.float64))),
                                  float(contexts.size * max_k)),
    )


@dataclass(frozen=True)
class GoodputSolution:
    ks: np.ndarray  # [B] int
    expected_tokens: float
    step_ms: float
    baseline_goodput: float  # tokens per ms with every k = 0

    @property
    def goodput(self) -> float:
        """Expected tokens per millisecond of step time."""
        return self.expected_tokens / self.step_ms


def _largest_increments(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows whose increments never grow with k (steps[i, k-1] = objective[i, k] - objective[i, k-1],
    [n, K]): the best sum over those rows with exactly s proposals under cap m is the sum of the s
    largest increments with k <= m (a row's k-th is never taken before its (k-1)-th), so one sort
    per cap gives every s. Returns best [caps, n*K+1] (-inf where s is out of reach) and the sort
    order [caps, n*K] (flat index row * K + k - 1) to rebuild the plan."""
    n, depth = steps.shape
    allowed = np.arange(1, depth + 1)[None, :] <= np.arange(depth + 1)[:, None]  # increment k under cap m: [caps, K]
    offered = np.where(allowed[:, None, :], steps[None, :, :], -np.inf).reshape(depth + 1, n * depth)  # [caps, n*K]
    order = np.argsort(-offered, axis=1, kind="stable")  # largest first
    ranked = np.take_along_axis(offered, order, axis=1)
    best = np.concatenate([np.zeros((depth + 1, 1)), np.cumsum(ranked, axis=1)], axis=1)  # [caps, n*K+1]
    return best, order


def _count_programme(objective: np.ndarray, states: int) -> tuple[np.ndarray, list, list]:
    """Dynamic programme over rows of any objective [n, K+1], every cap at once: V[m, s] = the best
    sum with every k <= m and s proposals (the last state: s or more). Returns V [caps, S] and, per
    row, its choice [caps, S + K] and the V before it, to walk the plan back. ~50 us per row."""
    n, width = objective.shape
    last = states - 1
    cap_mask = np.where(np.arange(width)[None, :] <= np.arange(width)[:, None], 0.0, -np.inf)  # [caps, K+1]
    source = np.arange(last)[:, None] - np.arange(width)[None, :]  # the state each k comes from: [last, K+1]
    reachable = source >= 0
    value = np.full((width, states), -np.inf)  # V: [caps, S]
    value[:, 0] = 0.0
    chosen, before = [], []
    for row in range(n):
        reach = np.where(reachable, value[:, np.maximum(source, 0)], -np.inf)  # [caps, last, K+1]
        suffix = np.maximum.accumulate(value[:, ::-1], axis=1)[:, ::-1]  # best at s' >= s: [caps, S]
        into_last = suffix[:, np.maximum(last - np.arange(width), 0)]  # [caps, K+1]
        candidates = np.concatenate([reach, into_last[:, None, :]], axis=1)  # [caps, S, K+1]
        candidates += objective[row][None, None, :] + cap_mask[:, None, :]
        ks = candidates.argmax(axis=2)  # [caps, S]
        before.append(value)
        chosen.append(ks)
        value = np.take_along_axis(candidates, ks[..., None], axis=2)[..., 0]
    return value, chosen, before


@functools.lru_cache(maxsize=8)
def _saturating_sums(states: int) -> tuple[np.ndarray, np.ndarray]:
    """The flat pairs (a, b) of two count states sorted by their joint state min(a + b, S - 1), and
    where each joint state's run starts: for np.maximum.reduceat. ([S*S], [S])"""
    joint = np.minimum(np.arange(states)[:, None] + np.arange(states)[None, :], states - 1).ravel()
    by_sum = np.argsort(joint, kind="stable")
    return by_sum, np.searchsorted(joint[by_sum], np.arange(states))


def token_count_plan(objective: np.ndarray, count_ms: np.ndarray, depth_ms: np.ndarray, lam: float) -> np.ndarray:
    """argmax over k in {0..K}^B of sum_i objective[i, k_i] - lam (depth_ms[max k] + count_ms[s]),
    s = min(sum_i k_i, S - 1): Dinkelbach's inner maximisation when the step time has a per-count
    term. Exact. Rows whose increments never grow with k go through `_largest_increments` (a
    sort); the others (k = 1 dearer than k = 2: the per-row cost s_i) through `_count_programme`;
    the two are joined by a max-plus convolution over the count. objective: [B, K+1]; count_ms: [S];
    depth_ms: [K+1]. Ties go to the smaller cap and count."""
    batch, width = objective.shape
    states = count_ms.size
    last = states - 1
    steps = np.diff(objective, axis=1)  # [B, K]
    concave = (np.diff(steps, axis=1) <= 1e-12 * (1.0 + np.abs(steps[:, 1:]))).all(axis=1)  # [B]
    easy, hard = np.flatnonzero(concave), np.flatnonzero(~concave)
    sorted_best, order = _largest_increments(steps[easy])  # [caps, E*K+1]
    base = float(objective[:, 0].sum())
    # the sorted rows' best per count state (past the last state: the best at or past it)
    easy_value = np.full((width, states), -np.inf)  # [caps, S]
    head = min(states - 1, sorted_best.shape[1])
    easy_value[:, :head] = sorted_best[:, :head]
    tail = sorted_best[:, last:]  # [caps, *]: counts at or past the last state
    tail_at = tail.argmax(axis=1) if tail.shape[1] else np.zeros(width, dtype=np.int64)  # [caps]
    if tail.shape[1]:
        easy_value[:, last] = tail[np.arange(width), tail_at]
    hard_value, chosen, before = _count_programme(objective[hard] - objective[hard, :1], states)  # [caps, S]
    if hard.size:  # join: total[m, t] = max over a + b -> t (saturating) of easy[m, a] + hard[m, b]
        by_sum, where = _saturating_sums(states)
        pairs = (easy_value[:, :, None] + hard_value[:, None, :]).reshape(width, -1)[:, by_sum]  # [caps, S*S]
        joined = np.maximum.reduceat(pairs, where, axis=1)  # [caps, S]
    else:
        joined = easy_value
    with np.errstate(invalid="ignore"):
        score = base + joined - lam * (depth_ms[:, None] + count_ms[None, :])  # [caps, S]
    score = np.where(np.isnan(score), -np.inf, score)
    cap, total = np.unravel_index(int(np.argmax(score)), score.shape)
    a, b = total, 0
    if hard.size:
        end = where[total + 1] if total + 1 < states else by_sum.size
        a, b = np.unravel_index(by_sum[where[total] + int(np.argmax(pairs[cap, where[total]:end]))], (states, states))
    plan = np.zeros(batch, dtype=np.int64)
    # the sorted rows: the `a` largest increments (past the last state: the count that was best)
    taken = a if a < last else last + int(tail_at[cap])
    if easy.size:
        plan[easy] = np.bincount(order[cap, :taken] // (width - 1), minlength=easy.size)
    state = int(b)
    for index in range(hard.size - 1, -1, -1):  # walk the programme's choices back
        k = int(chosen[index][cap, state])
        plan[hard[index]] = k
        if state < last:
            state -= k
        else:
            start = max(last - k, 0)
            state = start + int(np.argmax(before[index][cap, start:]))
    return plan


def optimize_goodput(acceptance, contexts, prefills, cost: CostModel, max_k: int,
                     max_rounds: int = 64, fill=None) -> GoodputSolution:
    """The k vector maximising expected tokens per expected step time, exactly.

    fill: [B] expected share of asked-for positions the proposer fills (None: all of them).
    Ties go to the smaller k (less compute for the same goodput). Raises ValueError when the
    cost model predicts a zero-length step (the ratio is then undefined).
    """
    a = np.clip(np.asarray(acceptance, dtype=np.float64), 0.0, 1.0)  # [B]
    batch = a.shape[0]
    f = np.ones(batch) if fill is None else np.clip(np.asarray(fill, dtype=np.float64), 0.0, 1.0)  # [B]
    max_k = max(0, int(max_k))
    terms = cost_terms(cost, contexts, prefills, max_k, f)
    zeros = np.zeros(batch, dtype=np.int64)
    plain_ms = terms.step_ms(zeros)
    if not plain_ms > 0:
        raise ValueError("cost model predicts a zero step time; goodput is undefined")
    baseline = batch / plain_ms
    if batch == 0 or max_k == 0:
        return GoodputSolution(zeros, float(batch), plain_ms, baseline)

    gains = expected_tokens_table(a, max_k, f)  # E: [B, K+1]
    own_ms = terms.row_ms(max_k)  # f_i (w_i k + s_i [k > 0]): [B, K+1]
    rows = np.arange(batch)
    best_ks, best_tokens, best_ms, lam = zeros, float(batch), plain_ms, baseline
    for _ in range(max_rounds):
        objective = gains - lam * own_ms  # E_i(k) - lam f_i (w_i k + s_i [k > 0]): [B, K+1]
        if terms.count_ms.size:
            ks = token_count_plan(objective, terms.count_ms, terms.depth_ms, lam)  # [B]
        else:
            capped = np.maximum.accumulate(objective, axis=1)  # best with k_i <= m: [B, K+1]
            by_cap = capped.sum(axis=0) - lam * terms.depth_ms  # [K+1]
            cap = int(np.argmax(by_cap))
            ks = np.argmax(objective[:, : cap + 1], axis=1)  # [B]
        tokens = float(gains[rows, ks].sum())
        step_ms = terms.step_ms(ks)
        ratio = tokens / step_ms
        if ratio <= lam * (1.0 + 1e-12):  # F(lam) == 0: lam is the optimum
            break
        best_ks, best_tokens, best_ms, lam = ks, tokens, step_ms, ratio
    return GoodputSolution(best_ks.astype(np.int64), best_tokens, best_ms, baseline)


def predict_step(acceptance, contexts, prefills, cost: CostModel, ks, fill=None) -> tuple[float, float]:
    """(expected tokens, expected step ms) of a given plan, for StepPlan.predicted_* fields."""
    ks = np.asarray(ks, dtype=np.int64)  # [B]
    a = np.clip(np.asarray(acceptance, dtype=np.float64), 0.0, 1.0)  # [B]
    if ks.size == 0:
        return 0.0, float(cost.predict_ms(np.zeros((0,)), np.zeros((0,))))
    f = None if fill is None else np.clip(np.asarray(fill, dtype=np.float64), 0.0, 1.0)  # [B]
    top = int(ks.max(initial=0))
    gains = expected_tokens_table(a, top, f)  # [B, top+1]
    tokens = float(gains[np.arange(ks.size), ks].sum())
    return tokens, cost_terms(cost, contexts, prefills, top, f).step_ms(ks)

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
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """T(k) = base_ms + per_token_ms @ k + per_request_ms @ [k > 0] + depth_ms[max k], split as the
    optimiser needs it: a per-row part (separable) and a part that depends only on max k."""

    base_ms: float
    per_token_ms: np.ndarray  # [B]
    per_request_ms: np.ndarray  # [B]
    depth_ms: np.ndarray  # [K+1], depth_ms[0] = 0

    def row_ms(self, max_k: int) -> np.ndarray:
        """Each row's own cost at k = 0..K: [B, K+1] (0 at k = 0)."""
        k = np.arange(max_k + 1)  # [K+1]
        return self.per_token_ms[:, None] * k + self.per_request_ms[:, None] * (k > 0)  # [B, K+1]

    def step_ms(self, ks: np.ndarray) -> float:
        top = int(ks.max(initial=0))
        return float(self.base_ms + self.per_token_ms @ ks + self.per_request_ms @ (ks > 0) + self.depth_ms[top])


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
    if not terms.base_ms > 0:
        raise ValueError("cost model predicts a zero step time; goodput is undefined")
    zeros = np.zeros(batch, dtype=np.int64)
    baseline = batch / terms.base_ms
    if batch == 0 or max_k == 0:
        return GoodputSolution(zeros, float(batch), terms.base_ms, baseline)

    gains = expected_tokens_table(a, max_k, f)  # E: [B, K+1]
    own_ms = terms.row_ms(max_k)  # f_i (w_i k + s_i [k > 0]): [B, K+1]
    rows = np.arange(batch)
    best_ks, best_tokens, best_ms, lam = zeros, float(batch), terms.base_ms, baseline
    for _ in range(max_rounds):
        objective = gains - lam * own_ms  # E_i(k) - lam f_i (w_i k + s_i [k > 0]): [B, K+1]
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

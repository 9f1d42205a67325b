"""The goodput optimiser against brute force, and the SmartSpec behaviour it should produce."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from smartspec.core.cost_model import DEFAULT_COST_MODEL, CostModel
from smartspec.core.policies.optimizer import (
    expected_tokens,
    expected_tokens_table,
    optimize_goodput,
    predict_step,
)


def brute_force(acceptance, contexts, prefills, cost: CostModel, max_k: int, fill=None) -> float:
    """Best goodput over every k vector (see `every_plan`)."""
    _, tokens, step_ms = every_plan(acceptance, contexts, prefills, cost, max_k, fill)
    return float((tokens / step_ms).max())


def every_plan(acceptance, contexts, prefills, cost: CostModel, max_k: int, fill=None):
    """Every k vector [N, B] with its expected tokens [N] and step ms [N], each evaluated directly
    by the cost model's formula.

    With `fill`, request i's proposer fills all k_i positions with probability f_i and none
    otherwise: tokens and step time are averaged over all 2^B fill outcomes, the step time of each
    outcome taken from the cost model on the proposals actually made. The batch-wide terms
    (c_spec, draft depth, the padded attention width) are charged on the plan, as the policy
    charges them; a request's own terms (per token, per speculating row) on what it proposed.
    The per-count table is charged once per plan, at N0 + sum_i k_i query tokens (the plan's
    count, as the policy charges it).
    """
    table = cost.token_count_ms
    cost = cost.replace(token_count_ms=())
    batch = len(acceptance)
    fill = [1.0] * batch if fill is None else list(fill)
    plans = np.array(list(itertools.product(range(max_k + 1), repeat=batch)), dtype=float)  # [N, B]
    tokens = np.zeros(len(plans))  # [N]
    step_ms = np.zeros(len(plans))  # [N]

    def shared(depth: np.ndarray) -> np.ndarray:  # depth: [N] -> [N]
        width_cells = batch * (depth + 1) * max(contexts)  # B * max(k + 1) * max context
        return cost.c_spec_ms * (depth > 0) + cost.d_fixed_ms * depth + cost.c_width_ms * width_cells

    for outcome in itertools.product([0, 1], repeat=batch):
        filled = np.array(outcome, dtype=float)  # [B]
        chance = float(np.prod([f if o else 1.0 - f for f, o in zip(fill, outcome)]))
        if chance == 0.0:
            continue
        proposed = plans * filled  # [N, B]
        shared_real, shared_plan = shared(proposed.max(axis=1)), shared(plans.max(axis=1))
        step_ms += chance * (cost.predict_ms(proposed, contexts, prefills) - shared_real + shared_plan)
        tokens += chance * np.array([
            sum(1 + sum(a**j for j in range(1, int(k) + 1)) for a, k in zip(acceptance, row))
            for row in proposed
        ])  # E_i(k) written as the plain geometric sum over the proposals made
    for n, plan in enumerate(plans):
        count = int(sum(1 + p for p in prefills) + plan.sum())
        step_ms[n] += table[count] if count < len(table) else 0.0
    return plans, tokens, step_ms


def random_cost(rng: np.random.Generator) -> CostModel:
    """Coefficients on very different scales, each zeroed now and then, c_spec sometimes huge."""
    def pick(scale: float) -> float:
        return 0.0 if rng.random() < 0.25 else float(rng.uniform(0, scale))

    return CostModel(
        c_fixed_ms=float(rng.uniform(0.5, 100)),  # > 0: a step always takes some time
        c_spec_ms=float(rng.choice([pick(50.0), float(rng.uniform(100, 2000))])),
        c_tok_ms=pick(20.0),
        c_kv_ms=pick(0.05),
        d_fixed_ms=pick(50.0),
        d_tok_ms=pick(5.0),
        d_kv_ms=pick(0.01),
        overhead_ms=pick(5.0),
        c_spec_row_ms=float(rng.choice([pick(5.0), float(rng.uniform(20, 200))])),  # sometimes dominant
        c_row_ms=pick(3.0),
        c_width_ms=float(rng.choice([pick(1e-4), float(rng.uniform(1e-3, 1e-2))])),  # sometimes dominant
        d_row_ms=pick(2.0),
    )


def test_expected_tokens_matches_closed_form_and_edges():
    a = np.array([0.0, 0.3, 0.9, 1.0])
    table = expected_tokens_table(a, 5)
    for i, rate in enumerate(a):
        for k in range(6):
            closed = k + 1 if rate == 1.0 else (1 - rate ** (k + 1)) / (1 - rate)
            assert table[i, k] == pytest.approx(closed, rel=1e-12)
    assert expected_tokens(0.0, 7) == 1.0  # nothing accepted: only the bonus token
    assert expected_tokens(1.0, 7) == 8.0


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_on_random_small_batches(seed):
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 5))
    max_k = int(rng.integers(1, 5))
    acceptance = [float(rng.choice([0.0, 1.0, rng.uniform()])) for _ in range(batch)]
    contexts = [int(rng.integers(1, 4000)) for _ in range(batch)]
    prefills = [int(rng.choice([0, 0, rng.integers(1, 300)])) for _ in range(batch)]
    cost = random_cost(rng)
    # half the batches with a proposer that runs dry now and then (ngram), half always filling (draft)
    fill = [float(rng.choice([0.0, 1.0, rng.uniform()])) for _ in range(batch)] if seed % 2 else None

    plan = optimize_goodput(acceptance, contexts, prefills, cost, max_k, fill=fill)

    best = brute_force(acceptance, contexts, prefills, cost, max_k, fill)
    assert plan.goodput == pytest.approx(best, rel=1e-6)
    # the plan's own bookkeeping agrees with an independent evaluation of its k vector
    tokens, step_ms = predict_step(acceptance, contexts, prefills, cost, plan.ks, fill=fill)
    assert tokens == pytest.approx(plan.expected_tokens, rel=1e-12)
    assert step_ms == pytest.approx(plan.step_ms, rel=1e-12)
    assert plan.ks.min() >= 0 and plan.ks.max() <= max_k


def random_table(rng: np.random.Generator, cost: CostModel, counts: int) -> tuple[float, ...]:
    """A per-count table over 0..counts-1: entries anywhere from -c_fixed to +60 ms, many 0."""
    return tuple(float(rng.choice([0.0, rng.uniform(-cost.c_fixed_ms, 60.0)])) for _ in range(counts))


@pytest.mark.parametrize("seed", range(40))
def test_with_a_per_count_table_matches_brute_force(seed):
    """The count couples every row; the programme over counts must still find the exact optimum,
    whether the table covers every reachable count, ends inside them, or starts past some."""
    rng = np.random.default_rng(1000 + seed)
    batch = int(rng.integers(1, 5))
    max_k = int(rng.integers(1, 5))
    acceptance = [float(rng.choice([0.0, 1.0, rng.uniform()])) for _ in range(batch)]
    contexts = [int(rng.integers(1, 4000)) for _ in range(batch)]
    prefills = [int(rng.choice([0, 0, rng.integers(1, 6)])) for _ in range(batch)]
    base = random_cost(rng)
    reach = batch + sum(prefills) + batch * max_k + 1
    cost = base.replace(token_count_ms=random_table(rng, base, int(rng.integers(1, reach + 3))))
    fill = [float(rng.choice([1.0, rng.uniform()])) for _ in range(batch)] if seed % 2 else None

    plan = optimize_goodput(acceptance, contexts, prefills, cost, max_k, fill=fill)

    plans, tokens, step_ms = every_plan(acceptance, contexts, prefills, cost, max_k, fill)
    assert plan.goodput == pytest.approx(float((tokens / step_ms).max()), rel=1e-6)
    _, step_ms_alone = predict_step(acceptance, contexts, prefills, cost, plan.ks, fill=fill)
    assert step_ms_alone == pytest.approx(plan.step_ms, rel=1e-12)
    assert plan.baseline_goodput == pytest.approx(batch / step_ms[0], rel=1e-12)  # plans[0]: all k = 0


def test_a_count_that_costs_less_speculates_every_row_to_reach_it():
    """The reference CPU's shape: a step of 12 plain rows costs as much as one of 24 tokens. With
    the table saying so, a batch of 12 rows at modest acceptance speculates k = 1 on every row
    (24 tokens), where the line alone says speculation does not pay."""
    line = CostModel(c_fixed_ms=45.0, c_tok_ms=3.0, c_spec_ms=5.0)
    acceptance, contexts, prefills = [0.3] * 12, [400] * 12, [0] * 12
    assert optimize_goodput(acceptance, contexts, prefills, line, 4).ks.max() == 0
    table = [0.0] * 24
    for count in range(12, 24):  # 12 to 23 tokens cost what 24 do (with the step's c_spec)
        table[count] = 3.0 * (24 - count) + 5.0
    plan = optimize_goodput(acceptance, contexts, prefills, line.replace(token_count_ms=table), 4)
    assert plan.ks.tolist() == [1] * 12


def test_coupling_term_is_what_makes_per_request_choice_wrong():
    """With a huge c_spec, a greedy per-request choice (speculate if it pays alone) loses:
    only the batch as a whole can decide whether the shared cost is worth it."""
    cost = CostModel(c_fixed_ms=10.0, c_spec_ms=1000.0, c_tok_ms=1.0)
    acceptance, contexts, prefills = [0.95, 0.2, 0.2], [100] * 3, [0] * 3
    plan = optimize_goodput(acceptance, contexts, prefills, cost, 4)
    assert plan.goodput == pytest.approx(brute_force(acceptance, contexts, prefills, cost, 4), rel=1e-9)


def test_shared_draft_depth_caps_every_request():
    """A draft model pays d_fixed per depth for the whole batch. Here each request alone would
    speculate 3-4 tokens, but the batch optimum shares a shorter depth: the cap must bind."""
    cost = CostModel(c_fixed_ms=32.9, c_tok_ms=3.44, d_fixed_ms=19.4)
    acceptance, contexts, prefills = [0.997, 0.981, 0.686], [100] * 3, [0] * 3
    plan = optimize_goodput(acceptance, contexts, prefills, cost, 4)
    assert plan.goodput == pytest.approx(brute_force(acceptance, contexts, prefills, cost, 4), rel=1e-9)
    # at the optimum's own lambda, request 0 alone would go deeper than the shared depth
    lam = plan.goodput
    alone = [expected_tokens(0.997, k) - lam * cost.c_tok_ms * k for k in range(5)]
    assert int(np.argmax(alone)) > plan.ks.max() > 0


def test_per_request_cost_leaves_out_requests_whose_gain_is_marginal():
    """A fixed cost per speculating row (its verify and rollback on the host) is a step in each
    row's own table: a mediocre request that would speculate 1-2 tokens for free stays at k = 0,
    while the good one still speculates. Exact against brute force."""
    acceptance, contexts, prefills = [0.95, 0.45, 0.45], [300] * 3, [0] * 3
    free = CostModel(c_fixed_ms=20.0, c_tok_ms=1.0)
    costly = free.replace(c_spec_row_ms=8.0)
    assert optimize_goodput(acceptance, contexts, prefills, free, 4).ks[1:].min() > 0
    plan = optimize_goodput(acceptance, contexts, prefills, costly, 4)
    assert plan.ks[0] > 0 and plan.ks[1:].tolist() == [0, 0]
    assert plan.goodput == pytest.approx(brute_force(acceptance, contexts, prefills, costly, 4), rel=1e-9)


def test_padded_width_shortens_the_widest_row():
    """Attention over the padded [B, max k + 1] width makes every row pay the widest row's depth:
    with a costly width the one excellent request no longer speculates as deep as it would alone,
    and the plan is still the brute-force optimum."""
    acceptance, contexts, prefills = [0.9, 0.2, 0.2, 0.2], [1500, 300, 300, 300], [0] * 4
    narrow = CostModel(c_fixed_ms=40.0, c_tok_ms=1.0)
    wide = narrow.replace(c_width_ms=1e-3)  # 4 rows x 1500 keys: 6 ms per column of width
    deep = optimize_goodput(acceptance, contexts, prefills, narrow, 8)
    capped = optimize_goodput(acceptance, contexts, prefills, wide, 8)
    assert deep.ks[0] == 8 and 0 < capped.ks[0] < 8
    # the width is paid up to the widest row anyway, so the weak rows still fill it cheaply
    assert capped.ks[1:].min() > 0 and capped.ks[1:].max() <= capped.ks[0]
    assert capped.goodput == pytest.approx(brute_force(acceptance, contexts, prefills, wide, 8), rel=1e-9)
    tokens, step_ms = predict_step(acceptance, contexts, prefills, wide, capped.ks)
    assert step_ms == pytest.approx(float(wide.predict_ms(capped.ks, contexts, prefills)), rel=1e-12)


def test_low_load_high_acceptance_speculates_long():
    plan = optimize_goodput([0.9], [200], [0], DEFAULT_COST_MODEL, 8)
    assert plan.ks.tolist() == [8]
    assert plan.goodput > 2 * plan.baseline_goodput


def test_same_requests_in_a_large_batch_with_costly_verify_do_not_speculate():
    costly = DEFAULT_COST_MODEL.replace(c_tok_ms=20.0, c_spec_ms=50.0)  # compute-bound verify
    single = optimize_goodput([0.9], [200], [0], costly, 8)
    assert single.ks[0] > 0  # alone, speculation still pays off despite the cost...
    plan = optimize_goodput([0.9] * 128, [200] * 128, [0] * 128, costly, 8)
    assert plan.ks.tolist() == [0] * 128  # ...but at batch 128 the verify compute does not


def test_per_request_lengths_follow_acceptance_within_one_batch():
    acceptance = [0.05, 0.5, 0.95]
    plan = optimize_goodput(acceptance, [200] * 3, [0] * 3, DEFAULT_COST_MODEL.replace(c_spec_ms=0.0), 8)
    assert plan.ks[0] <= plan.ks[1] <= plan.ks[2]
    assert plan.ks[0] < plan.ks[2]


def test_a_proposer_that_often_runs_dry_is_still_worth_asking():
    """A request whose proposer fills 1 in 5 asks but is then always right costs only a fifth of the
    verify tokens it is planned for: k > 0 pays where the same request at fill 1 and a per-position
    rate diluted by its dry positions (the old model: a ~ 0.2) would not."""
    cost = CostModel(c_fixed_ms=20.0, c_tok_ms=6.0)
    dry = optimize_goodput([0.95], [200], [0], cost, 8, fill=[0.2])
    diluted = optimize_goodput([0.2], [200], [0], cost, 8)
    assert dry.ks[0] > 0 and diluted.ks[0] == 0
    assert dry.goodput > dry.baseline_goodput
    # fill only scales: at f = 0 nothing is gained and nothing paid, so the tie goes to k = 0
    assert optimize_goodput([0.95], [200], [0], cost, 8, fill=[0.0]).ks.tolist() == [0]


def test_ties_prefer_less_speculation():
    # a = 0: proposals never help, and with zero per-token cost they also never hurt
    plan = optimize_goodput([0.0, 0.0], [10, 10], [0, 0], CostModel(c_fixed_ms=5.0), 4)
    assert plan.ks.tolist() == [0, 0]


def test_zero_step_time_is_an_error_not_a_division():
    with pytest.raises(ValueError, match="zero step time"):
        optimize_goodput([0.5], [0], [0], CostModel(), 4)


def test_empty_batch_and_zero_max_k():
    assert optimize_goodput([], [], [], DEFAULT_COST_MODEL, 8).ks.tolist() == []
    assert optimize_goodput([1.0, 1.0], [5, 5], [0, 0], DEFAULT_COST_MODEL, 0).ks.tolist() == [0, 0]


@pytest.mark.parametrize("seed", range(5))
def test_large_batch_plan_has_no_improving_single_change(seed):
    """Too big for brute force (B = 64, K = 8): check that no one request's k can be moved to any
    other value, nor every k lowered by one, to raise goodput: necessary for the optimum."""
    rng = np.random.default_rng(100 + seed)
    batch, max_k = 64, 8
    acceptance = rng.uniform(size=batch)
    contexts = rng.integers(1, 4000, size=batch)
    prefills = np.zeros(batch, dtype=int)
    cost = random_cost(rng)
    plan = optimize_goodput(acceptance, contexts, prefills, cost, max_k)

    def goodput(ks) -> float:
        tokens, step_ms = predict_step(acceptance, contexts, prefills, cost, ks)
        return tokens / step_ms

    assert goodput(plan.ks) == pytest.approx(plan.goodput, rel=1e-12)
    for i in range(batch):
        for k in range(max_k + 1):
            moved = plan.ks.copy()
            moved[i] = k
            assert goodput(moved) <= plan.goodput * (1 + 1e-9)
    assert goodput(np.maximum(plan.ks - 1, 0)) <= plan.goodput * (1 + 1e-9)

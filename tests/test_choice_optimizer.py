"""The (proposer, k) optimiser against brute force over every assignment, and against the
single-proposer optimiser it generalises."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest

from smartspec.core.cost_model import CostModel
from smartspec.core.policies.choice_optimizer import (
    MAX_DEPTH_PROPOSERS,
    optimize_choices,
    predict_choices,
)
from smartspec.core.policies.optimizer import optimize_goodput


@dataclass
class Problem:
    acceptance: np.ndarray  # [B, P]
    fill: np.ndarray  # [B, P]
    k_cap: np.ndarray  # [B, P]
    available: np.ndarray  # [B, P]
    contexts: list[int]
    prefills: list[int]
    verify: CostModel
    proposers: list[CostModel]
    max_k: int

    def solve(self):
        return optimize_choices(self.acceptance, self.fill, self.k_cap, self.contexts, self.prefills,
                                self.verify, self.proposers, self.max_k, available=self.available)


def plan_goodput(problem: Problem, proposers, ks) -> float:
    """G of one plan, written out term by term from the model (no code shared with the optimiser)."""
    v, batch = problem.verify, len(ks)
    top = max(ks)
    step = (v.c_fixed_ms + v.overhead_ms + v.c_tok_ms * sum(1 + x for x in problem.prefills)
            + v.c_kv_ms * sum(problem.contexts) + v.c_row_ms * batch
            + v.c_width_ms * batch * (top + 1) * max(problem.contexts) + (v.c_spec_ms if top > 0 else 0.0))
    tokens = 0.0
    for i, (p, k) in enumerate(zip(proposers, ks)):
        tokens += 1.0
        if k == 0:
            continue
        a, f, d = problem.acceptance[i, p], problem.fill[i, p], problem.proposers[p]
        tokens += f * sum(a ** j for j in range(1, k + 1))
        step += f * (v.c_spec_row_ms + d.d_row_ms + k * (v.c_tok_ms + d.d_tok_ms + d.d_kv_ms * problem.contexts[i]))
    for p, d in enumerate(problem.proposers):
        step += d.d_fixed_ms * max([k for q, k in zip(proposers, ks) if q == p and k > 0], default=0)
    return tokens / step


def brute_force(problem: Problem) -> float:
    """Best G over every assignment of an allowed (proposer, k) to every row."""
    options = [[(-1, 0)] + [(p, k) for p in range(problem.acceptance.shape[1]) if problem.available[i, p]
                            for k in range(1, min(problem.k_cap[i, p], problem.max_k) + 1)]
               for i in range(len(problem.contexts))]
    return max(plan_goodput(problem, [p for p, _ in plan], [k for _, k in plan])
               for plan in itertools.product(*options))


def verify_cost(rng: np.random.Generator) -> CostModel:
    """c_* on very different scales, each zeroed now and then; d_* set too, to show they are ignored."""
    def pick(scale: float) -> float:
        return 0.0 if rng.random() < 0.25 else float(rng.uniform(0, scale))

    def now_and_then_huge(usual: float, low: float, high: float) -> float:
        return float(rng.uniform(low, high)) if rng.random() < 0.2 else pick(usual)

    return CostModel(
        c_fixed_ms=float(rng.uniform(0.5, 100)), c_spec_ms=now_and_then_huge(50.0, 100, 2000),
        c_tok_ms=pick(20.0), c_kv_ms=pick(0.05), overhead_ms=pick(5.0),
        c_spec_row_ms=now_and_then_huge(5.0, 20, 200), c_row_ms=pick(3.0),
        c_width_ms=now_and_then_huge(1e-4, 1e-3, 1e-2),
        d_fixed_ms=float(rng.uniform(0, 1e4)), d_tok_ms=float(rng.uniform(0, 1e4)), d_row_ms=float(rng.uniform(0, 1e4)),
    )


def draft_cost(rng: np.random.Generator, model_free: bool) -> CostModel:
    """A draft model (per-depth cost, per-token cost) or a host-side lookup (tiny or zero d_row);
    c_* set to nonsense, to show they are ignored."""
    noise = dict(c_fixed_ms=float(rng.uniform(0, 1e4)), c_tok_ms=float(rng.uniform(0, 1e4)),
                 c_width_ms=float(rng.uniform(0, 1.0)))
    if model_free:
        return CostModel(d_row_ms=float(rng.choice([0.0, rng.uniform(0, 0.5)])), **noise)
    return CostModel(d_fixed_ms=float(rng.uniform(0.1, 40.0)), d_tok_ms=float(rng.choice([0.0, rng.uniform(0, 3.0)])),
                     d_kv_ms=float(rng.choice([0.0, rng.uniform(0, 2e-3)])), d_row_ms=float(rng.uniform(0, 2.0)),
                     **noise)


def rate(rng: np.random.Generator, shape) -> np.ndarray:
    """Uniform in [0, 1], with the edges 0 and 1 a tenth of the time each."""
    u = rng.random(shape)
    return np.where(u < 0.1, 0.0, np.where(u < 0.2, 1.0, rng.uniform(size=shape)))


def random_problem(seed: int) -> Problem:
    rng = np.random.default_rng(seed)
    batch, count, max_k = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(1, 5))
    drafts = min(count, 2 if seed % 5 == 0 else 1)  # every fifth case two draft models, else one
    kinds = rng.permutation([False] * drafts + [True] * (count - drafts))  # model_free per proposer

    acceptance = rate(rng, (batch, count))
    fill = np.where(kinds, rate(rng, (batch, count)), 1.0)  # a draft model always fills
    return Problem(
        acceptance=acceptance, fill=fill,
        k_cap=rng.integers(0, max_k + 2, size=(batch, count)),  # sometimes beyond max_k: clipped
        available=rng.random((batch, count)) < 0.75,
        contexts=[int(x) for x in rng.integers(1, 4000, size=batch)],
        prefills=[int(rng.choice([0, 0, rng.integers(1, 300)])) for _ in range(batch)],
        verify=verify_cost(rng), proposers=[draft_cost(rng, bool(free)) for free in kinds], max_k=max_k,
    )


def check_allowed(problem: Problem, plan) -> None:
    for i, (p, k) in enumerate(zip(plan.proposers.tolist(), plan.ks.tolist())):
        if k == 0:
            assert p == -1
        else:
            assert problem.available[i, p] and k <= min(problem.k_cap[i, p], problem.max_k)


@pytest.mark.parametrize("seed", range(200))
def test_matches_brute_force_on_random_small_batches(seed):
    problem = random_problem(seed)
    plan = problem.solve()
    check_allowed(problem, plan)
    best = brute_force(problem)
    assert plan.goodput == pytest.approx(best, rel=1e-9)
    # the plan's own bookkeeping is the goodput of the plan it returns
    assert plan_goodput(problem, plan.proposers.tolist(), plan.ks.tolist()) == pytest.approx(plan.goodput, rel=1e-12)
    assert plan.baseline_goodput == pytest.approx(plan_goodput(problem, [-1] * len(plan.ks), [0] * len(plan.ks)),
                                                  rel=1e-12)
    tokens, step_ms = predict_choices(problem.acceptance, problem.fill, problem.contexts, problem.prefills,
                                      problem.verify, problem.proposers, plan.proposers, plan.ks)
    assert (tokens, step_ms) == pytest.approx((plan.expected_tokens, plan.step_ms), rel=1e-12)


@pytest.mark.parametrize("seed", range(60))
def test_a_start_goodput_anywhere_reaches_the_same_optimum(seed):
    """The previous step's optimum as a start: below, at or above this batch's optimum (or far off),
    the answer is brute force's, and a valid plan."""
    problem = random_problem(seed)
    best = brute_force(problem)
    for start in (0.0, best * 0.5, best * (1 - 1e-9), best, best * 1.05, best * 100.0, float("nan")):
        plan = optimize_choices(problem.acceptance, problem.fill, problem.k_cap, problem.contexts, problem.prefills,
                                problem.verify, problem.proposers, problem.max_k, available=problem.available,
                                start_goodput=start)
        check_allowed(problem, plan)
        assert plan.goodput == pytest.approx(best, rel=1e-9), start
        assert plan_goodput(problem, plan.proposers.tolist(), plan.ks.tolist()) == pytest.approx(plan.goodput,
                                                                                                rel=1e-12)


@pytest.mark.parametrize("seed", range(30))
def test_one_proposer_is_the_goodput_optimiser(seed):
    """With one proposer (its c_* and d_* in one cost model) the plan is optimize_goodput's, k for k."""
    rng = np.random.default_rng(1000 + seed)
    batch, max_k = int(rng.integers(1, 40)), int(rng.integers(1, 9))
    cost = verify_cost(rng).replace(**{name: value for name, value in draft_cost(rng, seed % 3 == 0).to_dict().items()
                                       if name.startswith("d_")})
    acceptance = rate(rng, batch)
    fill = rate(rng, batch) if seed % 2 else None
    contexts, prefills = rng.integers(1, 4000, size=batch), rng.integers(0, 300, size=batch)
    single = optimize_goodput(acceptance, contexts, prefills, cost, max_k, fill=fill)
    chosen = optimize_choices(acceptance[:, None], None if fill is None else fill[:, None], None, contexts, prefills,
                              cost, [cost], max_k)
    assert chosen.ks.tolist() == single.ks.tolist()
    assert chosen.proposers.tolist() == [0 if k else -1 for k in single.ks.tolist()]
    assert chosen.goodput == pytest.approx(single.goodput, rel=1e-12)
    assert chosen.baseline_goodput == pytest.approx(single.baseline_goodput, rel=1e-12)


def test_masks_and_caps_hold_in_a_large_batch_and_no_single_change_improves():
    """Too big for brute force (B = 24, P = 3, K = 8): every row within its mask and cap, and no
    one row moved to any other allowed (proposer, k) raises goodput: necessary for the optimum."""
    rng = np.random.default_rng(7)
    batch, count, max_k = 24, 3, 8
    problem = Problem(
        acceptance=rng.uniform(0.3, 1.0, size=(batch, count)), fill=np.column_stack(
            [rng.uniform(size=batch), rng.uniform(size=batch), np.ones(batch)]),
        k_cap=rng.integers(0, max_k + 1, size=(batch, count)), available=rng.random((batch, count)) < 0.6,
        contexts=[int(x) for x in rng.integers(100, 2000, size=batch)], prefills=[0] * batch,
        verify=CostModel(c_fixed_ms=30.0, c_spec_ms=3.0, c_spec_row_ms=0.3, c_tok_ms=0.4, c_width_ms=2e-5),
        proposers=[CostModel(d_row_ms=0.01), CostModel(d_row_ms=0.05), CostModel(d_fixed_ms=2.0, d_tok_ms=0.1)],
        max_k=max_k)
    plan = problem.solve()
    check_allowed(problem, plan)
    assert plan.ks.max() > 0 and len(set(plan.proposers.tolist()) - {-1}) > 1  # a mixed plan: not vacuous
    proposers, ks = plan.proposers.tolist(), plan.ks.tolist()
    assert plan_goodput(problem, proposers, ks) == pytest.approx(plan.goodput, rel=1e-12)
    for i in range(batch):
        for p, k in [(-1, 0)] + [(p, k) for p in range(count) if problem.available[i, p]
                                 for k in range(1, problem.k_cap[i, p] + 1)]:
            moved_p, moved_k = list(proposers), list(ks)
            moved_p[i], moved_k[i] = p, k
            assert plan_goodput(problem, moved_p, moved_k) <= plan.goodput * (1 + 1e-9)


def two_proposers(draft_fixed_ms: float) -> Problem:
    """Four rows; a free prompt lookup accepted at 0.7 and a draft model accepted at 0.8 (both
    always filling), verify at 30 ms + 1 ms per query token + 2 ms for speculating at all."""
    return Problem(
        acceptance=np.array([[0.7, 0.8]] * 4), fill=np.ones((4, 2)), k_cap=np.full((4, 2), 4),
        available=np.ones((4, 2), dtype=bool), contexts=[500] * 4, prefills=[0] * 4,
        verify=CostModel(c_fixed_ms=30.0, c_tok_ms=1.0, c_spec_ms=2.0),
        proposers=[CostModel(d_row_ms=0.01), CostModel(d_fixed_ms=draft_fixed_ms, d_row_ms=0.05)], max_k=4)


def test_a_better_but_costly_draft_loses_to_a_free_lookup_and_wins_when_cheap():
    """At 6 ms per draft depth, the draft's extra 0.1 acceptance is not worth it: every row asks
    the free lookup (the draft would have to run ~4 depths, 24 ms against ~2 more tokens of 4 rows'
    ~40 ms step). At 0.05 ms per depth the draft is nearly free and wins every row."""
    costly, cheap = two_proposers(6.0), two_proposers(0.05)
    costly_plan, cheap_plan = costly.solve(), cheap.solve()
    assert costly_plan.proposers.tolist() == [0] * 4 and costly_plan.ks.min() > 0
    assert cheap_plan.proposers.tolist() == [1] * 4 and cheap_plan.ks.min() > 0
    # the numbers say so: each plan beats the other's choice of proposer at its best k
    for problem, plan, other in [(costly, costly_plan, 1), (cheap, cheap_plan, 0)]:
        assert plan.goodput == pytest.approx(brute_force(problem), rel=1e-9)
        alternative = max(plan_goodput(problem, [other] * 4, [k] * 4) for k in range(1, 5))
        assert plan.goodput > alternative * 1.01


def test_draft_depth_is_shared_by_its_rows_only():
    """A draft's per-depth cost caps the rows that use it, not the rows of a free proposer in the
    same batch: the lookup rows go deeper than the draft rows. Exact against brute force."""
    problem = Problem(
        acceptance=np.array([[0.95, 0.9], [0.95, 0.9], [0.0, 0.9], [0.0, 0.9]]), fill=np.ones((4, 2)),
        k_cap=np.full((4, 2), 4), available=np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool),
        contexts=[300] * 4, prefills=[0] * 4, verify=CostModel(c_fixed_ms=30.0, c_tok_ms=0.5),
        proposers=[CostModel(), CostModel(d_fixed_ms=4.0)], max_k=4)
    plan = problem.solve()
    assert plan.proposers.tolist() == [0, 0, 1, 1]
    assert plan.ks[:2].min() > plan.ks[2:].max() > 0
    assert plan.goodput == pytest.approx(brute_force(problem), rel=1e-9)


def test_ties_go_to_smaller_k_then_lower_proposer():
    """Three identical proposers: each row asks the first one it may ask."""
    same, verify = [CostModel(d_row_ms=0.1)] * 3, CostModel(c_fixed_ms=40.0, c_tok_ms=0.1)
    plan = optimize_choices(np.full((2, 3), 0.9), None, None, [100, 100], [0, 0], verify, same, 4,
                            available=np.array([[1, 1, 1], [0, 1, 1]], dtype=bool))
    assert plan.proposers.tolist() == [0, 1] and plan.ks.min() > 0
    # proposals that are never accepted and cost nothing: nobody speculates, proposer -1
    idle = optimize_choices(np.zeros((2, 3)), None, None, [10, 10], [0, 0], CostModel(c_fixed_ms=5.0),
                            [CostModel()] * 3, 4)
    assert idle.ks.tolist() == [0, 0] and idle.proposers.tolist() == [-1, -1]


def test_ignored_fields_change_nothing():
    """verify_cost's d_* and the proposers' c_* do not enter the objective."""
    problem = two_proposers(6.0)
    plan = problem.solve()
    noisy_verify = problem.verify.replace(d_fixed_ms=1e3, d_tok_ms=1e3, d_kv_ms=1.0, d_row_ms=1e3)
    noisy = [c.replace(c_fixed_ms=1e3, c_spec_ms=1e3, c_tok_ms=1e3, c_width_ms=1.0, overhead_ms=1e3)
             for c in problem.proposers]
    again = optimize_choices(problem.acceptance, problem.fill, problem.k_cap, problem.contexts, problem.prefills,
                             noisy_verify, noisy, problem.max_k)
    assert again.ks.tolist() == plan.ks.tolist() and again.proposers.tolist() == plan.proposers.tolist()
    assert again.goodput == plan.goodput


def test_nothing_to_ask_empty_batch_and_zero_max_k():
    cost, proposers = CostModel(c_fixed_ms=20.0), [CostModel(), CostModel(d_fixed_ms=1.0)]
    for plan in [
        optimize_choices(np.full((3, 2), 0.9), None, None, [5] * 3, [0] * 3, cost, proposers, 4,
                         available=np.zeros((3, 2), dtype=bool)),
        optimize_choices(np.full((3, 2), 0.9), None, np.zeros((3, 2), dtype=int), [5] * 3, [0] * 3, cost, proposers, 4),
        optimize_choices(np.full((3, 2), 0.9), None, None, [5] * 3, [0] * 3, cost, proposers, 0),
    ]:
        assert plan.ks.tolist() == [0] * 3 and plan.proposers.tolist() == [-1] * 3
        assert plan.goodput == plan.baseline_goodput == pytest.approx(3 / 20.0)
    empty = optimize_choices(np.zeros((0, 2)), None, None, [], [], cost, proposers, 4)
    assert empty.ks.tolist() == [] and empty.proposers.tolist() == []


def test_errors():
    good = (np.full((2, 2), 0.5), None, None, [5, 5], [0, 0])
    with pytest.raises(ValueError, match="zero step time"):
        optimize_choices(*good, CostModel(), [CostModel()] * 2, 4)
    with pytest.raises(ValueError, match="proposer costs"):
        optimize_choices(*good, CostModel(c_fixed_ms=1.0), [CostModel()], 4)
    with pytest.raises(ValueError, match="must match"):
        optimize_choices(np.full((2, 2), 0.5), None, np.ones((2, 3)), [5, 5], [0, 0], CostModel(c_fixed_ms=1.0),
                         [CostModel()] * 2, 4)
    drafts = [CostModel(d_fixed_ms=1.0)] * (MAX_DEPTH_PROPOSERS + 1)
    with pytest.raises(ValueError, match="per-depth cost"):
        optimize_choices(np.full((2, len(drafts)), 0.5), None, None, [5, 5], [0, 0], CostModel(c_fixed_ms=1.0),
                         drafts, 4)

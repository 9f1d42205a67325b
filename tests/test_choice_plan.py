"""(member, k) plans for a worker with a draft model among its proposers (worker/choice_plan.py)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from smartspec.core.cost_model import CostModel
from smartspec.core.policies.choice_optimizer import predict_choices
from smartspec.worker.choice_plan import choosing_proposers, plan_choices
from smartspec.worker.local_policy import LocalPolicyPlanner, local_policy_choice
from smartspec.worker.proposers import GREEDY, Proposal, ProposalRequest, Proposer
from smartspec.worker.proposers.choice import ProposerChoice
from smartspec.worker.steps import SpeculationQuery

VERIFY = CostModel(c_fixed_ms=40.0, c_tok_ms=0.5, c_spec_row_ms=0.2, c_row_ms=1.0)


class Lookup(Proposer):
    """Model-free: offers `offers[seq_id]` copies of token 7."""

    kind = 0
    reports_lookahead = True

    def __init__(self, offers: dict[str, int]) -> None:
        self.offers = offers

    def propose(self, requests: Sequence[ProposalRequest]) -> list[Proposal]:
        return [Proposal([7] * min(self.offers.get(r.seq_id, 0), r.k)) for r in requests]

    def lookahead(self, seq_id: str, token_ids: list[int], max_k: int) -> int | None:
        return min(self.offers.get(seq_id, 0), max_k)


class Draft(Proposer):
    """Costly: offers whatever it is asked (its price is whatever seed_costs says)."""

    kind = 0

    def propose(self, requests: Sequence[ProposalRequest]) -> list[Proposal]:
        return [Proposal([9] * r.k) for r in requests]


def choice_with(offers: dict[str, int], draft_cost: CostModel) -> ProposerChoice:
    choice = ProposerChoice([Lookup(offers), Draft()], ["lookup", "draft"])
    choice.seed_costs(draft_cost)
    for seq_id in offers:
        choice.lookahead(seq_id, [1, 2, 3], 8)
    return choice


QUERIES = [SpeculationQuery("copying", 300), SpeculationQuery("dry", 300)]


def plan(choice, cost, *, max_k, min_gain=0.0, probe_interval=0, held=(0, 0), step_index=1, probe_now=False):
    """plan_choices for QUERIES under goodput's parameters; `held`: each row's steps at k = 0."""
    params = {"min_gain": min_gain, "probe_interval": probe_interval, "max_k": 0}
    return plan_choices(choice, cost, QUERIES, max_k=max_k, params=params,
                        steps_since_speculation=np.array(held), step_index=step_index, probe_now=probe_now)


def test_a_cheap_draft_takes_the_row_lookup_cannot_serve_and_a_costly_one_is_left_out():
    cheap = choice_with({"copying": 6, "dry": 0}, CostModel(d_fixed_ms=0.5, d_tok_ms=0.1))
    ks = plan(cheap, VERIFY, max_k=6)
    assert ks["dry"] > 0 and cheap._assigned["dry"] == 1      # only the draft can offer it anything
    assert ks["copying"] > 0
    costly = choice_with({"copying": 6, "dry": 0}, CostModel(d_fixed_ms=60.0))
    ks = plan(costly, VERIFY, max_k=6)
    assert ks["dry"] == 0 and ks["copying"] > 0 and costly._assigned == {"copying": 0}


def test_the_plan_is_the_best_of_every_member_and_k_for_a_small_batch():
    choice = choice_with({"copying": 3, "dry": 1}, CostModel(d_fixed_ms=4.0, d_tok_ms=0.3))
    ks = plan(choice, VERIFY, max_k=4)
    options = choice.options(["copying", "dry"], 4)
    costs = choice.member_costs()
    contexts, prefills = [300.0, 300.0], [0.0, 0.0]

    def goodput(members, plan_ks):
        tokens, ms = predict_choices(options.acceptance, None, contexts, prefills, VERIFY, costs, members, plan_ks)
        return tokens / ms

    best = max(goodput([m0, m1], [k0, k1])
               for m0 in (0, 1) for m1 in (0, 1)
               for k0 in range(int(options.caps[0, m0]) + 1) for k1 in range(int(options.caps[1, m1]) + 1))
    members = [choice._assigned.get(q.request_id, 0) for q in QUERIES]
    assert abs(goodput(members, [ks["copying"], ks["dry"]]) - best) <= 1e-9 * best


def test_below_min_gain_the_step_runs_plain_and_assigns_nobody():
    choice = choice_with({"copying": 6, "dry": 0}, CostModel(d_fixed_ms=0.5))
    choice.assign({"copying": 1})
    expensive_tokens = VERIFY.replace(c_tok_ms=8.0)   # a proposal costs ~ a fifth of a step: barely pays
    assert plan(choice, expensive_tokens, max_k=6, min_gain=0.5) == {"copying": 0, "dry": 0}
    assert choice._assigned == {}


def test_a_row_held_at_k0_is_probed_with_its_k_only_member():
    """Without probes, a request whose first proposals failed would never be tried again: after
    probe_interval steps at k = 0 it gets k = 1 from the member a k-only plan would use."""
    choice = choice_with({"copying": 6, "dry": 0}, CostModel(d_fixed_ms=60.0))
    for _ in range(40):   # the lookup member failed the copying row over and over: not worth a plan
        choice.assign({"copying": 0})
        choice.propose([ProposalRequest("copying", [1, 2, 3], 6, GREEDY)])
        choice.observe_verification("copying", 6, 0, 1)
    assert plan(choice, VERIFY, max_k=6, min_gain=0.05) == {"copying": 0, "dry": 0}
    # Probes wait for a step index divisible by their interval: step 0 is divisible by any.
    ks = plan(choice, VERIFY, max_k=6, min_gain=0.05, probe_interval=8, held=(500, 500), step_index=0)
    assert ks == {"copying": 1, "dry": 0}   # only the draft could serve dry: probes are model-free
    assert choice._assigned == {"copying": 0}
    assert plan(choice, VERIFY, max_k=6, min_gain=0.05, probe_interval=8, held=(3, 3), step_index=0) == \
        {"copying": 0, "dry": 0}                            # not held long enough
    assert plan(choice, VERIFY, max_k=6, min_gain=0.05, probe_interval=8, held=(500, 500), step_index=3) == \
        {"copying": 0, "dry": 0}                            # nobody else speculates: probes wait their turn
    # ... unless this is the measured-goodput guard's probe step: then every row at k = 0 is probed.
    assert plan(choice, VERIFY, max_k=6, min_gain=0.05, probe_interval=8, held=(1, 1), step_index=3,
                probe_now=True) == {"copying": 1, "dry": 0}


def test_only_goodput_with_a_costly_member_plans_members_and_the_local_planner_does():
    choice = choice_with({"copying": 6, "dry": 0}, CostModel(d_fixed_ms=0.5, d_tok_ms=0.1))
    free_only = ProposerChoice([Lookup({}), Lookup({})])
    assert choosing_proposers(choice, "goodput") and not choosing_proposers(choice, "fixed")
    assert not choosing_proposers(free_only, "goodput") and not choosing_proposers(Draft(), "goodput")
    planner = LocalPolicyPlanner(local_policy_choice("goodput:min_gain=0"), max_k=6, cost=VERIFY, proposer=choice)
    ks = planner.plan(0, QUERIES, 0)
    assert ks["dry"] > 0 and choice._assigned["dry"] == 1


def test_a_fresh_worker_probes_every_row_a_free_member_can_serve():
    """As the goodput policy does while its kind's pool is cold: before the member pools hold
    COLD_EVIDENCE tested positions, a row the optimiser leaves at k = 0 gets a probe now."""
    choice = choice_with({"copying": 6, "dry": 0}, CostModel(d_fixed_ms=60.0))
    expensive = VERIFY.replace(c_spec_ms=60.0)   # a speculative step costs +150%: nothing pays at the cold 0.5
    assert plan(choice, expensive, max_k=6, min_gain=0.05) == {"copying": 0, "dry": 0}
    assert plan(choice, expensive, max_k=6, min_gain=0.05, probe_interval=8, held=(0, 0), step_index=3) == \
        {"copying": 1, "dry": 0}
    for _ in range(20):   # evidence gathered: probes go back to their interval
        choice.assign({"copying": 0})
        choice.propose([ProposalRequest("copying", [1, 2, 3], 6, GREEDY)])
        choice.observe_verification("copying", 6, 0, 1)
    assert plan(choice, expensive, max_k=6, min_gain=0.05, probe_interval=8, held=(0, 0), step_index=3) == \
        {"copying": 0, "dry": 0}

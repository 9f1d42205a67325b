"""(proposer, k) per request, for a worker whose proposer list includes a draft model.

With model-free members only, which member fills a row does not change the step's cost, so the
planner's k plus the member's own pick (worker/proposers/choice.py) is already the optimum. A draft
model has a cost per depth and per token of its own: giving it a row can make the whole step
slower, and giving it to one more row is nearly free once it runs at that depth anyway. So under
the `goodput` policy such a worker plans rows and members together, with the exact (proposer, k)
optimiser (core/policies/choice_optimizer.py): the verify terms from the planner's cost model (the
controller's basis, or the local fit), each member's own terms from its timed calls, each row's
acceptance with each member from ProposerChoice's per-(request, member) records. The policy's
parameters apply as they do to k alone: `max_k`; `min_gain` (a plan predicted to gain less than that
over plain decoding runs plain); `probe_interval` (a row held at k = 0 that long gets a k = 1 probe
from its k-only member, within the policy's probe budget: without probes, a request whose first
proposals failed would never be tried again). The measured-goodput guard's cap comes in as max_k.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from smartspec.core.cost_model import CostModel
from smartspec.core.decision import AcceptanceBook
from smartspec.core.policies.choice_optimizer import optimize_choices, predict_choices
from smartspec.core.policies.goodput import COLD_EVIDENCE, budgeted_probes

from .goodput_guard import GoodputGuard
from .proposers.choice import ProposerChoice
from .steps import SpeculationQuery

log = logging.getLogger(__name__)

CHOOSING_POLICY = "goodput"


def choosing_proposers(proposer: Any, policy_name: str) -> bool:
    """Whether this worker's plan is (member, k) per row rather than k alone."""
    return isinstance(proposer, ProposerChoice) and proposer.has_costly_member and policy_name == CHOOSING_POLICY


def plan_choices(choice: ProposerChoice, cost: CostModel, queries: Sequence[SpeculationQuery], *, max_k: int,
                 params: Mapping[str, Any], steps_since_speculation: np.ndarray, step_index: int,
                 probe_now: bool = False) -> dict[str, int]:
    """k per query; the member of every row with k > 0 is handed to `choice.assign` for the step.
    `params`: the goodput policy's (min_gain, probe_interval, max_k); `steps_since_speculation`
    ([B], the book's) drives its probes: a row held at k = 0 that long gets k = 1 from its
    k-only member, with the policy's probe rule and budget (core/policies/goodput.py). `probe_now`:
    this step is the measured-goodput guard's probe (speculation held off at this batch size): every
    row at k = 0 is probed now, or the guard's probe steps and the policy's would rarely coincide
    (one in ~500 steps at batch 1 here) and a held-off worker would stay plain. Likewise while the
    worker's member pools hold fewer than COLD_EVIDENCE tested positions (a fresh worker), as the
    goodput policy probes while its kind's pool is cold."""
    ids = [q.request_id for q in queries]
    if params.get("max_k"):
        max_k = min(max_k, int(params["max_k"]))
    options = choice.options(ids, max_k)
    contexts = np.array([q.context_tokens for q in queries], dtype=np.float64)  # [B]
    prefills = np.zeros(len(ids))  # [B]
    costs = choice.member_costs()
    try:
        solution = optimize_choices(options.acceptance, None, options.caps, contexts, prefills, cost, costs, max_k,
                                    start_goodput=choice.planned_goodput)
    except ValueError as exc:  # a cost model predicting a zero step: plan plain, as guarded_decide does
        log.warning("(proposer, k) plan failed (%s); this step runs plain", exc)
        choice.assign({})
        return {request_id: 0 for request_id in ids}
    ks, members = solution.ks, solution.proposers
    if solution.goodput < solution.baseline_goodput * (1.0 + params["min_gain"]):
        ks, members = np.zeros_like(ks), np.full_like(members, -1)
    if max_k > 0 and params["probe_interval"] > 0:
        k_only = choice.k_only_members(ids)  # [B]

        def step_ms(plan_ks: np.ndarray) -> float:  # probed rows ask their k-only member
            planned = np.where(plan_ks > ks, k_only, members)
            return predict_choices(options.acceptance, None, contexts, prefills, cost, costs,
                                   np.maximum(planned, 0), plan_ks)[1]

        # Probes only with a model-free member: a draft model's first proposal for a request feeds it
        # the whole context (a slow step the guard would hold against every proposer); the draft is
        # tried where the optimiser itself picks it. `now`: the guard's probe step, or a fresh worker
        # (as the goodput policy probes while its kind has almost no evidence); the guard spaces its
        # own probes.
        probed = budgeted_probes(ks, steps_since_speculation, step_index, params["probe_interval"],
                                 now=probe_now or choice.pooled_tested() < COLD_EVIDENCE, step_ms=step_ms,
                                 allowed=~np.array(choice.costly, dtype=bool)[k_only])
        members = np.where(probed > ks, k_only, members)
        ks = probed
    choice.assign({request_id: int(member) for request_id, member, k
                   in zip(ids, members.tolist(), ks.tolist()) if k > 0}, goodput=solution.goodput)
    return dict(zip(ids, ks.tolist()))


def plan_for_planner(choice: ProposerChoice, cost: CostModel, params: Mapping[str, Any], book: AcceptanceBook,
                     guard: GoodputGuard | None, queries: Sequence[SpeculationQuery], *, max_k: int,
                     step_index: int) -> dict[str, int]:
    """`plan_choices` as a planner calls it (the local one and the basis re-plan): each row's steps
    at k = 0 from the planner's book, the guard's probe step from its guard (`max_k` already capped)."""
    return plan_choices(choice, cost, queries, max_k=max_k, params=params,
                        steps_since_speculation=book.evidence(queries).steps_since_speculation,
                        step_index=step_index,
                        probe_now=max_k > 0 and guard is not None and guard.held_off(len(queries)))

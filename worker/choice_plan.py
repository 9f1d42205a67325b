"""(proposer, k) per request, for a worker whose proposer list includes a draft model.

With model-free members only, which member fills a row does not change the step's cost, so the
planner's k plus the member's own pick (worker/proposers/choice.py) is already the optimum. A draft
model has a cost per depth and per token of its own: giving it a row can make the whole step
slower, and giving it to one more row is nearly free once it runs at that depth anyway. So under
the `goodput` policy such a worker plans rows and members together, with the exact (proposer, k)
optimiser (core/policies/choice_optimizer.py): the verify terms from the planner's cost model (the
controller's basis, or the local fit), each member's own terms from its timed calls, each row's
acceptance with each member from ProposerChoice's per-(request, member) records. The policy's
`min_gain` applies as it does to k alone: a plan predicted to gain less than that over plain
decoding runs plain. The measured-goodput guard's cap (max_k) comes in as for any goodput plan.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from smartspec.core.cost_model import CostModel
from smartspec.core.policies.choice_optimizer import optimize_choices

from .proposers.choice import ProposerChoice
from .steps import SpeculationQuery

log = logging.getLogger(__name__)

CHOOSING_POLICY = "goodput"


def choosing_proposers(proposer: Any, policy_name: str) -> bool:
    """Whether this worker's plan is (member, k) per row rather than k alone."""
    return isinstance(proposer, ProposerChoice) and proposer.has_costly_member and policy_name == CHOOSING_POLICY


def plan_choices(choice: ProposerChoice, cost: CostModel, queries: Sequence[SpeculationQuery], *, max_k: int,
                 min_gain: float) -> dict[str, int]:
    """k per query; the member of every row with k > 0 is handed to `choice.assign` for the step."""
    ids = [q.request_id for q in queries]
    options = choice.options(ids, max_k)
    contexts = np.array([q.context_tokens for q in queries], dtype=np.float64)  # [B]
    try:
        solution = optimize_choices(options.acceptance, None, options.caps, contexts, np.zeros(len(ids)), cost,
                                    choice.member_costs(), max_k)
    except ValueError as exc:  # a cost model predicting a zero step: plan plain, as guarded_decide does
        log.warning("(proposer, k) plan failed (%s); this step runs plain", exc)
        solution = None
    if solution is None or solution.goodput < solution.baseline_goodput * (1.0 + min_gain):
        choice.assign({})
        return {request_id: 0 for request_id in ids}
    choice.assign({request_id: int(member) for request_id, member, k
                   in zip(ids, solution.proposers.tolist(), solution.ks.tolist()) if k > 0})
    return dict(zip(ids, solution.ks.tolist()))

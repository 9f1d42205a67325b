"""Re-solving the controller's plan for the batch the worker actually runs (plan-ahead).

The worker never waits for the answer to the report it just sent: it runs step t+1 with the newest
plan it holds, which answers report t-1 (or t, when the controller was quick). Between that report
and this step, requests joined or finished, prompt lookup found or lost its match, and each running
request verified one more step. Only the worker knows those facts; only the controller knows the
shared ones (the active policy, the cost model fitted over every worker of the profile, the
acceptance prior pooled over all workers, the measured-goodput guard's cap). The plan's `basis`
carries the controller's part, and `replan` runs the controller's own decision pipeline
(`core/decision.py`: the same estimates, the same registered policy through the same
`guarded_decide`, the same look-ahead cap) on the worker's fresh batch, so for the same facts it
makes the controller's plan. For `goodput` this is the exact optimum for the batch as it is now,
made in well under a millisecond, with estimates one step fresher than the controller's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from smartspec.core.acceptance import PooledPrior
from smartspec.core.codec import parameters_from_proto
from smartspec.core.cost_model import CostModel
from smartspec.core.decision import AcceptanceBook, Estimator
from smartspec.core.policies import registry
from smartspec.core.policies.base import Policy
from smartspec.core.errors import FieldError
from smartspec.v1 import controller_pb2

from .choice_plan import choosing_proposers, plan_for_planner
from .proposers.choice import ProposerChoice
from .goodput_guard import GoodputGuard
from .steps import SpeculationQuery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanBasis:
    """A decoded `smartspec.v1.PlanBasis`; `policy` is None when this worker cannot run it."""

    policy: Policy | None
    params: Mapping[str, Any]
    policy_version: int
    cost: CostModel
    prior: PooledPrior
    estimator: Estimator
    max_k: int
    member_priors: Mapping[int, PooledPrior] = field(default_factory=dict)  # by member ProposerKind value


def decode_basis(message: controller_pb2.PlanBasis) -> PlanBasis | None:
    """The basis of a plan, or None when the plan carries none (an older controller) or it is
    unusable here (a policy not registered in this process, a malformed cost model): the worker
    then applies the plan's own speculation lengths."""
    if not message.HasField("policy") or not message.HasField("cost_model"):
        return None
    try:
        policy = registry.get(message.policy.name)
        params = policy.validate(parameters_from_proto(message.policy.parameters))
        cost = CostModel.from_proto(message.cost_model)
        prior = PooledPrior(message.prior_accepted, message.prior_tested, message.prior_proposed,
                            message.prior_requested)
    except (FieldError, KeyError, ValueError) as exc:
        log.warning("plan basis unusable on this worker (%s); applying the controller's k as sent", exc)
        return None
    return PlanBasis(
        policy=policy,
        params=params,
        policy_version=message.policy_version,
        cost=cost,
        prior=prior,
        estimator=Estimator(prior_strength=message.prior_strength, cold_rate=message.cold_acceptance,
                            cold_fill=message.cold_fill),
        max_k=message.max_speculation_length,
        member_priors={m.kind: PooledPrior(m.accepted, m.tested, m.proposed, m.requested)
                       for m in message.member_priors},
    )


def replan(basis: PlanBasis, book: AcceptanceBook, queries: Sequence[SpeculationQuery], *, step_index: int,
           queued_requests: int, max_k: int, guard: GoodputGuard | None = None,
           proposer: Any = None) -> dict[str, int]:
    """k for every query: the basis's policy on the worker's own batch, capped by what each
    request's proposer can offer next step (and, for `goodput`, by the measured-goodput guard);
    (member, k) under `goodput` where `proposer` is a choice with a draft model (choice_plan.py).
    Never raises (guarded_decide falls back to k = 0)."""
    max_k = min(max_k, basis.max_k)
    if guard is not None:
        max_k = guard.cap_for(basis.policy.name, len(queries), max_k)
    if basis.member_priors and isinstance(proposer, ProposerChoice):
        proposer.use_member_priors(basis.member_priors)
    if choosing_proposers(proposer, basis.policy.name):
        return plan_for_planner(proposer, basis.cost, basis.params, book, guard, queries, max_k=max_k,
                                step_index=step_index)
    return book.plan(basis.policy, basis.params, basis.cost, queries, max_k=max_k, queued_requests=queued_requests,
                     step_index=step_index, prior=basis.prior, estimator=basis.estimator)

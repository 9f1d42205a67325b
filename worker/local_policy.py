"""Planning without a controller: a registered policy run in-process (`--controller none`).

The controller's decision pipeline (`core/decision.py`), on evidence and a pooled prior this worker
keeps itself by the controller's rules (an `AcceptanceBook`), with a cost model that starts from
the startup profile's fit and learns from every measured step, as the controller's does (the
profile is taken one row at a time: a draft model at batch 12 cost 3x what it predicted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from smartspec.core.cost_fit import OnlineCostFit, attended_context
from smartspec.core.cost_model import DEFAULT_COST_MODEL, CostModel
from smartspec.core.decision import AcceptanceBook
from smartspec.core.policies.base import Policy
from smartspec.core.policy_spec import parse_policy_spec

from .choice_plan import choosing_proposers, plan_for_planner
from .goodput_guard import GoodputGuard
from .steps import SpeculationQuery, StepFacts


@dataclass(frozen=True)
class PolicyChoice:
    """A validated policy with its parameters."""

    policy: Policy
    params: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.policy.name


def local_policy_choice(spec: str, extra: Sequence[str] = ()) -> PolicyChoice:
    """`--local-policy SPEC --local-policy-param KEY=VALUE...` (the grammar of core/policy_spec.py) as
    the validated policy the local planner runs; PolicyError (a FieldError) naming `local_policy` or
    `local_policy.KEY`."""
    parsed = parse_policy_spec(spec, extra, field="local_policy")
    return PolicyChoice(parsed.policy, parsed.params)


class LocalPolicyPlanner:
    """A Planner that decides in-process with a registered policy."""

    def __init__(self, choice: PolicyChoice, *, max_k: int, cost: CostModel = DEFAULT_COST_MODEL,
                 metrics: Any = None, proposer: Any = None) -> None:
        self.choice = choice
        self.proposer = proposer  # the worker's: a ProposerChoice with a draft model gets (member, k) plans
        self.max_k = max_k
        self.cost = cost
        self.cost_fit = OnlineCostFit.create(prior=cost)
        self.book = AcceptanceBook()
        self.guard = GoodputGuard(metrics=metrics)
        self.fallback_steps = 0

    def plan(self, step_index: int, queries: Sequence[SpeculationQuery], queued_requests: int) -> dict[str, int]:
        max_k = self.guard.cap_for(self.choice.name, len(queries), self.max_k)
        if choosing_proposers(self.proposer, self.choice.name):
            return plan_for_planner(self.proposer, self.cost, self.choice.params, self.book, self.guard, queries,
                                    max_k=max_k, step_index=step_index)
        return self.book.plan(self.choice.policy, self.choice.params, self.cost, queries, max_k=max_k,
                              queued_requests=queued_requests, step_index=step_index)

    def observe(self, facts: StepFacts) -> None:
        self.book.observe(facts)
        self.guard.observe(facts)
        self._learn_cost(facts)

    def _learn_cost(self, facts: StepFacts) -> None:
        """Fold the measured step into the cost fit, as the controller's `learn_step_cost` does."""
        rows = facts.requests
        if not rows or facts.draft_ms + facts.verify_ms <= 0:
            return
        proposed, accepted, prefill, context = np.array(
            [(r.proposed_tokens, r.accepted_tokens, r.prefill_tokens, r.context_tokens) for r in rows],
            dtype=np.int64).T                                                        # each [B]
        self.cost_fit.observe(proposed, attended_context(context, accepted, prefill), prefill, facts.draft_ms,
                              facts.verify_ms, facts.total_ms if facts.total_ms > 0 else None)
        self.cost = self.cost_fit.model()

    def close(self) -> None:
        pass

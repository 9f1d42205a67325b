"""Planning without a controller: a registered policy run in-process (`--controller none`).

The controller's decision pipeline (`core/decision.py`), on evidence and a pooled prior this worker
keeps itself by the controller's rules (an `AcceptanceBook`), with a cost model fitted from the
startup profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from smartspec.core.cost_model import DEFAULT_COST_MODEL, CostModel
from smartspec.core.decision import AcceptanceBook
from smartspec.core.policies.base import Policy
from smartspec.core.policy_spec import parse_policy_spec

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
                 metrics: Any = None) -> None:
        self.choice = choice
        self.max_k = max_k
        self.cost = cost
        self.book = AcceptanceBook()
        self.guard = GoodputGuard(metrics=metrics)
        self.fallback_steps = 0

    def plan(self, step_index: int, queries: Sequence[SpeculationQuery], queued_requests: int) -> dict[str, int]:
        max_k = self.guard.cap_for(self.choice.name, len(queries), self.max_k)
        return self.book.plan(self.choice.policy, self.choice.params, self.cost, queries, max_k=max_k,
                              queued_requests=queued_requests, step_index=step_index)

    def observe(self, facts: StepFacts) -> None:
        self.book.observe(facts)
        self.guard.observe(facts)

    def close(self) -> None:
        pass

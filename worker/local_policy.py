"""Planning without a controller: a registered policy run in-process (`--controller none`).

The same policy code the controller runs, through the same `guarded_decide`, fed with acceptance
estimates this worker keeps itself (own history shrunk toward a pooled prior, as the controller
does) and a cost model fitted from the startup profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from smartspec.core.acceptance import (
    DEFAULT_PRIOR_FILL,
    DEFAULT_PRIOR_RATE,
    DEFAULT_PRIOR_STRENGTH,
    AcceptanceState,
    PooledPrior,
    cap_to_proposable,
    next_step_fill,
    requested_or_proposed,
)
from smartspec.core.cost_model import DEFAULT_COST_MODEL, CostModel
from smartspec.core.policies import registry
from smartspec.core.policies.base import BatchState, ParameterType, Policy, PolicyError, RequestState
from smartspec.core.policies.guard import guarded_decide

from .goodput_guard import GoodputGuard
from .steps import PlanQuery, StepFacts


@dataclass(frozen=True)
class PolicyChoice:
    """A validated policy with its parameters."""

    policy: Policy
    params: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.policy.name


def parse_value(raw: str, kind: ParameterType) -> Any:
    """A command-line string as a typed policy parameter ("3", "0.5", "true", "1,2,4")."""
    parsers = {
        ParameterType.INT: int,
        ParameterType.FLOAT: float,
        ParameterType.BOOL: lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False,
                                       "no": False}[s.strip().lower()],
        ParameterType.STRING: str,
        ParameterType.INT_LIST: lambda s: [int(part) for part in s.split(",") if part.strip()],
    }
    return parsers[kind](raw)


def parse_policy_spec(spec: str, extra: Sequence[str] = ()) -> PolicyChoice:
    """`name`, `name:value` (value of the policy's first parameter, e.g. `fixed:3`) plus
    `key=value` strings; raises PolicyError naming the bad part."""
    name, _, shorthand = spec.partition(":")
    try:
        policy = registry.get(name.strip())
    except KeyError as exc:
        raise PolicyError("local_policy", f"unknown policy {name!r} (known: {', '.join(registry.names())})") from exc
    specs = {p.name: p for p in policy.parameters}
    pairs: list[tuple[str, str]] = []
    if shorthand:
        if not policy.parameters:
            raise PolicyError("local_policy", f"policy {name!r} takes no parameters")
        pairs.append((policy.parameters[0].name, shorthand))
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise PolicyError("local_policy_param", f"expected key=value, got {item!r}")
        pairs.append((key.strip(), value))
    raw: dict[str, Any] = {}
    for key, value in pairs:
        if key not in specs:
            raise PolicyError(key, f"unknown parameter of {name!r} (allowed: {', '.join(specs) or 'none'})")
        try:
            raw[key] = parse_value(value, specs[key].type)
        except (ValueError, KeyError) as exc:
            raise PolicyError(key, f"cannot read {value!r} as {specs[key].type.name.lower()}") from exc
    return PolicyChoice(policy, policy.validate(raw))


@dataclass(frozen=True)
class Estimator:
    """How estimates blend own history with the pooled prior (the controller's PlannerSettings)."""

    prior_strength: float = DEFAULT_PRIOR_STRENGTH
    cold_rate: float = DEFAULT_PRIOR_RATE
    cold_fill: float = DEFAULT_PRIOR_FILL


@dataclass
class AcceptanceBook:
    """Per-request acceptance and fill history plus a prior pooled over finished requests."""

    prior: PooledPrior = field(default_factory=PooledPrior)
    requests: dict[str, AcceptanceState] = field(default_factory=dict)
    proposable: dict[str, int | None] = field(default_factory=dict)  # what each can be offered next step

    def observe(self, facts: StepFacts) -> None:
        for outcome in facts.requests:
            state = self.requests.get(outcome.request_id, AcceptanceState())
            # Prefill steps and cancellation records carry no evidence (and are not decode steps).
            is_decode = outcome.prefill_tokens == 0 and (outcome.proposed_tokens > 0 or not outcome.finished)
            if is_decode:
                state = state.update(outcome.proposed_tokens, outcome.accepted_tokens, outcome.tested_positions,
                                     requested_or_proposed(outcome.requested_tokens, outcome.proposed_tokens))
            if outcome.finished:
                self.requests.pop(outcome.request_id, None)
                self.proposable.pop(outcome.request_id, None)
                if state.tested or state.requested:
                    self.prior = self.prior.update(state.accepted, state.tested,
                                                   proposed=state.proposed, requested=state.requested)
            else:
                self.requests[outcome.request_id] = state
                self.proposable[outcome.request_id] = outcome.proposable_tokens

    def request_state(self, query: PlanQuery, prior: PooledPrior | None = None,
                      estimator: Estimator | None = None) -> RequestState:
        """The request as a policy sees it for the next step: own history shrunk toward `prior`
        (default: this book's own pooled prior), fill from the look-ahead when there is one."""
        prior = self.prior if prior is None else prior
        estimator = estimator or Estimator()
        state = self.requests.get(query.request_id, AcceptanceState())
        return RequestState(
            request_id=query.request_id,
            acceptance=state.estimate(prior, estimator.prior_strength, estimator.cold_rate),
            fill=next_step_fill(state.fill_estimate(prior, estimator.prior_strength, estimator.cold_fill),
                                self.proposable.get(query.request_id)),
            context_tokens=query.context_tokens,
            last_k=state.last_k,
            last_fully_accepted=state.last_fully_accepted,
            steps_since_speculation=state.steps_since_speculation,
            evidence=float(state.tested),
        )

    def batch_state(self, queries: Sequence[PlanQuery], *, max_k: int, queued_requests: int, step_index: int,
                    prior: PooledPrior | None = None, estimator: Estimator | None = None) -> BatchState:
        prior = self.prior if prior is None else prior
        return BatchState(
            requests=tuple(self.request_state(q, prior, estimator) for q in queries),
            max_k=max_k,
            queued_requests=queued_requests,
            step_index=step_index,
            pooled_evidence=prior.tested,
        )

    def cap(self, queries: Sequence[PlanQuery], ks: Sequence[int]) -> dict[str, int]:
        """k per request, never more than its proposer can offer next step."""
        capped = cap_to_proposable(ks, [self.proposable.get(q.request_id) for q in queries])
        return {q.request_id: k for q, k in zip(queries, capped)}


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

    def plan(self, step_index: int, queries: Sequence[PlanQuery], queued_requests: int) -> dict[str, int]:
        max_k = self.guard.cap_for(self.choice.name, len(queries), self.max_k)
        batch = self.book.batch_state(queries, max_k=max_k, queued_requests=queued_requests,
                                      step_index=step_index)
        ks = guarded_decide(self.choice.policy, batch, self.cost, self.choice.params,
                            prior_acceptance=self.book.prior.rate())
        return self.book.cap(queries, ks)

    def observe(self, facts: StepFacts) -> None:
        self.book.observe(facts)
        self.guard.observe(facts)

    def close(self) -> None:
        pass

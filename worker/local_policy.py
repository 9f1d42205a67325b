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
from smartspec.core.policies import registry
from smartspec.core.policies.base import ParameterType, Policy, PolicyError

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
        return self.book.plan(self.choice.policy, self.choice.params, self.cost, queries, max_k=max_k,
                              queued_requests=queued_requests, step_index=step_index)

    def observe(self, facts: StepFacts) -> None:
        self.book.observe(facts)
        self.guard.observe(facts)

    def close(self) -> None:
        pass

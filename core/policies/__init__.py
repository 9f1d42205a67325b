"""Speculation policies: pure functions (batch facts, estimates, cost model, params) -> per-request k."""

from smartspec.core.policies.base import (
    BasePolicy,
    BatchState,
    ParameterSpec,
    ParameterType,
    Policy,
    PolicyError,
    RequestState,
    UnknownPolicyError,
    validate_parameters,
)
from smartspec.core.policies.guard import guarded_decide, sanitize_batch
from smartspec.core.policies.optimizer import GoodputSolution, expected_tokens, optimize_goodput, predict_step
from smartspec.core.policies.registry import (
    DEFAULT_POLICY,
    ENTRY_POINT_GROUP,
    Registry,
    default_registry,
    get,
    list_policies,
    names,
    register,
)

__all__ = [
    "BasePolicy",
    "BatchState",
    "DEFAULT_POLICY",
    "ENTRY_POINT_GROUP",
    "GoodputSolution",
    "ParameterSpec",
    "ParameterType",
    "Policy",
    "PolicyError",
    "Registry",
    "RequestState",
    "UnknownPolicyError",
    "default_registry",
    "expected_tokens",
    "get",
    "guarded_decide",
    "list_policies",
    "names",
    "optimize_goodput",
    "predict_step",
    "register",
    "sanitize_batch",
    "validate_parameters",
]

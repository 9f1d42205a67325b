"""Proto <-> domain conversions for the admin API: typed parameter values and policy schemas."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from smartspec.core.codec import policy_spec_proto, value_to_proto
from smartspec.core.policies.base import ParameterSpec, ParameterType, Policy
from smartspec.controller.store_policy import PolicyRecord
from smartspec.v1 import admin_pb2, common_pb2, controller_pb2

if TYPE_CHECKING:  # annotations only: the planner imports nothing from here
    from smartspec.core.acceptance import PooledPrior
    from smartspec.core.cost_model import CostModel
    from smartspec.controller.planner import PlannerSettings


def active_policy_proto(record: PolicyRecord, policy: Policy | None = None) -> admin_pb2.ActivePolicy:
    return admin_pb2.ActivePolicy(
        policy=policy_spec_proto(record.name, record.parameters, policy),
        version=record.version,
        updated_unix_ms=record.updated_unix_ms,
    )


def parameter_schema(spec: ParameterSpec) -> admin_pb2.ParameterSchema:
    schema = admin_pb2.ParameterSchema(
        name=spec.name,
        type=ParameterType(spec.type).value,
        description=spec.description,
        default_value=value_to_proto(spec.default, spec.type),
    )
    if spec.minimum is not None:
        schema.minimum = float(spec.minimum)
    if spec.maximum is not None:
        schema.maximum = float(spec.maximum)
    return schema


def policy_info(policy: Policy) -> admin_pb2.PolicyInfo:
    return admin_pb2.PolicyInfo(
        name=policy.name,
        description=policy.description,
        parameters=[parameter_schema(spec) for spec in policy.parameters],
    )


def plan_basis_proto(policy_spec: common_pb2.PolicySpec, policy_version: int, cost: "CostModel",
                     prior: "PooledPrior", settings: "PlannerSettings", *, max_k: int,
                     goodput_per_ms: float,
                     member_priors: "Mapping[int, PooledPrior] | None" = None) -> "controller_pb2.PlanBasis":
    """The shared state behind a plan, for the worker to re-solve it on its fresh batch."""
    return controller_pb2.PlanBasis(
        member_priors=[controller_pb2.MemberPrior(kind=kind, accepted=p.accepted, tested=p.tested,
                                                  proposed=p.proposed, requested=p.requested)
                       for kind, p in (member_priors or {}).items()],
        policy=policy_spec,
        policy_version=policy_version,
        cost_model=cost.to_proto(),
        prior_accepted=prior.accepted,
        prior_tested=prior.tested,
        prior_proposed=prior.proposed,
        prior_requested=prior.requested,
        prior_strength=settings.prior_strength,
        cold_acceptance=settings.cold_rate,
        cold_fill=settings.cold_fill,
        max_speculation_length=max_k,
        goodput_per_ms=goodput_per_ms,
    )

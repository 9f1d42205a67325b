"""Proto <-> domain conversions for the admin API: typed parameter values and policy schemas."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from smartspec.controller.policies.base import ParameterSpec, ParameterType, Policy
from smartspec.controller.store import PolicyRecord
from smartspec.controller.validation import InvalidInput
from smartspec.v1 import admin_pb2, common_pb2, controller_pb2

if TYPE_CHECKING:  # annotations only: the planner imports nothing from here
    from smartspec.controller.acceptance import PooledPrior
    from smartspec.controller.cost_model import CostModel
    from smartspec.controller.planner import PlannerSettings


def value_from_proto(value: common_pb2.ParameterValue, field: str) -> Any:
    """The Python value of a ParameterValue (int, float, bool, str or list of ints)."""
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidInput(field, "has no value (set one of int_value, float_value, bool_value, "
                                  "string_value, int_list_value)")
    if kind == "int_list_value":
        return list(value.int_list_value.values)
    return getattr(value, kind)


_FIELD_BY_TYPE = {
    ParameterType.INT: "int_value",
    ParameterType.FLOAT: "float_value",
    ParameterType.BOOL: "bool_value",
    ParameterType.STRING: "string_value",
}


def value_to_proto(value: Any, type_: ParameterType | None = None) -> common_pb2.ParameterValue:
    """Inverse of value_from_proto: by the declared type when known (a FLOAT default written as
    `0` stays a float), else by Python type (bool first: a bool is also an int)."""
    if type_ is ParameterType.INT_LIST:
        return common_pb2.ParameterValue(int_list_value=common_pb2.IntList(values=[int(v) for v in value]))
    if type_ is not None:
        cast = {"int_value": int, "float_value": float, "bool_value": bool, "string_value": str}
        field = _FIELD_BY_TYPE[type_]
        return common_pb2.ParameterValue(**{field: cast[field](value)})
    if isinstance(value, bool):
        return common_pb2.ParameterValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.ParameterValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.ParameterValue(float_value=value)
    if isinstance(value, str):
        return common_pb2.ParameterValue(string_value=value)
    if isinstance(value, (list, tuple)):
        return common_pb2.ParameterValue(int_list_value=common_pb2.IntList(values=[int(v) for v in value]))
    raise TypeError(f"no ParameterValue for {type(value).__name__}")


def parameters_from_proto(parameters: Mapping[str, common_pb2.ParameterValue],
                          field: str = "policy.parameters") -> dict[str, Any]:
    return {name: value_from_proto(value, f'{field}["{name}"]') for name, value in parameters.items()}


def policy_spec_proto(name: str, parameters: Mapping[str, Any],
                      policy: Policy | None = None) -> common_pb2.PolicySpec:
    types = {spec.name: spec.type for spec in policy.parameters} if policy is not None else {}
    return common_pb2.PolicySpec(
        name=name,
        parameters={key: value_to_proto(value, types.get(key)) for key, value in parameters.items()},
    )


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
                     goodput_per_ms: float) -> "controller_pb2.PlanBasis":
    """The shared state behind a plan, for the worker to re-solve it on its fresh batch."""
    return controller_pb2.PlanBasis(
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

"""Policy parameters on the wire: typed `ParameterValue`s <-> Python values, and `PolicySpec`.

The one codec for policy parameters: the controller's admin API, the plan basis the worker
re-solves, the worker's WorkerInfo and the SDK all convert through here.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Mapping

from smartspec.core.errors import FieldError
from smartspec.core.policies.base import ParameterType, Policy
from smartspec.v1 import common_pb2


def value_from_proto(value: common_pb2.ParameterValue, field: str = "value", *, required: bool = True) -> Any:
    """The Python value of a ParameterValue (int, float, bool, str or list of ints). One with no
    kind set is a FieldError naming `field`, or None when not `required` (an SDK reading a schema)."""
    kind = value.WhichOneof("kind")
    if kind is None:
        if not required:
            return None
        raise FieldError(field, "has no value (set one of int_value, float_value, bool_value, "
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


def value_to_proto(value: Any, type_: ParameterType | None = None, field: str = "value") -> common_pb2.ParameterValue:
    """Inverse of value_from_proto: by the declared type when known (a FLOAT default written as
    `0` stays a float), else by Python type (bool first: a bool is also an int). A value of no
    wire type (a dict, a list holding a bool) is a FieldError naming `field`."""
    if type_ is ParameterType.INT_LIST:
        return common_pb2.ParameterValue(int_list_value=common_pb2.IntList(values=[int(v) for v in value]))
    if type_ is not None:
        cast = {"int_value": int, "float_value": float, "bool_value": bool, "string_value": str}
        kind = _FIELD_BY_TYPE[type_]
        return common_pb2.ParameterValue(**{kind: cast[kind](value)})
    if isinstance(value, bool):
        return common_pb2.ParameterValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.ParameterValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.ParameterValue(float_value=value)
    if isinstance(value, str):
        return common_pb2.ParameterValue(string_value=value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, Integral) and not isinstance(v, bool) for v in value):
        return common_pb2.ParameterValue(int_list_value=common_pb2.IntList(values=[int(v) for v in value]))
    raise FieldError(field, f"unsupported value {value!r} (use int, float, bool, str or a list of ints)")


def parameters_from_proto(parameters: Mapping[str, common_pb2.ParameterValue],
                          field: str = "policy.parameters", *, required: bool = True) -> dict[str, Any]:
    return {name: value_from_proto(value, f'{field}["{name}"]', required=required)
            for name, value in parameters.items()}


def policy_spec_proto(name: str, parameters: Mapping[str, Any], policy: Policy | None = None,
                      field: str = "policy.parameters") -> common_pb2.PolicySpec:
    """A PolicySpec; values typed by `policy`'s schema when given, else by their Python type."""
    types = {spec.name: spec.type for spec in policy.parameters} if policy is not None else {}
    return common_pb2.PolicySpec(
        name=name,
        parameters={key: value_to_proto(value, types.get(key), f"{field}.{key}")
                    for key, value in parameters.items()},
    )

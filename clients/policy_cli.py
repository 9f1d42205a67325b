"""`smartspec policy list|get|set`: inspect and swap the controllers' speculation policy.

    smartspec policy list --controller 127.0.0.1:50051
    smartspec policy get
    smartspec policy set fixed --param k=3
    smartspec policy set table --param ks=4,4,2,1,0 --expected-version 7

`set` reads the policy's parameter schema first (ListPolicies) and parses each `--param key=value`
by its declared type: ints, floats, bools (true/false/1/0/yes/no/on/off), strings and comma lists of
ints. The controller validates bounds and answers INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from typing import Any, Callable

from smartspec.clients.client_options import add_connection_options, client_from_args, reports_errors
from smartspec.core.config import add_flag, add_option
from smartspec.clients.errors import InvalidArgumentError
from smartspec.clients.table import format_table
from smartspec.clients.types import ActivePolicy, ParameterPy, ParameterSchema, PolicyInfo

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE | _FALSE:
        return word in _TRUE
    raise ValueError(f"not a bool: {raw!r}")


def _parse_int_list(raw: str) -> list[int]:
    return [int(part) for part in raw.split(",") if part.strip()]


# schema type -> parser of the command-line text
VALUE_PARSERS: dict[str, Callable[[str], ParameterPy]] = {
    "int": int,
    "float": float,
    "bool": _parse_bool,
    "string": str,
    "int_list": _parse_int_list,
}


def parse_parameter(schema: ParameterSchema, raw: str) -> ParameterPy:
    """Command-line text -> the Python value of the parameter's declared type."""
    parser = VALUE_PARSERS.get(schema.type)
    if parser is None:
        raise InvalidArgumentError(f"--param {schema.name}: the controller declared an unknown type {schema.type!r}")
    try:
        return parser(raw)
    except ValueError:
        raise InvalidArgumentError(f"--param {schema.name}: expected {schema.type}, got {raw!r}") from None


def parse_parameters(policy: PolicyInfo, assignments: list[str]) -> dict[str, ParameterPy]:
    """["k=3", "ks=4,2"] -> {"k": 3, "ks": [4, 2]} by the policy's schema."""
    values: dict[str, ParameterPy] = {}
    for assignment in assignments:
        name, sep, raw = assignment.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InvalidArgumentError(f"--param: expected KEY=VALUE, got {assignment!r}")
        schema = policy.parameter(name)
        if schema is None:
            known = ", ".join(p.name for p in policy.parameters) or "none"
            raise InvalidArgumentError(f"--param {name}: policy {policy.name!r} has no such parameter (known: {known})")
        values[name] = parse_parameter(schema, raw)
    return values


def find_policy(policies: list[PolicyInfo], name: str) -> PolicyInfo:
    for policy in policies:
        if policy.name == name:
            return policy
    known = ", ".join(p.name for p in policies)
    raise InvalidArgumentError(f"policy: unknown policy {name!r} (registered: {known})")


def _format_value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def format_policies(policies: list[PolicyInfo]) -> str:
    blocks = []
    for policy in policies:
        rows = [
            (p.name, p.type, _format_value(p.default),
             f"[{'' if p.minimum is None else f'{p.minimum:g}'}, {'' if p.maximum is None else f'{p.maximum:g}'}]",
             p.description)
            for p in policy.parameters
        ]
        block = f"{policy.name}: {policy.description}"
        if rows:
            block += "\n" + format_table(("parameter", "type", "default", "bounds", "description"), rows)
        blocks.append(block)
    return "\n\n".join(blocks)


def format_active(active: ActivePolicy) -> str:
    if active.updated_unix_ms:
        when = datetime.fromtimestamp(active.updated_unix_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        origin = f"version {active.version}, updated {when}"
    else:
        origin = f"version {active.version}, the built-in default: never set"
    params = " ".join(f"{k}={_format_value(v)}" for k, v in active.parameters.items())
    return f"{active.name} ({origin})" + (f"\n  {params}" if params else "")


def _print(args, value: Any, text: str) -> None:
    if args.json:
        print(json.dumps([dataclasses.asdict(v) for v in value] if isinstance(value, list) else dataclasses.asdict(value),
                         indent=2))
    else:
        print(text)


def _list(args, client) -> int:
    policies = client.list_policies()
    _print(args, policies, format_policies(policies))
    return 0


def _get(args, client) -> int:
    active = client.get_policy()
    _print(args, active, format_active(active))
    return 0


def _set(args, client) -> int:
    policy = find_policy(client.list_policies(), args.name)
    parameters = parse_parameters(policy, args.param or [])
    active = client.set_policy(policy.name, expected_version=args.expected_version, **parameters)
    _print(args, active, format_active(active))
    return 0


def configure(parser) -> None:
    actions = parser.add_subparsers(dest="policy_action", metavar="ACTION", required=True)
    for name, action, help_text in (
        ("list", _list, "every registered policy with its parameter schema"),
        ("get", _get, "the active policy and its version"),
        ("set", _set, "activate a policy by name with parameters"),
    ):
        sub = actions.add_parser(name, help=help_text, description=help_text)
        if name == "set":
            sub.add_argument("name", help="registered policy name (see `smartspec policy list`)")
            sub.add_argument("--param", action="append", metavar="KEY=VALUE",
                             help="a parameter, parsed by the policy's schema (repeatable)")
            add_option(sub, "--expected-version", default=0, type=int,
                       help="apply only if the active version still equals this (0 = always)")
        add_connection_options(sub, controller=True)
        add_flag(sub, "--json", help="print JSON instead of text")
        sub.set_defaults(_policy_action=action)


@reports_errors
def run(args) -> int:
    with client_from_args(args) as client:
        return args._policy_action(args, client)

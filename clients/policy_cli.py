"""`smartspec policy list|get|set`: inspect and swap the controllers' speculation policy.

    smartspec policy list --controller 127.0.0.1:50051
    smartspec policy get
    smartspec policy set fixed --param k=3
    smartspec policy set fixed:3
    smartspec policy set table --param ks=4,4,2,1,0 --expected-version 7

`set` takes a policy spec (smartspec.core.policy_spec, the grammar `--local-policy` and
`--policies` use too) plus `--param key=value` words, and types every value by the schema the
controller declares (ListPolicies): ints, floats, bools (true/false/1/0/yes/no/on/off), strings and
lists of ints. The controller validates bounds and answers INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from typing import Any, Sequence

from smartspec.clients.client_options import add_connection_options, client_from_args, reports_errors
from smartspec.clients.errors import InvalidArgumentError
from smartspec.clients.table import format_table
from smartspec.clients.types import ActivePolicy, ParameterPy, PolicyInfo
from smartspec.core.config import add_flag, add_option
from smartspec.core.errors import FieldError
from smartspec.core.policies.base import ParameterType
from smartspec.core.policy_spec import ParsedPolicy, read_policy_spec, spec_name


def policy_schema(policy: PolicyInfo) -> list[tuple[str, ParameterType | None]]:
    """The controller's schema of `policy` as the spec parser takes it; a type this client does
    not know (a newer controller's) is None: such a value is typed by its look."""
    return [(p.name, ParameterType.__members__.get(p.type.upper())) for p in policy.parameters]


def parse_parameters(policy: PolicyInfo, assignments: Sequence[str], spec: str = "") -> dict[str, ParameterPy]:
    """["k=3", "ks=4,2"] (and the ARGS of a spec like "fixed:3") -> {"k": 3, "ks": [4, 2]}, typed
    by the controller's schema of `policy` (smartspec.core.policy_spec: the one grammar)."""
    try:
        return read_policy_spec(spec or policy.name, assignments, schema=policy_schema(policy)).params
    except FieldError as exc:
        raise InvalidArgumentError(str(exc)) from None


def parse_policy_set(policies: list[PolicyInfo], spec: str, assignments: Sequence[str] = ()) -> ParsedPolicy:
    """What `policy set SPEC --param KEY=VALUE...` asks the controller for: the policy's name and
    its parameters typed by the controller's schema (the controller checks bounds and fills defaults)."""
    try:
        name = spec_name(spec)
    except FieldError as exc:
        raise InvalidArgumentError(str(exc)) from None
    policy = find_policy(policies, name)
    return ParsedPolicy(policy.name, parse_parameters(policy, assignments, spec))


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
    name, parameters = parse_policy_set(client.list_policies(), args.name, args.param or ())
    active = client.set_policy(name, expected_version=args.expected_version, **parameters)
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
            sub.add_argument("name", metavar="SPEC",
                             help="registered policy name (see `smartspec policy list`), optionally with "
                                  "parameters: fixed, fixed:3, goodput:max_k=6,min_gain=0.05")
            sub.add_argument("--param", action="append", metavar="KEY=VALUE",
                             help="a parameter, parsed by the policy's schema (repeatable; a list as 4,2,1)")
            add_option(sub, "--expected-version", default=0, type=int,
                       help="apply only if the active version still equals this (0 = always)")
        add_connection_options(sub, controller=True)
        add_flag(sub, "--json", help="print JSON instead of text")
        sub.set_defaults(_policy_action=action)


@reports_errors
def run(args) -> int:
    with client_from_args(args) as client:
        return args._policy_action(args, client)

"""Policy specs: one grammar for naming a policy and its parameters on every command line.

`smartspec policy set`, `smartspec worker --local-policy`, `smartspec bench --policies`,
`smartspec simulate --policies` and the scripts all read a policy through this module.

    SPEC  := NAME [":" ARG {SEP ARG}]          SEP is "," or ":"
    ARG   := KEY "=" VALUE                     a named parameter
           | VALUE                             positional: the policy's parameters in schema order,
                                               only before any named one (`fixed:3` is k=3)
    WORD  := KEY "=" VALUE                     a repeatable flag's value (`policy set --param`,
                                               `worker --local-policy-param`): one word is one
                                               parameter, so its VALUE may hold "," and ":"
    LIST  := SPEC {"," SPEC}                   `--policies`: a ","-piece of the form KEY=VALUE
                                               continues the spec before it, any other piece
                                               starts the next spec

    fixed                           {}                  (validated: the defaults, {"k": 4})
    fixed:3                         {"k": 3}
    fixed:k=3                       {"k": 3}
    goodput:max_k=6,min_gain=0.05   {"max_k": 6, "min_gain": 0.05}
    batch-threshold:2:16            {"k": 2, "batch_size": 16}
    table:batch_sizes=1/8,ks=5/0    {"batch_sizes": [1, 8], "ks": [5, 0]}
    off,fixed:k=3,goodput:max_k=6,min_gain=0.05      a LIST of three specs

VALUE is typed by the policy's parameter schema (`ParameterSpec.type`): the schema a caller passes
(`policy set` passes the controller's), else the registered policy's, else, for a policy this
process does not know, by its look:

    int       4
    float     0.5
    bool      true/false, yes/no, on/off, 1/0 (any case)
    string    the text
    int list  4/2/1 (in a SPEC, where "," separates parameters) or 4,2,1 (in a WORD)
    no schema true/false -> bool, then int, float, a "/"- or ","-separated int list, else the text

Keys given twice: the later wins (WORDs come after the spec's ARGs). Every error is a
`PolicyError` (a `FieldError`) whose field names the culprit: `policy` for the name or grammar,
`policy.k` for a parameter (`local_policy.k`, `policies[1].k` where the caller says so).

`read_policy_spec` only reads and types; `parse_policy_spec` also validates with the registered
policy (bounds, cross-field checks) and fills its defaults, which is what runs a policy in-process.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Sequence

from smartspec.core.policies import registry
from smartspec.core.policies.base import ParameterType, Policy, PolicyError

# a policy's parameters in schema (positional) order: (name, type); type None: typed by its look
Schema = Sequence[tuple[str, "ParameterType | None"]]

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class ParsedPolicy(NamedTuple):
    """A policy name and its typed parameters; unpacks as `name, params = ...`."""

    name: str
    params: dict[str, Any]

    @property
    def policy(self) -> Policy:
        """The registered policy of that name (UnknownPolicyError if none)."""
        return registry.get(self.name)


def _bool(text: str) -> bool:
    word = text.strip().lower()
    if word not in _TRUE | _FALSE:
        raise ValueError(text)
    return word in _TRUE


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.replace("/", ",").split(",") if part.strip()]


_PARSERS: dict[ParameterType, Callable[[str], Any]] = {
    ParameterType.INT: int,
    ParameterType.FLOAT: float,
    ParameterType.BOOL: _bool,
    ParameterType.STRING: str,
    ParameterType.INT_LIST: _int_list,
}


def parse_value(text: str, kind: ParameterType | None, field: str = "value") -> Any:
    """One VALUE as the Python value of `kind` (None: by its look); PolicyError naming `field`."""
    text = text.strip()
    if kind is None:
        return _literal(text)
    try:
        return _PARSERS[kind](text)
    except ValueError:
        raise PolicyError(field, f"expected {kind.name.lower()}, got {text!r}") from None


def _literal(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "/" in text or "," in text:
        try:
            return _int_list(text)
        except ValueError:
            pass
    return text


def schema_of(policy: Policy) -> Schema:
    return [(spec.name, spec.type) for spec in policy.parameters]


def spec_name(text: str, field: str = "policy") -> str:
    """The NAME of a SPEC (the part before the first ":")."""
    name = text.partition(":")[0].strip()
    if not name:
        raise PolicyError(field, f"no policy name in {text!r} (expected NAME[:ARGS])")
    if "=" in name or "," in name:
        raise PolicyError(field, f"{text!r} is not NAME[:ARGS] (a policy name has no '=' or ',')")
    return name


def _registered_schema(name: str) -> Schema | None:
    try:
        return schema_of(registry.get(name))
    except KeyError:   # UnknownPolicyError: type values by their look
        return None


def _assignments(text: str, extra: Iterable[str], field: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The spec's positional values and every KEY=VALUE pair (spec's first, then `extra`'s)."""
    args = text.partition(":")[2]
    positional: list[str] = []
    named: list[tuple[str, str]] = []
    for arg in (part.strip() for part in args.replace(":", ",").split(",")):
        if not arg:
            continue
        key, sep, value = arg.partition("=")
        if sep:
            named.append((key.strip(), value))
        elif named:
            raise PolicyError(field, f"{text!r}: positional value {arg!r} after a named one "
                                     "(name it, or write an int list with '/': ks=4/2)")
        else:
            positional.append(arg)
    for word in extra:
        key, sep, value = word.partition("=")
        if not sep or not key.strip():
            raise PolicyError(field, f"expected KEY=VALUE, got {word!r}")
        named.append((key.strip(), value))
    return positional, named


def read_policy_spec(text: str, extra: Iterable[str] = (), *, schema: Schema | None = None,
                     field: str = "policy") -> ParsedPolicy:
    """A SPEC (plus KEY=VALUE `extra` words) as (name, typed parameters), nothing validated
    beyond the types and names; `schema` defaults to the registered policy's, if any."""
    name = spec_name(text, field)
    schema = _registered_schema(name) if schema is None else schema
    positional, named = _assignments(text, extra, field)
    types = dict(schema) if schema is not None else None
    if positional and types is None:
        raise PolicyError(field, f"{text!r}: policy {name!r} is unknown here, so its parameters "
                                 "have no order: write KEY=VALUE")
    if positional and len(positional) > len(types):
        raise PolicyError(field, f"{text!r}: {name} takes at most {len(types)} positional values")
    pairs = [(key, value) for (key, _), value in zip(schema or (), positional)] + named
    params: dict[str, Any] = {}
    for key, value in pairs:
        if types is not None and key not in types:
            allowed = ", ".join(types) or "none"
            raise PolicyError(f"{field}.{key}", f"unknown parameter of {name!r} (allowed: {allowed})")
        params[key] = parse_value(value, None if types is None else types[key], f"{field}.{key}")
    return ParsedPolicy(name, params)


def parse_policy_spec(text: str, extra: Iterable[str] = (), *, field: str = "policy") -> ParsedPolicy:
    """A SPEC of a registered policy, typed and validated by it, defaults filled in."""
    name = spec_name(text, field)
    try:
        policy = registry.get(name)
    except KeyError as exc:   # UnknownPolicyError, renamed to the caller's field
        raise PolicyError(field, exc.message) from None
    raw = read_policy_spec(text, extra, schema=schema_of(policy), field=field)
    try:
        return ParsedPolicy(name, policy.validate(raw.params))
    except PolicyError as exc:
        raise PolicyError(f"{field}.{exc.field}", exc.message) from None


def split_policy_list(text: str) -> list[str]:
    """'off,fixed:k=3,min=1,goodput' -> ['off', 'fixed:k=3,min=1', 'goodput'] (see LIST)."""
    specs: list[str] = []
    for piece in (part.strip() for part in text.split(",")):
        key, sep, _ = piece.partition("=")
        if specs and sep and ":" not in key:
            specs[-1] += "," + piece
        elif piece:
            specs.append(piece)
    return specs


def parse_policy_list(text: str, field: str = "policies") -> list[tuple[str, str, dict[str, Any]]]:
    """A LIST as [(label, name, validated params), ...] in the order given; the label is the
    spec as written (bench and simulate records name their policy by it)."""
    out = []
    for index, spec in enumerate(split_policy_list(text)):
        name, params = parse_policy_spec(spec, field=f"{field}[{index}]")
        out.append((spec, name, params))
    if not out:
        raise PolicyError(field, "no policy given")
    return out

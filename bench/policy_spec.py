"""`fixed:3` -> ("fixed", {"k": 3}): one parser for policy names on the bench and simulate CLIs.

Grammar: `NAME[:ARG[:ARG...]]` where each ARG is `value` (positional: the policy's parameters in
schema order) or `key=value`. Values: ints, floats, true/false, or int lists written `4/3/2`.
The registered policy's own `validate` then checks names, types and bounds.
"""

from __future__ import annotations

from typing import Any

from smartspec.core.policies import PolicyError, get


def _value(text: str) -> Any:
    text = text.strip()
    if "/" in text:
        return [int(part) for part in text.split("/") if part]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Name and validated parameters (defaults filled in); PolicyError names what is wrong."""
    name, *args = [part.strip() for part in spec.strip().split(":")]
    if not name:
        raise PolicyError("policy", f"empty policy name in {spec!r}")
    policy = get(name)
    raw: dict[str, Any] = {}
    order = [p.name for p in policy.parameters]
    for position, arg in enumerate(args):
        if "=" in arg:
            key, text = arg.split("=", 1)
            raw[key.strip()] = _value(text)
        elif position < len(order):
            raw[order[position]] = _value(arg)
        else:
            raise PolicyError("policy", f"{spec!r}: {name} takes at most {len(order)} positional values")
    return name, policy.validate(raw)


def parse_policy_list(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """'off,fixed:3,goodput' -> [(label, name, params), ...] in the order given."""
    out = []
    for spec in text.split(","):
        if spec.strip():
            name, params = parse_policy_spec(spec)
            out.append((spec.strip(), name, params))
    if not out:
        raise PolicyError("policies", "no policy given")
    return out

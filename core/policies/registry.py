"""Policies by registered name: the built-ins plus third-party ones from the entry-point group
`smartspec.policies`. Swapping policy is swapping a name and parameters, never pickled code."""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any, Callable, Iterable

from smartspec.core.policies import batch_threshold, fixed, goodput, heuristic, off, table
from smartspec.core.policies.base import Policy, UnknownPolicyError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "smartspec.policies"
DEFAULT_POLICY = "goodput"
BUILTIN_POLICIES: tuple[Policy, ...] = (
    goodput.POLICY,
    off.POLICY,
    fixed.POLICY,
    batch_threshold.POLICY,
    table.POLICY,
    heuristic.POLICY,
)


def _as_policy(obj: Any, source: str) -> Policy:
    """An entry point may name a Policy object or a zero-argument factory returning one."""
    if not isinstance(obj, Policy) and callable(obj):
        obj = obj()
    if not isinstance(obj, Policy):
        raise TypeError(f"{source} is not a policy (needs name, description, parameters, validate, decide)")
    if not isinstance(obj.name, str) or not obj.name:
        raise TypeError(f"{source} has no name")
    return obj


class Registry:
    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self._policies: dict[str, Policy] = {}
        for policy in policies:
            self.register(policy)

    def register(self, policy: Policy, *, replace: bool = False) -> Policy:
        policy = _as_policy(policy, repr(policy))
        if policy.name in self._policies and not replace:
            raise ValueError(f"policy {policy.name!r} is already registered")
        self._policies[policy.name] = policy
        return policy

    def get(self, name: str) -> Policy:
        try:
            return self._policies[name]
        except KeyError:
            known = ", ".join(self.names())
            raise UnknownPolicyError("name", f"unknown policy {name!r} (registered: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._policies)

    def list(self) -> list[Policy]:
        return [self._policies[name] for name in self.names()]

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Register every policy advertised in `group`; a broken plugin is logged and skipped,
        a plugin may not shadow a policy already registered. Returns the names added."""
        added = []
        for entry in metadata.entry_points(group=group):
            source = f"entry point {entry.name!r} ({entry.value})"
            try:
                policy = _as_policy(entry.load(), source)
                self.register(policy)
            except Exception:  # noqa: BLE001 - a bad plugin must not take the controller down
                log.exception("skipping policy from %s", source)
                continue
            added.append(policy.name)
        return added


def _default_registry() -> Registry:
    registry = Registry(BUILTIN_POLICIES)
    registry.load_entry_points()
    return registry


_DEFAULT: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry: built-ins, then installed plugins (loaded once, on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = _default_registry()
    return _DEFAULT


def register(policy: Policy | Callable[[], Policy], *, replace: bool = False) -> Policy:
    return default_registry().register(policy, replace=replace)


def get(name: str) -> Policy:
    return default_registry().get(name)


def names() -> list[str]:
    return default_registry().names()


def list_policies() -> list[Policy]:
    return default_registry().list()

"""The active policy's record and its restore after Redis loses it (`PolicyMemory`, mixed into
`ControllerStore`).

The active policy is an operator's choice, not something the next steps can rebuild: each store
keeps the newest policy record it has read or written (`kept_policy`), and when a read finds the key
gone (a Redis restarted without persistence, a flush, an eviction) or holding an older record (an
old snapshot restored), it writes the kept record back (`RESTORE_POLICY`, atomic, a no-op when the
stored record is current), version and all. A choice made after the loss on a replica that kept
nothing (numbered from 1 again) stays, renumbered above the kept version: a version never goes
backwards while one replica that saw it runs. This costs nothing per step: the step's read script
sends the policy only when its stamp changed, and only then is it compared with the kept record.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class VersionMismatch(Exception):
    """SetPolicy's expected_version no longer matches the active version."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"expected policy version {expected}, active version is {actual}")
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class PolicyRecord:
    """The active policy as stored: parameters already validated, version 0 = never set."""

    name: str
    parameters: dict[str, Any]
    version: int = 0
    updated_unix_ms: int = 0


def policy_stamp(record: PolicyRecord | None) -> str:
    """What the read script compares to tell whether the stored policy changed ("" = never read)."""
    return ":" if record is None else f"{record.version}:{record.updated_unix_ms}"


# KEYS: policy; ARGV: name, parameters JSON, version, updated_unix_ms of the record a replica keeps.
# Gone (or older and set earlier): write the kept record back. Older but set later (a choice made
# after a loss, by a replica that kept nothing, numbered from 1 again): keep it, renumbered above.
# Returns {0 nothing done | 1 restored | 2 renumbered, the policy hash as a flat list}.
# (Here rather than in store_scripts.py: it runs only when a read found the policy missing or older;
# `ControllerStore` registers it on its connection as `restore_policy`.)
RESTORE_POLICY = """
local stored = redis.call('HMGET', KEYS[1], 'version', 'updated_unix_ms')
local kept_version, kept_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local action = 0
local version = tonumber(stored[1] or '')
if version == nil or (version < kept_version and tonumber(stored[2] or '0') <= kept_ms) then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'name', ARGV[1], 'parameters', ARGV[2], 'version', ARGV[3], 'updated_unix_ms', ARGV[4])
  action = 1
elseif version < kept_version then
  redis.call('HSET', KEYS[1], 'version', kept_version + 1)
  action = 2
end
return {action, redis.call('HGETALL', KEYS[1])}
"""


class PolicyMemory:
    """`ControllerStore`'s policy methods: reads and writes of the policy key, and the kept record
    written back when Redis lost it. The store provides `_call`, `_conn`, `_redis`, `policy_key`,
    `_lock` and `_kept_policy`."""

    _call: Callable[[Callable[[], Any]], Any]
    _lock: threading.Lock
    _kept_policy: PolicyRecord | None

    def get_policy(self) -> PolicyRecord | None:
        """The active policy (None: never set); a kept record the key lost is written back first."""
        return self._checked_policy(_policy_from_hash(self._call(lambda: self._redis.hgetall(self.policy_key()))))

    def set_policy(self, name: str, parameters: Mapping[str, Any], expected_version: int = 0) -> PolicyRecord:
        """Activate a (validated) policy; version + 1 atomically. Raises VersionMismatch when
        `expected_version` is non-zero and no longer current. A kept record the key lost is
        written back first, so the new version follows it (and `expected_version` is checked
        against it) rather than starting again from 1."""
        kept = self.kept_policy
        if kept is not None:
            self._restore(kept)
        now = _now_ms()
        encoded = json.dumps(dict(parameters), sort_keys=True)
        applied, version = self._call(
            lambda: self._conn().set_policy(keys=[self.policy_key()], args=[name, encoded, int(expected_version), now])
        )
        if not applied:
            raise VersionMismatch(int(expected_version), int(version))
        record = PolicyRecord(name=name, parameters=dict(parameters), version=int(version), updated_unix_ms=now)
        self._keep(record)
        return record

    @property
    def kept_policy(self) -> PolicyRecord | None:
        """The newest policy record this store has read or written (None: none yet)."""
        return self._kept_policy

    def _keep(self, record: PolicyRecord | None) -> None:
        if record is None or record.version <= 0:
            return
        with self._lock:
            kept = self._kept_policy
            if kept is None or (record.version, record.updated_unix_ms) > (kept.version, kept.updated_unix_ms):
                self._kept_policy = record

    def _checked_policy(self, stored: PolicyRecord | None) -> PolicyRecord | None:
        """The policy Redis just gave, or the kept record written back when Redis lost it (or gave an
        older one); the newer of the two is kept."""
        kept = self.kept_policy
        if kept is not None and (stored is None or stored.version < kept.version):
            stored = self._restore(kept)
        self._keep(stored)
        return stored

    def _restore(self, kept: PolicyRecord) -> PolicyRecord | None:
        """RESTORE_POLICY with `kept`; the policy stored afterwards (logged when anything changed)."""
        args = [kept.name, json.dumps(dict(kept.parameters), sort_keys=True), kept.version, kept.updated_unix_ms]
        action, raw = self._call(lambda: self._conn().restore_policy(keys=[self.policy_key()], args=args))
        record = policy_from_pairs(raw)
        if action == 1:
            log.warning("active policy %r v%d was missing from Redis (%s): restored it from this replica's memory",
                        kept.name, kept.version, self.policy_key())
        elif action == 2 and record is not None:
            log.warning("active policy %r was set again after Redis lost policy v%d: renumbered it v%d so that "
                        "versions never go backwards", record.name, kept.version, record.version)
        return record


def _policy_from_hash(raw: Mapping[bytes, bytes]) -> PolicyRecord | None:
    if not raw:
        return None
    data = {_text(k): _text(v) for k, v in raw.items()}
    return PolicyRecord(
        name=data["name"],
        parameters=json.loads(data.get("parameters") or "{}"),
        version=int(data.get("version", 0)),
        updated_unix_ms=int(data.get("updated_unix_ms", 0)),
    )


def policy_from_pairs(raw: list) -> PolicyRecord | None:
    """The policy from HGETALL's flat [field, value, ...] reply (as a script returns it)."""
    return _policy_from_hash(dict(zip(raw[::2], raw[1::2])))

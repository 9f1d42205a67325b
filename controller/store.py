"""Everything the controller must remember, kept in Redis so that replicas stay stateless.

Keys (all under a configurable prefix, default ``smartspec:``):

    {p}req:{worker_id}:{request_id}   JSON AcceptanceState, TTL refreshed every step, deleted when finished
    {p}cost:{cost_profile_id}         JSON of the online cost fit, TTL refreshed on every update
    {p}prior:{proposer_kind}          hash {accepted, tested, proposed, requested}: decayed counts pooled
                                      over requests
    {p}policy                         hash {name, parameters (JSON), version, updated_unix_ms}
    {p}worker:{worker_id}             hash: hello info, running totals, last prediction (TTL'd)
    {p}workers                        sorted set worker_id -> last seen (ms), for status pages (TTL'd)

A step costs two round trips: `read_step` (one pipeline: every request's history, the cost fit, the
prior, the active policy and the worker's last prediction) and `write_step` (one pipeline). Redis
failures surface as `StoreUnavailable`; after one, the store refuses calls for `retry_after_s` so a
dead Redis costs a step one failed connect per window, not one per step.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from smartspec.controller.acceptance import AcceptanceState, PooledPrior

DEFAULT_PREFIX = "smartspec:"
REQUEST_TTL_S = 600
COST_FIT_TTL_S = 7 * 24 * 3600
PRIOR_TTL_S = 7 * 24 * 3600
WORKER_TTL_S = 3600


class StoreUnavailable(Exception):
    """Redis could not be reached (or answered with an error); callers plan from priors."""


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


@dataclass(frozen=True)
class WorkerFigures:
    """The worker's last plan prediction and recent goodput, read back on its next step."""

    predicted_step_ms: float | None = None
    predicted_tokens: float | None = None
    goodput_tok_s: float | None = None


@dataclass(frozen=True)
class StepSnapshot:
    """What one step needs from Redis, read in a single round trip."""

    histories: dict[str, AcceptanceState]          # request_id -> history (absent = new request)
    cost_fit: dict[str, Any] | None               # serialised OnlineCostFit, None = never fitted
    prior: PooledPrior | None                     # None = no pooled evidence yet
    policy: PolicyRecord | None                   # None = no policy ever set
    worker: WorkerFigures = field(default_factory=WorkerFigures)


@dataclass(frozen=True)
class StepWrites:
    """What one step stores back (one pipelined round trip, not transactional)."""

    worker_id: str
    cost_profile_id: str
    proposer_kind: str
    histories: dict[str, AcceptanceState]          # unfinished requests: stored with a fresh TTL
    finished: tuple[str, ...]                     # finished requests: deleted
    cost_fit: dict[str, Any] | None
    prior_accepted: float                         # this step's evidence, added to the decayed prior
    prior_tested: float
    prior_decay: float
    prior_proposed: float
    prior_requested: float
    totals: Mapping[str, int]                     # worker running totals to add (HINCRBY)
    figures: WorkerFigures


@dataclass(frozen=True)
class WorkerRecord:
    """A worker as shown by GetStatus."""

    worker_id: str
    info: dict[str, str]
    totals: dict[str, int]
    last_seen_unix_ms: int
    goodput_tok_s: float
    cost_profile_id: str


TOTAL_FIELDS = ("steps", "proposed", "accepted", "tested", "generated", "planned_k", "planned_requests")

# Atomic "prior = prior * decay + step evidence", so workers sharing a proposer kind never lose counts.
_PRIOR_FIELDS = ("accepted", "tested", "proposed", "requested")
_DECAY_PRIOR_LUA = """
local decay = tonumber(ARGV[1])
local names = {'accepted', 'tested', 'proposed', 'requested'}
for i, name in ipairs(names) do
  local value = tonumber(redis.call('HGET', KEYS[1], name) or '0') * decay + tonumber(ARGV[i + 1])
  redis.call('HSET', KEYS[1], name, tostring(value))
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
return 1
"""

# Atomic compare-and-set of the active policy; returns {applied (0/1), version}.
_SET_POLICY_LUA = """
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local expected = tonumber(ARGV[3])
if expected > 0 and expected ~= version then
  return {0, version}
end
version = version + 1
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'parameters', ARGV[2], 'version', version, 'updated_unix_ms', ARGV[4])
return {1, version}
"""


_HISTORY_FIELDS = tuple(f.name for f in fields(AcceptanceState))


def _history_json(history: AcceptanceState) -> str:
    """Compact JSON of a request's state (a flat dict: cheaper than dataclasses.asdict per request)."""
    return json.dumps({name: getattr(history, name) for name in _HISTORY_FIELDS}, separators=(",", ":"))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _float_or_none(value: bytes | str | None) -> float | None:
    text = _text(value)
    return None if text is None or text == "" else float(text)


class ControllerStore:
    """Typed access to the controller's Redis keys; one instance per server, thread-safe."""

    def __init__(self, redis_url: str, prefix: str = DEFAULT_PREFIX, *, timeout_s: float = 0.5,
                 retry_after_s: float = 1.0, request_ttl_s: int = REQUEST_TTL_S,
                 worker_ttl_s: int = WORKER_TTL_S) -> None:
        self.prefix = prefix
        self.request_ttl_s = request_ttl_s
        self.worker_ttl_s = worker_ttl_s
        self.retry_after_s = retry_after_s
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._set_policy = self._redis.register_script(_SET_POLICY_LUA)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._closed = False

    # -- keys ---------------------------------------------------------------------------------
    def request_key(self, worker_id: str, request_id: str) -> str:
        return f"{self.prefix}req:{worker_id}:{request_id}"

    def cost_key(self, cost_profile_id: str) -> str:
        return f"{self.prefix}cost:{cost_profile_id}"

    def prior_key(self, proposer_kind: str) -> str:
        return f"{self.prefix}prior:{proposer_kind}"

    def policy_key(self) -> str:
        return f"{self.prefix}policy"

    def worker_key(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def workers_key(self) -> str:
        return f"{self.prefix}workers"

    # -- failure handling ---------------------------------------------------------------------
    def _call(self, fn):
        """Run `fn()` against Redis, mapping every Redis failure to StoreUnavailable."""
        if self._closed:
            raise StoreUnavailable("store closed (server stopping)")
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("redis marked down after a recent failure; retrying shortly")
        try:
            return fn()
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._down_until = time.monotonic() + self.retry_after_s
            raise StoreUnavailable(f"redis: {exc}") from exc
        except Exception as exc:
            # A step still in flight while the server stops finds its socket closed under it
            # (ValueError "I/O operation on closed file"): that is an unavailable store, not a bug.
            if self._closed:
                raise StoreUnavailable("store closed (server stopping)") from exc
            raise

    def ping(self) -> bool:
        try:
            return bool(self._call(self._redis.ping))
        except StoreUnavailable:
            return False

    def close(self) -> None:
        self._closed = True
        self._redis.close()

    # -- per step -----------------------------------------------------------------------------
    def read_step(self, worker_id: str, request_ids: Sequence[str], cost_profile_id: str,
                  proposer_kind: str) -> StepSnapshot:
        """One pipelined round trip: histories, cost fit, prior, active policy, worker figures."""

        def run():
            pipe = self._redis.pipeline(transaction=False)
            if request_ids:
                pipe.mget([self.request_key(worker_id, r) for r in request_ids])
            pipe.get(self.cost_key(cost_profile_id))
            pipe.hmget(self.prior_key(proposer_kind), list(_PRIOR_FIELDS))
            pipe.hgetall(self.policy_key())
            pipe.hmget(self.worker_key(worker_id), ["pred_step_ms", "pred_tokens", "goodput_tok_s"])
            return pipe.execute()

        results = self._call(run)
        raw_histories = results.pop(0) if request_ids else []
        raw_cost, raw_prior, raw_policy, raw_worker = results
        histories = {
            rid: AcceptanceState.from_dict(json.loads(raw)) for rid, raw in zip(request_ids, raw_histories) if raw is not None
        }
        prior = None
        if raw_prior[0] is not None and raw_prior[1] is not None:
            prior = PooledPrior(*(float(v) if v is not None else 0.0 for v in raw_prior))
        return StepSnapshot(
            histories=histories,
            cost_fit=json.loads(raw_cost) if raw_cost is not None else None,
            prior=prior,
            policy=_policy_from_hash(raw_policy),
            worker=WorkerFigures(*(_float_or_none(v) for v in raw_worker)),
        )

    def write_step(self, writes: StepWrites, info: Mapping[str, str] | None = None) -> None:
        """One pipelined round trip storing a step's updates (not transactional: each key has one writer
        per step, except the pooled prior, which is updated atomically by a script). `info` (the
        hello's fields) is rewritten too, so a worker whose entry expired while idle reappears."""

        def run():
            pipe = self._redis.pipeline(transaction=False)
            for request_id, history in writes.histories.items():
                pipe.set(self.request_key(writes.worker_id, request_id), _history_json(history), ex=self.request_ttl_s)
            if writes.finished:
                pipe.delete(*(self.request_key(writes.worker_id, r) for r in writes.finished))
            if writes.cost_fit is not None:
                pipe.set(self.cost_key(writes.cost_profile_id), json.dumps(writes.cost_fit), ex=COST_FIT_TTL_S)
            if writes.prior_tested > 0 or writes.prior_requested > 0 or writes.prior_decay < 1.0:
                # Plain EVAL, not a registered Script: in a pipeline redis-py would first send
                # SCRIPT EXISTS, an extra round trip per step. Redis caches the compiled script.
                pipe.eval(_DECAY_PRIOR_LUA, 1, self.prior_key(writes.proposer_kind),
                          writes.prior_decay, writes.prior_accepted, writes.prior_tested,
                          writes.prior_proposed, writes.prior_requested, PRIOR_TTL_S)
            worker_key = self.worker_key(writes.worker_id)
            for name, amount in writes.totals.items():
                if amount:
                    pipe.hincrby(worker_key, name, int(amount))
            figures = {
                "pred_step_ms": writes.figures.predicted_step_ms,
                "pred_tokens": writes.figures.predicted_tokens,
                "goodput_tok_s": writes.figures.goodput_tok_s,
            }
            now = _now_ms()
            pipe.hset(worker_key, mapping={
                **(info or {}),
                "last_seen_unix_ms": now,
                **{k: repr(float(v)) for k, v in figures.items() if v is not None},
            })
            pipe.expire(worker_key, self.worker_ttl_s)
            pipe.zadd(self.workers_key(), {writes.worker_id: now})
            pipe.expire(self.workers_key(), self.worker_ttl_s)
            pipe.execute()

        self._call(run)

    # -- workers ------------------------------------------------------------------------------
    def register_worker(self, worker_id: str, info: Mapping[str, str], *, reset_totals: bool) -> None:
        """Record a worker's hello; a new connection (reset_totals) starts its totals from zero."""

        def run():
            key = self.worker_key(worker_id)
            pipe = self._redis.pipeline(transaction=True)
            if reset_totals:
                pipe.delete(key)
            now = _now_ms()
            pipe.hset(key, mapping={**info, "last_seen_unix_ms": now})
            pipe.expire(key, self.worker_ttl_s)
            pipe.zadd(self.workers_key(), {worker_id: now})
            pipe.expire(self.workers_key(), self.worker_ttl_s)
            pipe.execute()

        self._call(run)

    def list_workers(self, seen_within_s: float) -> list[WorkerRecord]:
        """Workers seen in the last `seen_within_s` seconds; older entries are pruned."""

        def run():
            cutoff = _now_ms() - int(seen_within_s * 1000)
            self._redis.zremrangebyscore(self.workers_key(), "-inf", f"({cutoff}")
            ids = [_text(w) for w in self._redis.zrange(self.workers_key(), 0, -1)]
            pipe = self._redis.pipeline(transaction=False)
            for worker_id in ids:
                pipe.hgetall(self.worker_key(worker_id))
            return ids, pipe.execute()

        ids, hashes = self._call(run)
        records = []
        for worker_id, raw in zip(ids, hashes):
            if not raw:
                continue
            data = {_text(k): _text(v) for k, v in raw.items()}
            totals = {name: int(data.pop(name, 0) or 0) for name in TOTAL_FIELDS}
            records.append(WorkerRecord(
                worker_id=worker_id,
                info=data,
                totals=totals,
                last_seen_unix_ms=int(data.get("last_seen_unix_ms", 0) or 0),
                goodput_tok_s=float(data.get("goodput_tok_s", 0.0) or 0.0),
                cost_profile_id=data.get("cost_profile_id", worker_id),
            ))
        return records

    def get_cost_fit(self, cost_profile_id: str) -> dict[str, Any] | None:
        raw = self._call(lambda: self._redis.get(self.cost_key(cost_profile_id)))
        return json.loads(raw) if raw is not None else None

    # -- policy -------------------------------------------------------------------------------
    def get_policy(self) -> PolicyRecord | None:
        return _policy_from_hash(self._call(lambda: self._redis.hgetall(self.policy_key())))

    def set_policy(self, name: str, parameters: Mapping[str, Any], expected_version: int = 0) -> PolicyRecord:
        """Activate a (validated) policy; version + 1 atomically. Raises VersionMismatch when
        `expected_version` is non-zero and no longer current."""
        now = _now_ms()
        encoded = json.dumps(dict(parameters), sort_keys=True)
        applied, version = self._call(
            lambda: self._set_policy(keys=[self.policy_key()], args=[name, encoded, int(expected_version), now])
        )
        if not applied:
            raise VersionMismatch(int(expected_version), int(version))
        return PolicyRecord(name=name, parameters=dict(parameters), version=int(version), updated_unix_ms=now)


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

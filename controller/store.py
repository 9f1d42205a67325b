"""Everything the controller must remember, kept in Redis so that replicas stay stateless.

Keys (all under a configurable prefix, default ``smartspec:``; against a Redis Cluster the prefix
carries a hash tag, ``{smartspec}:``, so that every key hashes to one slot: see `redis_connect`):

    {p}hist:{worker_id}               the worker's request histories, one binary table
                                      (`HistoryTable.encode`), TTL refreshed every step; rows of
                                      requests not reported for `request_ttl_s` are dropped
    {p}fit:{cost_profile_id}          hash {fit: JSON of the online cost fit, writer: token of the
                                      write}, TTL refreshed on every update
    {p}prior:{proposer_kind}          hash {accepted, tested, proposed, requested}: decayed counts pooled
                                      over requests
    {p}policy                         hash {name, parameters (JSON), version, updated_unix_ms}
    {p}worker:{worker_id}             hash: hello info, running totals, last prediction (TTL'd)
    {p}workers                        sorted set worker_id -> last seen (ms), for status pages (TTL'd)

A step costs two commands, each one Lua script (`store_scripts`): `read_step` (the history table
if asked, the cost fit unless the caller holds the stored one, the prior, the policy unless the
caller holds the stored version, the worker's last prediction if asked) and `write_step` (atomic).
Redis failures surface as `StoreUnavailable`; after one, the store refuses calls for
`retry_after_s` so a dead Redis costs a step one failed connect per window, not one per step.
The other writes (a hello, a fit stored alone, a policy) are one script each too; `list_workers`
reads the hashes with a plain (non-transactional) pipeline. So the store runs unchanged on one
server, a Sentinel-named master, or a Redis Cluster (`redis_connect` builds the client from the URL).

The active policy is an operator's choice, not something the next steps can rebuild: each store keeps
the newest record it has read or written and writes it back when Redis lost it (`store_policy`).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import redis
from redis.commands.core import Script
from redis.exceptions import RedisClusterException

from smartspec.controller import redis_connect, store_scripts
from smartspec.controller.store_policy import (RESTORE_POLICY, PolicyMemory, PolicyRecord, _now_ms, _text,
                                               policy_from_pairs)
from smartspec.core.acceptance import AcceptanceState, PooledPrior
from smartspec.controller.history_table import HistoryError, HistoryTable

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "smartspec:"
REQUEST_TTL_S = 600
COST_FIT_TTL_S = 7 * 24 * 3600
PRIOR_TTL_S = 7 * 24 * 3600
WORKER_TTL_S = 3600


def _pooled(raw: Sequence[Any] | None) -> PooledPrior | None:
    """A prior hash's (accepted, tested, proposed, requested) as read; None where none is stored."""
    if not raw or raw[0] is None or raw[1] is None:
        return None
    return PooledPrior(*(float(v) if v is not None else 0.0 for v in raw))


class StoreUnavailable(Exception):
    """Redis could not be reached (or answered with an error); callers plan from priors."""


@dataclass(frozen=True)
class WorkerFigures:
    """The worker's last plan prediction and recent goodput, read back on its next step."""

    predicted_step_ms: float | None = None
    predicted_tokens: float | None = None
    goodput_tok_s: float | None = None


@dataclass(frozen=True)
class StepSnapshot:
    """What one step needs from Redis, read in a single round trip."""

    histories: Mapping[str, AcceptanceState] | None  # the worker's HistoryTable (None: not read)
    cost_fit: dict[str, Any] | None               # serialised OnlineCostFit, None = never fitted (or unchanged)
    prior: PooledPrior | None                     # None = no pooled evidence yet
    policy: PolicyRecord | None                   # None = no policy ever set (or unchanged)
    worker: WorkerFigures = field(default_factory=WorkerFigures)
    cost_fit_writer: str | None = None            # token of the stored fit's write (None: no fit stored)
    cost_fit_unchanged: bool = False              # the stored fit is the caller's (same writer): not sent
    policy_unchanged: bool = False                # the stored policy is the caller's (same stamp): not sent
    member_priors: Mapping[str, PooledPrior | None] = field(default_factory=dict)  # by member kind read


class SerializableFit(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StepWrites:
    """What one step stores back (one atomic script)."""

    worker_id: str
    cost_profile_id: str
    proposer_kind: str
    histories: Mapping[str, AcceptanceState]     # the worker's whole table after the step (finished removed)
    finished: tuple[str, ...]                     # requests that finished in the step (already not in it)
    # The fit's state, or the fit itself (anything with `to_dict()`): serialised only when this
    # write stores it, which a stream does at its own cadence (StreamMemory), not every step.
    cost_fit: Mapping[str, Any] | SerializableFit | None
    prior_accepted: float                         # this step's evidence, added to the decayed prior
    prior_tested: float
    prior_decay: float
    prior_proposed: float
    prior_requested: float
    totals: Mapping[str, int]                     # worker running totals to add (HINCRBY)
    figures: WorkerFigures
    # A worker choosing proposers per request: this step's (accepted, tested, proposed, requested)
    # per member kind, added to that kind's pooled prior (decayed by prior_decay first).
    member_evidence: Mapping[str, tuple[float, float, float, float]] = field(default_factory=dict)


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


@functools.lru_cache(maxsize=1024)
def _info_json(items: tuple[tuple[str, str], ...]) -> str:
    return json.dumps(dict(items))


def info_json(info: Mapping[str, str]) -> str:
    """A worker's hello fields as the JSON object the write script takes (encoded once per hello)."""
    return _info_json(tuple(info.items()))


def _float_or_none(value: bytes | str | None) -> float | None:
    text = _text(value)
    return None if text is None or text == "" else float(text)


class _Connection:
    """A redis-py client with the store's scripts registered on it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.set_policy: Script = client.register_script(store_scripts.SET_POLICY)
        self.read_step: Script = client.register_script(store_scripts.READ_STEP)
        self.record_step: Script = client.register_script(store_scripts.RECORD_STEP)
        self.restore_policy: Script = client.register_script(RESTORE_POLICY)
        self.write_cost_fit: Script = client.register_script(store_scripts.WRITE_COST_FIT)
        self.register_worker: Script = client.register_script(store_scripts.REGISTER_WORKER)


class ControllerStore(PolicyMemory):
    """Typed access to the controller's Redis keys; one instance per server, thread-safe.

    `redis_url` is any form `redis_connect` reads: one server (`redis://`), a Redis Cluster
    (`redis+cluster://`: the prefix gets a hash tag, `prefix` then reads back the tagged one) or a
    Sentinel-named master (`redis+sentinel://`). The policy methods (`get_policy`, `set_policy`,
    `kept_policy`) come from `PolicyMemory`."""

    def __init__(self, redis_url: str, prefix: str = DEFAULT_PREFIX, *, timeout_s: float = 0.5,
                 retry_after_s: float = 1.0, request_ttl_s: int = REQUEST_TTL_S,
                 worker_ttl_s: int = WORKER_TTL_S) -> None:
        self.target = redis_connect.parse_redis_url(redis_url)
        self.prefix = redis_connect.tagged_prefix(prefix) if self.target.kind == redis_connect.CLUSTER else prefix
        self.request_ttl_s = request_ttl_s
        self.worker_ttl_s = worker_ttl_s
        self.retry_after_s = retry_after_s
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._kept_policy: PolicyRecord | None = None   # newest policy record read or written here
        self._down_until = 0.0
        self._closed = False
        # A cluster client discovers the cluster when built: that waits for the first call (a
        # cluster down at start is then a degraded step, as a down server is). The others connect
        # lazily anyway, and building them now reports a malformed URL at start.
        self._connection: _Connection | None = None
        self._connect_lock = threading.Lock()
        if self.target.kind != redis_connect.CLUSTER:
            self._connection = _Connection(redis_connect.connect(self.target, timeout_s=timeout_s))

    def _conn(self) -> _Connection:
        connection = self._connection
        if connection is None:
            with self._connect_lock:
                if self._closed:
                    raise StoreUnavailable("store closed (server stopping)")
                if self._connection is None:
                    self._connection = _Connection(redis_connect.connect(self.target, timeout_s=self._timeout_s))
                connection = self._connection
        return connection

    @property
    def _redis(self) -> Any:
        return self._conn().client

    # -- keys ---------------------------------------------------------------------------------
    def history_key(self, worker_id: str) -> str:
        return f"{self.prefix}hist:{worker_id}"

    def cost_key(self, cost_profile_id: str) -> str:
        return f"{self.prefix}fit:{cost_profile_id}"

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
        except (redis.RedisError, RedisClusterException, OSError) as exc:
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
            return bool(self._call(lambda: self._redis.ping()))
        except StoreUnavailable:
            return False

    def close(self) -> None:
        with self._connect_lock:
            self._closed = True
            connection = self._connection
        if connection is not None:
            redis_connect.close(connection.client)

    # -- per step -----------------------------------------------------------------------------
    def read_step(self, worker_id: str, cost_profile_id: str, proposer_kind: str, *, histories: bool = True,
                  cost_fit_writer: str | None = None, policy_stamp: str = "",
                  worker: bool = True, member_kinds: Sequence[str] = ()) -> StepSnapshot:
        """One command: the history table (if `histories`), the cost fit (unless the caller holds
        the stored one: `cost_fit_writer` is its writer token, "" for a fit begun when none was
        stored, None for none held), the prior, the policy (unless its stamp is `policy_stamp`),
        the worker's last figures (if `worker`), the pooled prior of each of `member_kinds`."""
        keys = [self.history_key(worker_id), self.cost_key(cost_profile_id), self.prior_key(proposer_kind),
                self.policy_key(), self.worker_key(worker_id), *map(self.prior_key, member_kinds)]
        args = ["1" if histories else "0", "-" if cost_fit_writer is None else cost_fit_writer, policy_stamp,
                "1" if worker else "0"]
        raw_table, writer, raw_fit, raw_prior, raw_policy, raw_worker, raw_members = self._call(
            lambda: self._conn().read_step(keys=keys, args=args))
        prior = _pooled(raw_prior)
        writer = _text(writer)
        unchanged = cost_fit_writer is not None and (writer or "") == cost_fit_writer
        policy = self._checked_policy(policy_from_pairs(raw_policy)) if raw_policy is not None else None
        return StepSnapshot(
            histories=self._decode_table(worker_id, raw_table) if histories else None,
            cost_fit=json.loads(raw_fit) if raw_fit is not None and not unchanged else None,
            prior=prior,
            policy=policy,
            worker=WorkerFigures(*(_float_or_none(v) for v in raw_worker)) if raw_worker else WorkerFigures(),
            cost_fit_writer=writer,
            cost_fit_unchanged=unchanged,
            policy_unchanged=raw_policy is None,
            member_priors={kind: _pooled(raw) for kind, raw in zip(member_kinds, raw_members or ())},
        )

    @staticmethod
    def _decode_table(worker_id: str, raw: bytes | None) -> HistoryTable:
        if raw is None:
            return HistoryTable()
        try:
            return HistoryTable.decode(raw)
        except (HistoryError, UnicodeDecodeError) as exc:
            log.warning("stored histories of worker %s unreadable (%s); starting them afresh", worker_id, exc)
            return HistoryTable()

    def write_step(self, writes: StepWrites, info: Mapping[str, str] | None = None,
                   cost_fit_writer: str | None = None) -> str | None:
        """One atomic script storing a step's updates; returns the writer token stored with the cost
        fit (`cost_fit_writer`, or a fresh one), None when no fit was written. `info` (the hello's
        fields) is rewritten too, so a worker whose entry expired while idle reappears."""
        now = _now_ms()
        table = HistoryTable.from_states(writes.histories, seen_s=now // 1000)
        table.expire(now // 1000, self.request_ttl_s)
        writer = None
        fit = ""
        if writes.cost_fit is not None:
            writer = cost_fit_writer or uuid.uuid4().hex
            state = writes.cost_fit
            fit = json.dumps(state if isinstance(state, Mapping) else state.to_dict())
        update_prior = writes.prior_tested > 0 or writes.prior_requested > 0 or writes.prior_decay < 1.0
        figures = (writes.figures.predicted_step_ms, writes.figures.predicted_tokens, writes.figures.goodput_tok_s)
        args: list[Any] = [
            table.encode(), self.request_ttl_s, fit, writer or "", COST_FIT_TTL_S,
            "1" if update_prior else "0", writes.prior_decay, writes.prior_accepted, writes.prior_tested,
            writes.prior_proposed, writes.prior_requested, PRIOR_TTL_S,
            self.worker_ttl_s, now, writes.worker_id,
            *(int(writes.totals.get(name, 0)) for name in TOTAL_FIELDS),
            *("" if v is None else repr(float(v)) for v in figures),
            info_json(info) if info else "",
            *(count for counts in writes.member_evidence.values() for count in counts),
        ]
        keys = [self.history_key(writes.worker_id), self.cost_key(writes.cost_profile_id),
                self.prior_key(writes.proposer_kind), self.worker_key(writes.worker_id), self.workers_key(),
                *map(self.prior_key, writes.member_evidence)]
        self._call(lambda: self._conn().record_step(keys=keys, args=args))
        return writer

    def write_cost_fit(self, cost_profile_id: str, fit: Mapping[str, Any], writer: str) -> str:
        """Store a cost fit alone (a stream ending with unsaved steps); returns `writer`."""
        args = [json.dumps(dict(fit)), writer, COST_FIT_TTL_S]
        self._call(lambda: self._conn().write_cost_fit(keys=[self.cost_key(cost_profile_id)], args=args))
        return writer

    def get_histories(self, worker_id: str) -> HistoryTable:
        """The worker's stored request histories (empty if none)."""
        return self._decode_table(worker_id, self._call(lambda: self._redis.get(self.history_key(worker_id))))

    # -- workers ------------------------------------------------------------------------------
    def register_worker(self, worker_id: str, info: Mapping[str, str], *, reset_totals: bool) -> None:
        """Record a worker's hello; a new connection (reset_totals) starts its totals from zero."""
        keys = [self.worker_key(worker_id), self.workers_key()]
        args = ["1" if reset_totals else "0", _now_ms(), self.worker_ttl_s, worker_id, info_json(info)]
        self._call(lambda: self._conn().register_worker(keys=keys, args=args))

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
        raw = self._call(lambda: self._redis.hget(self.cost_key(cost_profile_id), "fit"))
        return json.loads(raw) if raw is not None else None


"""The I/O around one planned step: validate, read Redis, plan, write Redis, count.

Shared by the stream (`Connect`) and the unary `Decide`. When Redis fails, the step is planned from
priors (empty histories, the hello's seed cost model, the pooled prior and policy last seen by this
process) and the plan says `degraded=true`; a warning is logged once per outage.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any


from smartspec.controller import validation
from smartspec.controller.codec import plan_basis_proto, policy_spec_proto
from smartspec.controller.acceptance import PooledPrior
from smartspec.controller.cost_model import DEFAULT_COST_MODEL, CostModel, OnlineCostFit, fit_profile
from smartspec.controller.metrics import ControllerMetrics
from smartspec.controller.planner import PlannerSettings, StepDecision, plan_step
from smartspec.controller.policies import DEFAULT_POLICY, PolicyError, Registry
from smartspec.controller.policies.base import Policy
from smartspec.controller.store import (
    ControllerStore,
    PolicyRecord,
    StepSnapshot,
    StoreUnavailable,
)
from smartspec.controller.validation import InvalidInput
from smartspec.v1 import common_pb2, controller_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSession:
    """A validated hello and what follows from it, computed once per connection."""

    hello: controller_pb2.WorkerHello
    seed_cost: CostModel                          # hello profile fitted over the default model
    proposer_kind: str                            # e.g. "PROPOSER_KIND_NGRAM"
    info: dict[str, str] = field(default_factory=dict)

    @property
    def worker_id(self) -> str:
        return self.hello.worker_id

    @property
    def cost_profile_id(self) -> str:
        return self.hello.cost_profile_id or self.hello.worker_id


def open_session(hello: controller_pb2.WorkerHello) -> WorkerSession:
    """Derive the per-connection facts of a (validated) hello."""
    return WorkerSession(
        hello=hello,
        seed_cost=fit_profile(hello.profile, DEFAULT_COST_MODEL) if len(hello.profile) else DEFAULT_COST_MODEL,
        proposer_kind=common_pb2.ProposerKind.Name(hello.proposer_kind),
        info={
            "model": hello.model,
            "proposer": hello.proposer,
            "device": hello.device,
            "max_speculation_length": str(hello.max_speculation_length),
            "max_batch_size": str(hello.max_batch_size),
            "cost_profile_id": hello.cost_profile_id or hello.worker_id,
            "proposer_kind": common_pb2.ProposerKind.Name(hello.proposer_kind),
        },
    )


@functools.lru_cache(maxsize=256)
def _session_from_bytes(hello_bytes: bytes) -> WorkerSession:
    return open_session(controller_pb2.WorkerHello.FromString(hello_bytes))


def error_plan(step_index: int, error: InvalidInput, decision_ms: float = 0.0) -> controller_pb2.StepPlan:
    return controller_pb2.StepPlan(
        step_index=step_index,
        error=controller_pb2.PlanError(grpc_status_code=error.code.value[0], field=error.field,
                                       message=error.message),
        decision_ms=decision_ms,
    )


class RedisHealth:
    """Tracks whether Redis answers, logging one warning per outage (not one per step)."""

    def __init__(self, metrics: ControllerMetrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self.ok = True

    def success(self) -> None:
        with self._lock:
            if not self.ok:
                log.warning("redis reachable again; leaving degraded mode")
            self.ok = True
        self._metrics.redis_ok.set(1)

    def failure(self, exc: Exception) -> None:
        with self._lock:
            if self.ok:
                log.warning("redis unreachable, planning from priors (degraded) until it returns: %s", exc)
            self.ok = False
        self._metrics.redis_errors.inc()
        self._metrics.redis_ok.set(0)


class Decider:
    """Turns a worker's report into a StepPlan; thread-safe, no per-request state of its own."""

    def __init__(self, store: ControllerStore, registry: Registry, metrics: ControllerMetrics,
                 settings: PlannerSettings = PlannerSettings()) -> None:
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self.redis = RedisHealth(metrics)
        # Last values read from Redis, used only while it is unreachable.
        self._last_policy: PolicyRecord | None = None
        self._last_priors: dict[str, PooledPrior] = {}
        self._unusable_warned: set[tuple[str, int]] = set()
        self._policy_specs: dict[tuple[str, int], common_pb2.PolicySpec] = {}

    # -- policy -------------------------------------------------------------------------------
    def default_policy(self) -> PolicyRecord:
        policy = self.registry.get(DEFAULT_POLICY)
        return PolicyRecord(name=policy.name, parameters=policy.validate({}), version=0)

    def active_policy(self, record: PolicyRecord | None) -> tuple[PolicyRecord, Policy, dict[str, Any]]:
        """The stored record resolved against this replica's registry; an unknown name or stale
        parameters (e.g. a plugin missing here) fall back to the default policy, logged."""
        record = record or self.default_policy()
        try:
            policy = self.registry.get(record.name)
            return record, policy, policy.validate(record.parameters)
        except PolicyError as exc:
            if (record.name, record.version) not in self._unusable_warned:  # once, not every step
                self._unusable_warned.add((record.name, record.version))
                log.warning("active policy %r v%d unusable on this replica (%s); using %r",
                            record.name, record.version, exc, DEFAULT_POLICY)
            fallback = self.default_policy()
            policy = self.registry.get(fallback.name)
            return PolicyRecord(fallback.name, fallback.parameters, record.version), policy, fallback.parameters

    def remember_policy(self, record: PolicyRecord | None) -> None:
        self._last_policy = record

    def last_policy(self) -> PolicyRecord | None:
        """The policy this process last read from Redis (None: never, or none was set)."""
        return self._last_policy

    # -- sessions -----------------------------------------------------------------------------
    def connect(self, hello: controller_pb2.WorkerHello) -> WorkerSession:
        """A new stream: register the worker (totals restart) if Redis answers."""
        session = open_session(hello)
        try:
            self.store.register_worker(session.worker_id, session.info, reset_totals=True)
            self.redis.success()
        except StoreUnavailable as exc:
            self.redis.failure(exc)
        log.info("worker connected worker_id=%s proposer=%s max_k=%d profile_samples=%d",
                 session.worker_id, session.proposer_kind, hello.max_speculation_length, len(hello.profile))
        return session

    def session_for(self, hello: controller_pb2.WorkerHello) -> WorkerSession:
        """Decide carries its hello on every call: derive the session once per distinct hello
        (fitting the profile is the costly part). Totals are not reset."""
        return _session_from_bytes(hello.SerializeToString(deterministic=True))

    # -- one step -----------------------------------------------------------------------------
    def step(self, session: WorkerSession, report: controller_pb2.StepReport, *,
             field_prefix: str = "", cost_override: CostModel | None = None) -> controller_pb2.StepPlan:
        """Plan one report. Raises InvalidInput for a malformed report (the caller maps it)."""
        started = time.perf_counter()
        validation.validate_report(report, session.hello, field_prefix)
        request_ids = [o.request_id for o in report.requests]

        degraded = False
        try:
            snapshot = self.store.read_step(session.worker_id, request_ids, session.cost_profile_id,
                                            session.proposer_kind)
            self.redis.success()
            self._last_policy = snapshot.policy
            if snapshot.prior is not None:
                self._last_priors[session.proposer_kind] = snapshot.prior
        except StoreUnavailable as exc:
            self.redis.failure(exc)
            degraded = True
            snapshot = StepSnapshot(histories={}, cost_fit=None, policy=self._last_policy,
                                    prior=self._last_priors.get(session.proposer_kind))

        record, policy, params = self.active_policy(snapshot.policy)
        decision = plan_step(
            session.hello, report, snapshot,
            cost_fit=self._cost_fit(session, snapshot),
            policy=policy, params=params, settings=self.settings,
            cost_override=cost_override,
            proposer_kind=session.proposer_kind,
            cost_profile_id=session.cost_profile_id,
        )

        if not degraded:
            try:
                self.store.write_step(decision.writes, info=session.info)
            except StoreUnavailable as exc:
                self.redis.failure(exc)
                degraded = True

        basis = plan_basis_proto(
            self._policy_spec(record, policy, params), record.version, decision.cost, decision.prior,
            self.settings, max_k=session.hello.max_speculation_length,
            goodput_per_ms=(decision.predicted_tokens / decision.predicted_step_ms
                            if decision.predicted_step_ms > 0 else 0.0),
        )
        decision_ms = (time.perf_counter() - started) * 1000.0
        self._observe(report, decision, record, decision_ms, snapshot, degraded)
        log.debug("planned worker_id=%s step=%d requests=%d ks=%s policy=%s v%d degraded=%s",
                  session.worker_id, report.step_index, len(decision.request_ids),
                  list(decision.speculation_lengths), record.name, record.version, degraded)
        return controller_pb2.StepPlan(
            step_index=report.step_index,
            requests=[controller_pb2.RequestPlan(request_id=rid, speculation_length=k)
                      for rid, k in zip(decision.request_ids, decision.speculation_lengths)],
            policy_name=record.name,
            policy_version=record.version,
            predicted_step_ms=decision.predicted_step_ms,
            predicted_tokens=decision.predicted_tokens,
            degraded=degraded,
            decision_ms=decision_ms,
            basis=basis,
        )

    def _policy_spec(self, record: PolicyRecord, policy: Policy, params: dict[str, Any]) -> common_pb2.PolicySpec:
        """The active policy as a PolicySpec, built once per (name, version)."""
        key = (record.name, record.version)
        spec = self._policy_specs.get(key)
        if spec is None or spec.name != policy.name:
            spec = policy_spec_proto(policy.name, params, policy)
            if len(self._policy_specs) > 64:
                self._policy_specs.clear()
            self._policy_specs[key] = spec
        return spec

    def _cost_fit(self, session: WorkerSession, snapshot: StepSnapshot) -> OnlineCostFit:
        """The stored fit of the worker's cost profile, or a new one seeded from its hello."""
        if snapshot.cost_fit is not None:
            try:
                return OnlineCostFit.from_dict(snapshot.cost_fit)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("stored cost fit for profile %s unreadable (%s); reseeding",
                            session.cost_profile_id, exc)
        return OnlineCostFit.create(session.seed_cost)

    def _observe(self, report: controller_pb2.StepReport, decision: StepDecision, record: PolicyRecord,
                 decision_ms: float, snapshot: StepSnapshot, degraded: bool) -> None:
        self.metrics.observe_step(
            policy=record.name,
            decision_ms=decision_ms,
            ks=decision.speculation_lengths,
            proposed=sum(o.proposed_tokens for o in report.requests),
            accepted=sum(o.accepted_tokens for o in report.requests),
            predicted_ms=decision.predicted_step_ms,
            predicted_tokens=decision.predicted_tokens,
            measured_ms=decision.measured_step_ms if report.requests else 0.0,
            generated=decision.generated_tokens,
            previous_predicted_ms=snapshot.worker.predicted_step_ms,
            degraded=degraded,
            policy_version=record.version,
        )


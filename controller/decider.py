"""The I/O around one planned step: validate, read Redis, plan, (reply,) write Redis, count.

Shared by the stream (`Connect`) and the unary `Decide`. A step is `plan` (one Redis read, then the
plan) and `persist` (one Redis write): a stream replies between the two, so a worker waits for the
read and the planning only; `step` does both for Decide, which replies after its write.

What a step reads depends on what the caller already holds. A stream keeps its worker's histories,
figures and cost fit in a `StreamMemory` (see there), and this replica keeps the active policy with
its stamp: the read script returns the policy only when its stamp changed (a SetPolicy on any
replica), so a swap reaches every replica at the next step without a per-step parse.

When Redis fails, the step is planned from what this process holds: a stream's memory if it has
read it, else priors (empty histories, the hello's seed cost model, the pooled prior and policy last
seen by this process), and the plan says `degraded=true`; a warning is logged once per outage.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from smartspec.controller import validation
from smartspec.core import tracing
from smartspec.core.codec import policy_spec_proto
from smartspec.core.acceptance import PooledPrior
from smartspec.core.cost_fit import OnlineCostFit
from smartspec.core.cost_model import CostModel
from smartspec.controller.metrics import ControllerMetrics
from smartspec.controller.history_table import HistoryTable
from smartspec.controller.plans import step_plan
from smartspec.controller.planner import PlannerSettings, StepDecision, plan_step
from smartspec.core.policies import DEFAULT_POLICY, PolicyError, Registry
from smartspec.core.policies.base import Policy
from smartspec.controller.report_columns import ReportColumns
from smartspec.controller.store import (
    ControllerStore,
    StepSnapshot,
    StepWrites,
    StoreUnavailable,
    WorkerFigures,
)
from smartspec.controller.store_policy import PolicyRecord, policy_stamp
from smartspec.controller.stream_memory import StreamMemory
from smartspec.controller.worker_session import WorkerSession, open_session, what_if_session_from_bytes
from smartspec.v1 import common_pb2, controller_pb2

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class DecidedStep:
    """A plan and what `persist` must store for it (None: nothing, e.g. planned without Redis)."""

    plan: controller_pb2.StepPlan
    writes: StepWrites | None


class Decider:
    """Turns a worker's report into a StepPlan; thread-safe. Per-request state lives in Redis and,
    for the lifetime of a stream, in that stream's `StreamMemory`."""

    def __init__(self, store: ControllerStore, registry: Registry, metrics: ControllerMetrics,
                 settings: PlannerSettings = PlannerSettings()) -> None:
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self.redis = RedisHealth(metrics)
        # The active policy as last read (stamp, record); the read script re-sends it on a change.
        self._policy: tuple[str, PolicyRecord | None] = ("", None)
        self._resolved: tuple[tuple | None, tuple[PolicyRecord, Policy, dict[str, Any]]] | None = None
        # Last priors read from Redis, used only while it is unreachable.
        self._last_priors: dict[str, PooledPrior] = {}
        self._unusable_warned: set[tuple[str, int]] = set()
        self._policy_specs: dict[tuple[str, int], common_pb2.PolicySpec] = {}
        self._writer = f"{uuid.uuid4().hex[:12]}:"  # + a counter: tokens of this replica's cost fit writes
        self._writes = iter(range(1, 1 << 62))
        # One thread at a time runs a step's Python work (reading the report, planning); Redis I/O
        # runs outside. Threads waiting here sleep until their turn instead of polling for the GIL
        # (each waiter wakes every switch interval): with many streams on one replica that polling
        # cost more kernel time than the plans themselves (BENCHMARKS.md, "Controller capacity").
        self._cpu = threading.Lock()

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
        """The policy as stored (just read or just set): steps use it until its stamp changes."""
        self._policy = (policy_stamp(record), record)

    def last_policy(self) -> PolicyRecord | None:
        """The policy this process last read from Redis (None: never, or none was set)."""
        return self._policy[1]

    def _resolve(self, record: PolicyRecord | None) -> tuple[PolicyRecord, Policy, dict[str, Any]]:
        """`active_policy`, validated once per stored version rather than once per step."""
        key = None if record is None else (record.name, record.version, record.updated_unix_ms)
        cached = self._resolved
        if cached is not None and cached[0] == key:
            return cached[1]
        resolved = self.active_policy(record)
        self._resolved = (key, resolved)
        return resolved

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
        """Decide's session for a (validated) hello, derived once per distinct hello (fitting the
        profile is the costly part). Its keys are in Decide's own namespace (`what_if_session`):
        a Decide never reads or writes a streaming worker's histories, a cost profile's fit or
        the pooled prior that streams plan with, whatever ids its hello names."""
        return what_if_session_from_bytes(hello.SerializeToString(deterministic=True))

    # -- one step -----------------------------------------------------------------------------
    def step(self, session: WorkerSession, report: controller_pb2.StepReport, *,
             field_prefix: str = "", cost_override: CostModel | None = None) -> controller_pb2.StepPlan:
        """Plan one report and store it before returning (Decide, with a `session_for` session,
        so what it stores is Decide's own). Raises InvalidInput for a malformed report (the
        caller maps it)."""
        planned = self.plan(session, report, field_prefix=field_prefix, cost_override=cost_override)
        self.persist(session, planned)
        return planned.plan

    def plan(self, session: WorkerSession, report: controller_pb2.StepReport, memory: StreamMemory | None = None,
             *, field_prefix: str = "", cost_override: CostModel | None = None) -> DecidedStep:
        """Validate, read Redis once, plan. `memory`: the stream's (updated in place), None for Decide.
        Raises InvalidInput for a malformed report (the caller maps it)."""
        if tracing.ENABLED:
            return self._traced_plan(session, report, memory, field_prefix=field_prefix, cost_override=cost_override)
        return self._plan(session, report, memory, field_prefix=field_prefix, cost_override=cost_override)

    def _traced_plan(self, session: WorkerSession, report: controller_pb2.StepReport, memory: StreamMemory | None,
                     **kwargs: Any) -> DecidedStep:
        """`_plan` inside a `smartspec.controller.plan` span, a child of the worker's step span when
        the report carries its trace context (core/tracing.py)."""
        span = tracing.start_span("smartspec.controller.plan", parent_context=tracing.extract(report.trace_context),
                                  attributes={"smartspec.worker_id": session.worker_id,
                                              "smartspec.step_index": report.step_index,
                                              "smartspec.batch_size": len(report.requests)})
        try:
            planned = self._plan(session, report, memory, **kwargs)
            plan = planned.plan
            span.set_attributes({"smartspec.policy": plan.policy_name,
                                 "smartspec.policy_version": plan.policy_version,
                                 "smartspec.predicted_step_ms": plan.predicted_step_ms,
                                 "smartspec.predicted_tokens": plan.predicted_tokens,
                                 "smartspec.degraded": plan.degraded,
                                 "smartspec.speculating_rows": sum(1 for r in plan.requests if r.speculation_length)})
            return planned
        except Exception as exc:
            tracing.record_error(span, exc)
            raise
        finally:
            span.end()

    def _plan(self, session: WorkerSession, report: controller_pb2.StepReport, memory: StreamMemory | None = None,
              *, field_prefix: str = "", cost_override: CostModel | None = None) -> DecidedStep:
        started = time.perf_counter()
        with self._cpu:
            validation.validate_report_totals(report, session.hello, field_prefix)
            columns = ReportColumns.from_report(report)
            validation.validate_outcomes(report, field_prefix, columns, hello=session.hello)
        snapshot, policy_record, degraded = self._read(session, memory)
        with self._cpu:
            return self._decide(session, report, memory, columns, snapshot, policy_record, degraded,
                                cost_override, started)

    def _read(self, session: WorkerSession,
              memory: StreamMemory | None) -> tuple[StepSnapshot, PolicyRecord | None, bool]:
        """The step's one Redis read, asking only for what the caller does not hold: (snapshot, the
        active policy, degraded). Redis unreachable: an empty snapshot with the last prior seen."""
        held_stamp, held_policy = self._policy
        try:
            snapshot = self.store.read_step(
                session.worker_id, session.cost_profile_id, session.proposer_kind,
                histories=memory is None or memory.histories is None,
                cost_fit_writer=memory.cost_fit_writer if memory is not None and memory.cost_fit is not None else None,
                policy_stamp=held_stamp,
                worker=memory is None or memory.worker is None,
                member_kinds=session.member_kinds,
            )
        except StoreUnavailable as exc:
            self.redis.failure(exc)
            return (StepSnapshot(histories=None, cost_fit=None, policy=None,
                                 prior=self._last_priors.get(session.proposer_kind),
                                 member_priors={kind: self._last_priors.get(kind) for kind in session.member_kinds}),
                    held_policy, True)
        self.redis.success()
        if not snapshot.policy_unchanged:
            self.remember_policy(snapshot.policy)
            held_policy = snapshot.policy
        for kind, prior in ((session.proposer_kind, snapshot.prior), *snapshot.member_priors.items()):
            if prior is not None:
                self._last_priors[kind] = prior
        return snapshot, held_policy, False

    def _decide(self, session: WorkerSession, report: controller_pb2.StepReport, memory: StreamMemory | None,
                columns: ReportColumns, snapshot: StepSnapshot, policy_record: PolicyRecord | None, degraded: bool,
                cost_override: CostModel | None, started: float) -> DecidedStep:
        """The plan, from what was read and what the caller holds (no I/O)."""
        histories, figures, cost_fit = self._state(session, snapshot, memory, degraded)
        snapshot = dataclasses.replace(snapshot, histories=histories, worker=figures)
        record, policy, params = self._resolve(policy_record)
        decision = plan_step(
            session.hello, report, snapshot,
            cost_fit=cost_fit,
            policy=policy, params=params, settings=self.settings,
            cost_override=cost_override,
            proposer_kind=session.proposer_kind,
            cost_profile_id=session.cost_profile_id,
            columns=columns,
            member_kinds=session.member_kinds,
        )
        if memory is not None:
            memory.worker = decision.writes.figures

        plan = step_plan(report.step_index, decision, record=record,
                         policy_spec=self._policy_spec(record, policy, params), settings=self.settings,
                         max_k=session.hello.max_speculation_length, degraded=degraded)
        plan.decision_ms = decision_ms = (time.perf_counter() - started) * 1000.0
        self._observe(report, decision, record, decision_ms, figures, degraded)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("planned worker_id=%s step=%d requests=%d ks=%s policy=%s v%d degraded=%s",
                      session.worker_id, report.step_index, len(decision.request_ids),
                      list(decision.speculation_lengths), record.name, record.version, degraded)
        return DecidedStep(plan, None if degraded else decision.writes)

    def persist(self, session: WorkerSession, planned: DecidedStep, memory: StreamMemory | None = None) -> None:
        """Store a planned step's writes (one atomic script); a failure marks Redis down and leaves
        `memory` holding the only copy until a later write succeeds. A stream's cost fit is stored
        at its own cadence (see StreamMemory)."""
        writes = planned.writes
        if writes is None:
            return
        save_fit = memory is None or memory.should_save_fit()
        if not save_fit:
            writes = dataclasses.replace(writes, cost_fit=None)
        try:
            writer = self.store.write_step(writes, info=session.info, cost_fit_writer=self._next_writer())
            self.redis.success()
        except StoreUnavailable as exc:
            self.redis.failure(exc)
            return
        if memory is not None:
            if save_fit:
                memory.cost_fit_writer, memory.fit_unsaved_steps = writer, 0
            else:
                memory.fit_unsaved_steps += 1

    def flush(self, session: WorkerSession, memory: StreamMemory) -> None:
        """A stream ends (or re-introduces itself): store its cost fit if it has unsaved steps."""
        if memory.cost_fit is None or not memory.fit_unsaved_steps:
            return
        try:
            writer = self.store.write_cost_fit(session.cost_profile_id, memory.cost_fit.to_dict(), self._next_writer())
            self.redis.success()
        except StoreUnavailable as exc:
            self.redis.failure(exc)
            return
        memory.cost_fit_writer, memory.fit_unsaved_steps = writer, 0

    def _next_writer(self) -> str:
        return f"{self._writer}{next(self._writes)}"

    def _state(self, session: WorkerSession, snapshot: StepSnapshot, memory: StreamMemory | None,
               degraded: bool) -> tuple[HistoryTable, WorkerFigures, OnlineCostFit]:
        """Histories, last figures and cost fit to plan with: the stream's memory where it holds
        them (loading it from this step's read the first time), else what was read, else priors."""
        if memory is None:
            histories = snapshot.histories if snapshot.histories is not None else HistoryTable()
            return histories, snapshot.worker, self._cost_fit(session, snapshot)
        if memory.histories is None and not degraded:
            memory.histories = snapshot.histories
        if memory.worker is None and not degraded:
            memory.worker = snapshot.worker
        if memory.cost_fit is None or not (degraded or snapshot.cost_fit_unchanged):
            fit = self._cost_fit(session, snapshot)
            if degraded:  # the seed, for this step only: the stored fit is loaded when Redis answers
                return self._held(memory.histories), memory.worker or WorkerFigures(), fit
            if memory.cost_fit is not None and snapshot.cost_fit_writer is not None:
                memory.fit_shared = True  # someone else stored this profile's fit since we last did
            memory.cost_fit, memory.cost_fit_writer, memory.fit_unsaved_steps = fit, snapshot.cost_fit_writer or "", 0
        return self._held(memory.histories), memory.worker or WorkerFigures(), memory.cost_fit

    @staticmethod
    def _held(histories: HistoryTable | None) -> HistoryTable:
        return histories if histories is not None else HistoryTable()

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
                 decision_ms: float, previous: WorkerFigures, degraded: bool) -> None:
        writes = decision.writes
        self.metrics.observe_step(
            policy=record.name,
            decision_ms=decision_ms,
            ks=decision.speculation_lengths,
            proposed=writes.totals["proposed"],
            accepted=writes.totals["accepted"],
            predicted_ms=decision.predicted_step_ms,
            predicted_tokens=decision.predicted_tokens,
            measured_ms=decision.measured_step_ms if report.requests else 0.0,
            generated=decision.generated_tokens,
            previous_predicted_ms=previous.predicted_step_ms,
            degraded=degraded,
            policy_version=record.version,
        )

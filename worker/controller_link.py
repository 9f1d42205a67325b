"""The worker's side of `Controller.Connect`: stream each step's facts, plan one step ahead.

The stream lives on its own thread, so a slow or dead controller never blocks a step. After step t
the engine hands its facts here; they are queued for the stream and the engine goes straight on to
step t+1, planned with the newest plan held, which answers report t-1 (or t, if it was quick).
That plan's basis (policy, cost model, pooled prior) is re-solved for the batch the worker actually
runs, with the worker's own newest acceptance history and look-ahead (`worker/replan.py`).

When the controller falls behind (a plan more than one step late), the worker does not wait: it
re-solves the newest basis it holds, as long as that arrived within `basis_max_age_s`. The shared
state in a basis moves slowly, and the simulator (BENCHMARKS.md, "Plan staleness") shows that
re-solving a basis several steps old costs far less than waiting for a fresh one or freezing each
request's k. Only with no basis that recent (a controller down for a while, or a stream just
opened) does the engine wait, at most `plan_deadline_ms` (by default a quarter of the last step
time, at least 5 ms), and then fall back: each request keeps the k it last ran, and a request not
yet planned runs `fallback_k`. A broken stream is reopened with capped, jittered exponential
backoff while serving goes on.

A controller that refuses the stream (UNAUTHENTICATED or PERMISSION_DENIED: the worker's token is
missing or wrong) will not change its mind in a second: those refusals back off on their own, much
longer schedule (`auth_backoff_initial_s` 30 s doubling to `auth_backoff_max_s` 5 min, jittered), and
are logged at most once per `auth_log_interval_s` (one line saying so, with the attempts refused
since the last line; never the token). Serving goes on with the local fallback meanwhile.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import grpc

from smartspec.v1 import controller_pb2, controller_pb2_grpc

from smartspec.core import tracing
from smartspec.core.acceptance import OutcomeError

from .goodput_guard import GoodputGuard
from smartspec.core.decision import AcceptanceBook
from .replan import PlanBasis, decode_basis, replan
from .steps import SpeculationQuery, StepFacts

log = logging.getLogger(__name__)

_CLOSE = object()   # sentinel that ends one stream's request iterator

# The controller will not accept this worker until someone fixes its token: not a transient error.
REFUSED_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True)
class StreamOutcome:
    """How one Connect attempt ended."""

    connected: bool                            # the stream was opened (and not refused)
    refused: grpc.StatusCode | None = None     # UNAUTHENTICATED / PERMISSION_DENIED, else None
    details: str = ""


@dataclass(frozen=True)
class LinkConfig:
    address: str                          # "HOST:PORT" of a controller (or a load balancer in front)
    plan_deadline_ms: float | None = None  # fixed wait for a plan; None = adaptive (below)
    min_deadline_ms: float = 5.0
    deadline_fraction: float = 0.25       # adaptive deadline = max(min, fraction * last step time)
    fallback_k: int = 0
    basis_max_age_s: float = 5.0          # re-solve a late plan's basis up to this old; then fall back
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    auth_backoff_initial_s: float = 30.0  # after the stream is refused (token missing or wrong) ...
    auth_backoff_max_s: float = 300.0     # ... doubling to this cap, jittered like the above
    auth_log_interval_s: float = 60.0     # at most one log line about refusals per this long
    connect_timeout_s: float = 2.0
    auth_token: str = ""                  # sent as `authorization: Bearer ...` when set
    tls_ca_file: str = ""                 # PEM roots: connect with TLS when set


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff capped at max_s, with 'equal jitter' (half fixed, half random) so that
    many workers losing one controller do not all reconnect in the same instant."""
    ceiling = min(max_s, initial_s * (2 ** min(attempt, 30)))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def report_to_proto(facts: StepFacts) -> controller_pb2.StepReport:
    return controller_pb2.StepReport(
        step_index=facts.step_index,
        requests=[
            controller_pb2.RequestOutcome(
                request_id=r.request_id,
                proposed_tokens=r.proposed_tokens,
                accepted_tokens=r.accepted_tokens,
                tested_positions=r.tested_positions,
                context_tokens=r.context_tokens,
                prefill_tokens=r.prefill_tokens,
                finished=r.finished,
                requested_tokens=r.requested_tokens,
                proposable_tokens=r.proposable_tokens,
                proposer_kind=r.proposer_kind or 0,
            )
            for r in facts.requests
        ],
        draft_ms=facts.draft_ms,
        verify_ms=facts.verify_ms,
        total_ms=facts.total_ms,
        batched_tokens=facts.batched_tokens,
        queued_requests=facts.queued_requests,
    )


class ControllerLink:
    """A Planner backed by a controller stream, with a local fallback."""

    def __init__(self, config: LinkConfig, hello: controller_pb2.WorkerHello, *, metrics: Any = None,
                 rng: random.Random | None = None, clock=time.monotonic, proposer: Any = None) -> None:
        self.config = config
        self.hello = hello
        self.metrics = metrics
        self.proposer = proposer  # the worker's: a ProposerChoice with a draft model gets (member, k) plans
        self._rng = rng or random.Random()
        self._clock = clock                                    # for rate-limiting the refusal log line
        self._cond = threading.Condition()
        self._latest: controller_pb2.StepPlan | None = None   # newest plan received
        self._latest_basis: PlanBasis | None = None            # newest usable basis (None: apply plan ks)
        self._basis_received = 0.0                             # monotonic time it arrived
        self._first_report: int | None = None                  # first step index sent on this stream
        self._last_k: dict[str, int] = {}                      # k each request last ran
        self.book = AcceptanceBook()                           # this worker's own request histories
        self.guard = GoodputGuard(metrics=metrics)             # measured goodput: speculative vs plain steps
        self._outbox: queue.Queue | None = None                # the open stream's requests
        self._call = None
        self._closing = threading.Event()
        self._last_step_ms = 0.0
        self.connected = False
        self.fallback_steps = 0                                # no recent basis: last k / fallback_k
        self.late_steps = 0                                    # re-solved a basis over one step late
        self.plans_applied = 0                                 # planned from a plan at most one step old
        self.plan_wait_ms_total = 0.0                          # time steps spent waiting for plans
        self.connections = 0                                   # successful (re)connections
        self.refusals = 0                                      # streams refused (token missing or wrong)
        self._refusals_unlogged = 0                            # refused since the last line about it
        self._refusal_logged_at = -float("inf")
        self._thread = threading.Thread(target=self._run, name="smartspec-controller-link", daemon=True)

    # ---- Planner ----------------------------------------------------------------------------

    def plan(self, step_index: int, queries: Sequence[SpeculationQuery], queued_requests: int) -> dict[str, int]:
        if tracing.ENABLED:
            return self._traced_plan(step_index, queries, queued_requests)
        return self._plan(step_index, queries, queued_requests)

    def _traced_plan(self, step_index: int, queries: Sequence[SpeculationQuery], queued_requests: int) -> dict[str, int]:
        """`_plan` inside a span, a child of the engine's step span (the current one)."""
        counts = (self.plans_applied, self.late_steps, self.fallback_steps)
        span = tracing.start_span("smartspec.worker.plan", attributes={
            "smartspec.step_index": step_index, "smartspec.batch_size": len(queries)})
        try:
            ks = self._plan(step_index, queries, queued_requests)
            now = (self.plans_applied, self.late_steps, self.fallback_steps)
            source = next((name for name, a, b in zip(("applied", "late", "fallback"), now, counts) if a != b), "")
            span.set_attributes({"smartspec.plan_source": source,
                                 "smartspec.speculating_rows": sum(1 for k in ks.values() if k),
                                 "smartspec.proposals_planned": sum(ks.values())})
            return ks
        finally:
            span.end()

    def _plan(self, step_index: int, queries: Sequence[SpeculationQuery], queued_requests: int) -> dict[str, int]:
        with self._cond:
            plan, basis = self._latest, self._usable_basis()
        # Step t+1 is meant to use the answer to report t-1 (one step stale) or newer.
        on_time = plan is not None and plan.step_index + 2 >= step_index and not plan.HasField("error")
        if basis is not None:
            if on_time:
                self.plans_applied += 1
            else:
                self.late_steps += 1
            if self.metrics is not None:
                self.metrics.observe_plan_age(step_index - 1 - plan.step_index if plan is not None else 0)
            ks = replan(basis, self.book, queries, step_index=step_index, queued_requests=queued_requests,
                        max_k=self.hello.max_speculation_length, guard=self.guard, proposer=self.proposer)
        elif on_time:   # a plan whose basis this worker cannot run: its ks as sent, capped to look-ahead
            self.plans_applied += 1
            sent = {entry.request_id: entry.speculation_length for entry in plan.requests}
            ks = self.book.cap(queries, [sent.get(q.request_id, self._last_k.get(q.request_id, self.config.fallback_k))
                                         for q in queries])
        else:
            self.fallback_steps += 1
            if self.metrics is not None:
                self.metrics.observe_fallback()
            ks = {q.request_id: self._last_k.get(q.request_id, self.config.fallback_k) for q in queries}
        self._last_k.update(ks)
        return ks

    def _usable_basis(self) -> PlanBasis | None:
        """The newest good basis, if it arrived within basis_max_age_s (call holding _cond)."""
        if self._latest_basis is None or time.monotonic() - self._basis_received > self.config.basis_max_age_s:
            return None
        return self._latest_basis

    def observe(self, facts: StepFacts) -> None:
        """Record the step locally and queue its report. Wait (bounded) only when no usable basis
        is held at all, e.g. the first report on a new stream."""
        try:
            self.book.observe(facts)
        except OutcomeError as exc:  # an engine bug: the controller will reject the report too
            log.warning("step %d: outcome not recorded locally: %s", facts.step_index, exc)
        self.guard.observe(facts)
        for outcome in facts.requests:
            if outcome.finished:
                self._last_k.pop(outcome.request_id, None)
        self._last_step_ms = facts.total_ms
        outbox = self._outbox
        if outbox is None or not self.connected:
            return
        with self._cond:
            if self._first_report is None:
                self._first_report = facts.step_index
            needed = max(facts.step_index - 1, self._first_report)
            must_wait = self._usable_basis() is None
        report = report_to_proto(facts)
        if tracing.ENABLED:   # the step span (current here) becomes the controller plan span's parent
            tracing.inject(tracing.current_span(), report.trace_context)
        outbox.put(controller_pb2.WorkerMessage(report=report))
        if not must_wait:
            if self.metrics is not None:
                self.metrics.observe_plan_wait(0.0)
            return
        waited_from = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None and self._latest.step_index >= needed,
                                timeout=self.deadline_ms() / 1000.0)
        waited_ms = (time.perf_counter() - waited_from) * 1000.0
        self.plan_wait_ms_total += waited_ms
        if self.metrics is not None:
            self.metrics.observe_plan_wait(waited_ms)

    def deadline_ms(self) -> float:
        if self.config.plan_deadline_ms is not None:
            return self.config.plan_deadline_ms
        return max(self.config.min_deadline_ms, self.config.deadline_fraction * self._last_step_ms)

    # ---- the stream thread ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def _closed(self) -> bool:
        return self._closing.is_set()

    def close(self) -> None:
        self._closing.set()                 # also cuts a backoff sleep short
        self._end_stream()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        attempt = 0          # transient failures since the last good stream (unreachable, broken)
        refused = 0          # refusals since the last good stream: the long schedule
        while not self._closed:
            outcome = self._stream_once()
            if self._closed:
                break
            if outcome.refused is not None:
                attempt = 0
                delay = backoff_delay(refused, self.config.auth_backoff_initial_s, self.config.auth_backoff_max_s,
                                      self._rng)
                refused += 1
                self._log_refusal(outcome, delay)
            else:
                if outcome.connected:
                    attempt = refused = 0
                delay = backoff_delay(attempt, self.config.backoff_initial_s, self.config.backoff_max_s, self._rng)
                attempt += 1
                log.info("controller %s unreachable; retrying in %.2fs", self.config.address, delay)
            self._closing.wait(delay)

    def _log_refusal(self, outcome: StreamOutcome, delay: float) -> None:
        """One line per `auth_log_interval_s` at most, counting the refusals in between."""
        self.refusals += 1
        self._refusals_unlogged += 1
        now = self._clock()
        if now - self._refusal_logged_at < self.config.auth_log_interval_s:
            return
        count, self._refusals_unlogged, self._refusal_logged_at = self._refusals_unlogged, 0, now
        sent = "a bearer token" if self.config.auth_token else "no token"
        log.warning(
            "controller %s refused this worker (%s: %s): the token is missing or wrong. Sent %s "
            "(worker flag --controller-token, env SMARTSPEC_CONTROLLER_TOKEN; it must equal the "
            "controller's --auth-token). %d attempt%s refused since the last such line; serving "
            "with the local fallback, next try in %.3g s (backoff up to %.3g s)",
            self.config.address, outcome.refused.name, outcome.details or "no details", sent,
            count, "" if count == 1 else "s", delay, self.config.auth_backoff_max_s)

    def _channel(self) -> grpc.Channel:
        if self.config.tls_ca_file:
            with open(self.config.tls_ca_file, "rb") as f:
                return grpc.secure_channel(self.config.address, grpc.ssl_channel_credentials(f.read()))
        return grpc.insecure_channel(self.config.address)

    def _stream_once(self) -> StreamOutcome:
        """Open one Connect stream and read plans until it breaks; how it ended."""
        channel = self._channel()
        got_connected = False
        refused: grpc.StatusCode | None = None
        details = ""
        try:
            grpc.channel_ready_future(channel).result(timeout=self.config.connect_timeout_s)
            outbox: queue.Queue = queue.Queue()
            metadata = [("authorization", f"Bearer {self.config.auth_token}")] if self.config.auth_token else None
            self._call = controller_pb2_grpc.ControllerStub(channel).Connect(
                self._requests(outbox), metadata=metadata
            )
            with self._cond:
                self._first_report = None       # set by the first report this stream carries
            self._outbox = outbox
            self._set_connected(True)
            got_connected = True
            self.connections += 1
            for plan in self._call:
                basis = decode_basis(plan.basis) if not plan.HasField("error") else None  # off the step path
                with self._cond:
                    if self._latest is None or plan.step_index >= self._latest.step_index:
                        self._latest = plan
                        if basis is not None:          # an error plan keeps the last good basis
                            self._latest_basis, self._basis_received = basis, time.monotonic()
                        elif not plan.HasField("error"):
                            self._latest_basis = None  # a basis this worker cannot run: apply the ks
                    self._cond.notify_all()
                if plan.HasField("error"):
                    log.warning("controller rejected step %d: %s (%s)", plan.step_index,
                                plan.error.message, plan.error.field)
        except grpc.FutureTimeoutError:
            pass
        except grpc.RpcError as exc:
            if exc.code() in REFUSED_CODES:    # logged by _run, rate-limited
                refused, details = exc.code(), exc.details() or ""
                if got_connected:
                    self.connections -= 1      # a refused stream was no connection
            elif not self._closed:
                log.warning("controller stream ended: %s %s", exc.code(), exc.details())
        finally:
            self._set_connected(False)
            self._end_stream()
            channel.close()
        return StreamOutcome(connected=got_connected and refused is None, refused=refused, details=details)

    def _requests(self, outbox: queue.Queue):
        yield controller_pb2.WorkerMessage(hello=self.hello)
        while True:
            item = outbox.get()
            if item is _CLOSE:
                return
            yield item

    def _end_stream(self) -> None:
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            outbox.put(_CLOSE)
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        if self.metrics is not None:
            self.metrics.set_controller_connected(value)

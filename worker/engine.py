"""The continuous-batching engine: slots, a waiting queue and the speculative step loop.

All torch work happens on one dedicated thread. gRPC threads only `submit` requests and `cancel`
them, and read each request's events from its own queue, so a slow client never slows a step.

One step:
  1. take in new requests and cancellations;
  2. ask the planner for every decoding request's k (clamped to what the request can still use);
  3. admit queued requests into free slots within the token budget (chunked prefill);
  4. draft: one batched `propose` for the rows with k > 0;
  5. verify: ONE target forward over every decoding row's [last token, proposals...] (right-padded),
     plus the prefill chunks, then greedy or rejection verification of all rows in one pass;
  6. append accepted tokens + the target's token, roll the slot length back past rejections,
     check stop conditions, stream deltas, free finished slots;
  7. hand the step's facts to the planner (which may send them to the controller).

This module is the loop and its bookkeeping; the rest lives next to it: running.py (a request's
handle and its state in a slot), lifecycle.py (admission into slots, appending tokens, finishing,
cancelling, failing), step_forwards.py (steps 4-6: the draft and target forwards), scheduler.py
(the token budget and k clamping), steps.py (what a step reports to its planner) and model_facts.py
(a slot's context window and the end-of-sequence ids, read from the model).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from smartspec.core import tracing
from smartspec.worker.proposers import Proposer

from .lifecycle import RequestLifecycle
from .model_facts import context_window, eos_token_ids
from .running import RequestHandle, RunningRequest
from .scheduler import clamp_speculation, group_by_length, chunk_prefill
from .sequence import GenerationRequest
from .step_forwards import StepForwards
from .steps import SpeculationQuery, Planner, RequestFacts, StepFacts

log = logging.getLogger(__name__)

MAX_STEP_LINKS = 128   # a traced step links at most this many requests besides its parent's


class EngineError(Exception):
    """Base of the errors `submit` raises; the server maps each to a gRPC status."""


class QueueFullError(EngineError):
    pass


class DuplicateRequestError(EngineError):
    pass


class EngineStoppedError(EngineError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32          # slots, i.e. requests decoding at once
    max_context_tokens: int = 2048    # KV capacity per slot (prompt + completion)
    max_queue: int = 256              # waiting requests beyond the slots; more -> RESOURCE_EXHAUSTED
    token_budget: int = 2048          # target query tokens per step (decode + proposals + prefill)
    max_k: int = 8                    # largest speculation length
    fallback_k: int = 0               # k for a request the planner did not answer for

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_context_tokens", "token_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_queue < 0 or self.max_k < 0 or self.fallback_k < 0:
            raise ValueError("max_queue, max_k and fallback_k must be >= 0")
        if self.token_budget < self.max_batch_size * (self.max_k + 1):
            # every running request must be able to decode with its full k in one step
            raise ValueError("token_budget must be >= max_batch_size * (max_k + 1)")


@dataclass(frozen=True)
class EngineSnapshot:
    running: int
    queued: int
    steps: int


class Engine:
    """Owns the KV cache and the step loop. `start()` launches the loop thread."""

    def __init__(
        self,
        model: Any,                    # smartspec.worker.model LoadedModel (.module, .tokenizer)
        proposer: Proposer,
        config: EngineConfig,
        planner: Planner,
        *,
        metrics: Any = None,           # smartspec.worker.metrics.WorkerMetrics or None
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model = model
        self.proposer = proposer
        self.config = config
        self.planner = planner
        self.metrics = metrics
        self._clock = clock
        self.context_window = context_window(model, config.max_context_tokens)
        self.cache = model.module.allocate_cache(config.max_batch_size, self.context_window)
        self.eos_ids = eos_token_ids(model)
        # Fast tokenizers may take a mutable borrow inside encode ("Already borrowed" when two
        # threads meet): the server's encodes and the loop's decodes share this lock.
        self.tokenizer_lock = threading.Lock()

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[RequestHandle] = deque()       # submitted, not yet seen by the loop
        self._cancels: set[str] = set()
        self._known_ids: dict[str, RequestHandle] = {}    # queued or running (duplicate check)
        self._waiting: deque[tuple[RequestHandle, float]] = deque()   # loop-thread only
        # Loop-thread only: the running requests, their slots, and how they end.
        self._lifecycle = RequestLifecycle(
            slots=config.max_batch_size, proposer=proposer, eos_ids=self.eos_ids,
            context_window=self.context_window, decode=self._locked_decode, clock=clock,
            release_id=self._release_id, metrics=metrics,
        )
        self._running = self._lifecycle.running           # request id -> RunningRequest
        self._forwards = StepForwards(module=model.module, cache=self.cache, proposer=proposer,
                                      lifecycle=self._lifecycle, max_k=config.max_k)
        self._step_index = 0
        # When the previous step's total_ms was taken (None after an idle wait): the next step's
        # total_ms starts here, so the report/plan wait and bookkeeping between steps count.
        self._previous_step_end: float | None = None
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._counts = EngineSnapshot(running=0, queued=0, steps=0)

    def _locked_decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.model.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- called from any thread -------------------------------------------------------------

    def submit(self, request: GenerationRequest, trace: Any = None) -> RequestHandle:
        """`trace`: the request's Generate span when tracing (its steps' parent or link)."""
        handle = RequestHandle(request, self._clock())
        if trace is not None:
            handle.trace = trace
        with self._lock:
            if not self._accepting:
                raise EngineStoppedError("the worker is shutting down")
            if request.request_id in self._known_ids:
                raise DuplicateRequestError(f"request_id {request.request_id!r} is already running")
            busy = len(self._running) + len(self._inbox) + len(self._waiting)
            if busy >= self.config.max_batch_size + self.config.max_queue:
                # Requests still in the inbox may be about to take free slots: what waits for a slot
                # is whatever the slots cannot hold, never more than max_queue at this check.
                raise QueueFullError(
                    f"the queue is full: all {self.config.max_batch_size} slots are taken and "
                    f"{busy - self.config.max_batch_size} requests wait for one (max_queue {self.config.max_queue})"
                )
            self._known_ids[request.request_id] = handle
            self._inbox.append(handle)
            self._wake.notify()
        return handle

    def cancel(self, request_id: str, handle: RequestHandle | None = None) -> None:
        """Free the request's slot before the next step (no-op when it already ended).

        With `handle`, only that submission is cancelled, never a later one reusing its id.
        """
        with self._lock:
            current = self._known_ids.get(request_id)
            if current is not None and (handle is None or current is handle):
                self._cancels.add(request_id)
                self._wake.notify()

    def snapshot(self) -> EngineSnapshot:
        with self._lock:
            counts = self._counts
            return EngineSnapshot(running=counts.running, queued=counts.queued + len(self._inbox), steps=counts.steps)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._loop, name="smartspec-engine", daemon=True)
        self._thread.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting; let running and queued requests finish within `grace` s, cancel the rest."""
        with self._lock:
            self._accepting = False
        deadline = None if grace is None else time.monotonic() + grace
        while deadline is None or time.monotonic() < deadline:
            with self._lock:
                if not self._known_ids:
                    break
            time.sleep(0.01)
        with self._lock:
            self._cancels.update(self._known_ids)
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _release_id(self, request_id: str) -> None:
        """The request ended: its id may be submitted again (called from the loop thread)."""
        with self._lock:
            self._known_ids.pop(request_id, None)
            self._cancels.discard(request_id)

    # ---- the loop thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self._inbox or self._cancels or self._running or self._waiting):
                    self._previous_step_end = None   # idle time is not a step's cost
                    self._wake.wait()
                incoming = list(self._inbox)
                self._inbox.clear()
                cancels = set(self._cancels)
                self._cancels.clear()
                stopping = self._stop
            self._waiting.extend((handle, handle.submitted_at) for handle in incoming)
            self._apply_cancels(cancels)
            self._publish_counts()
            if stopping and not self._running and not self._waiting:
                return
            if not (self._running or self._waiting):
                self._flush_idle_report()
                continue
            try:
                if tracing.ENABLED:
                    self._traced_step()
                else:
                    self._step()
            except Exception as exc:  # a bug or device error: fail the batch, keep the worker alive
                log.exception("engine step failed")
                self._lifecycle.fail_all(f"engine step failed: {exc}")

    def _apply_cancels(self, cancels: set[str]) -> None:
        if not cancels:
            return
        kept = deque()
        for handle, queued_at in self._waiting:
            if handle.request.request_id in cancels:
                self._lifecycle.cancel_unstarted(handle, queued_at)
            else:
                kept.append((handle, queued_at))
        self._waiting = kept
        for request_id in cancels:
            seq = self._running.get(request_id)
            if seq is not None:
                self._lifecycle.cancel(seq)

    def _publish_counts(self) -> None:
        """What GetWorkerInfo reads (the loop's own structures are not shared)."""
        with self._lock:
            self._counts = EngineSnapshot(running=len(self._running), queued=len(self._waiting),
                                          steps=self._step_index)

    def _flush_idle_report(self) -> None:
        """Cancellations with nothing else to run still tell the planner those requests ended."""
        if self._lifecycle.pending_finished:
            self._report([], draft_ms=0.0, verify_ms=0.0, total_ms=0.0, batched_tokens=0)

    def _traced_step(self) -> None:
        """`_step` inside its span: the parent is the oldest traced request's Generate span, the
        other requests in the batch are links (core/tracing.py says why)."""
        traces = [seq.handle.trace for seq in self._running.values() if hasattr(seq.handle, "trace")]
        traces += [handle.trace for handle, _ in self._waiting if hasattr(handle, "trace")]
        span = tracing.start_span("smartspec.engine.step", parent=traces[0] if traces else None,
                                  links=traces[1:MAX_STEP_LINKS + 1],
                                  attributes={"smartspec.step_index": self._step_index})
        try:
            with tracing.use_span(span):
                self._step(span)
        except Exception as exc:
            tracing.record_error(span, exc)
            raise
        finally:
            span.end()

    def _step(self, span: Any = None) -> None:
        step_start = self._clock()
        iteration_start = step_start if self._previous_step_end is None else self._previous_step_end
        decoding = [seq for seq in self._running.values() if not seq.prefilling]
        ks = self._speculation_lengths(decoding)
        prefill_work = self._admit_within_budget(ks, now=step_start)
        if prefill_work:   # admitted requests count as running before their first token streams
            self._publish_counts()

        draft_start = self._clock()
        proposals = self._forwards.propose(decoding, ks)
        draft_ms = (self._clock() - draft_start) * 1000.0

        # Verify (and prefill): the target's forwards.
        verify_start = self._clock()
        facts: list[RequestFacts] = []
        batched_tokens = 0
        if decoding:
            facts += self._forwards.verify(decoding, ks, proposals)
            batched_tokens += sum(len(proposals[s.request_id].tokens) + 1 for s in decoding)
        for group in group_by_length([chunk for _, chunk in prefill_work]):
            facts += self._forwards.prefill([prefill_work[i] for i in group])
        batched_tokens += sum(chunk for _, chunk in prefill_work)
        verify_ms = (self._clock() - verify_start) * 1000.0
        # total_ms: the whole loop iteration since the previous step's report (the planner's
        # observe/plan wait, admission, text streaming included), not only this method's body.
        self._previous_step_end = self._clock()
        if span is not None:   # before the report, so the controller's plan span follows the step's
            span.set_attributes({
                "smartspec.batch_size": len(facts), "smartspec.speculating_rows": sum(1 for k in ks.values() if k),
                "smartspec.batched_tokens": batched_tokens, "smartspec.prefill_rows": len(prefill_work),
                "smartspec.draft_ms": draft_ms, "smartspec.verify_ms": verify_ms,
                "smartspec.step_ms": (self._previous_step_end - step_start) * 1000.0})
        self._report(facts, draft_ms=draft_ms, verify_ms=verify_ms,
                     total_ms=(self._previous_step_end - iteration_start) * 1000.0, batched_tokens=batched_tokens)

    def _speculation_lengths(self, decoding: list[RunningRequest]) -> dict[str, int]:
        """Every decoding request's k: the planner's (fallback_k where it gave none), clamped to
        what the request can still use."""
        cfg = self.config
        queries = [SpeculationQuery(s.request_id, len(s.tokens)) for s in decoding]
        plan = self._ask_planner(queries) if queries else {}
        return {
            s.request_id: clamp_speculation(
                plan.get(s.request_id, cfg.fallback_k),
                max_k=cfg.max_k,
                context_tokens=len(s.tokens),
                capacity=self.context_window,
                tokens_left=s.request.max_tokens - s.generated,
            )
            for s in decoding
        }

    def _admit_within_budget(self, ks: dict[str, int], *, now: float) -> list[tuple[RunningRequest, int]]:
        """Chunked prefill within what decoding leaves of the token budget: admit queued requests
        into free slots, and return (request, prompt tokens this step) for every prefill row."""
        prefilling = [s for s in self._running.values() if s.prefilling]
        prefill = chunk_prefill(
            token_budget=self.config.token_budget,
            decode_tokens=sum(k + 1 for k in ks.values()),
            remaining_prompts=[len(s.request.prompt_ids) - s.cached for s in prefilling],
            waiting_prompts=[len(h.request.prompt_ids) for h, _ in self._waiting],
            free_slots=len(self._lifecycle.free_slots),
        )
        for _ in range(prefill.admitted):
            handle, queued_at = self._waiting.popleft()
            prefilling.append(self._lifecycle.admit(handle, queued_at, now))
        chunks = list(prefill.continuing) + list(prefill.new_chunks)
        return [(seq, chunk) for seq, chunk in zip(prefilling, chunks) if chunk > 0]

    def _report(self, facts: list[RequestFacts], *, draft_ms: float, verify_ms: float, total_ms: float,
                batched_tokens: int) -> None:
        step = StepFacts(
            step_index=self._step_index,
            requests=tuple(self._lifecycle.take_pending_finished() + facts),
            draft_ms=draft_ms,
            verify_ms=verify_ms,
            total_ms=total_ms,
            batched_tokens=batched_tokens,
            queued_requests=len(self._waiting),
        )
        self._step_index += 1
        decode_ks = [f.requested_tokens for f in facts if f.prefill_tokens == 0]
        self._publish_counts()
        if self.metrics is not None:
            self.metrics.observe_step(step, batch_size=len(facts), decode_ks=decode_ks,
                                      running=len(self._running), queued=len(self._waiting))
        try:
            self.planner.observe(step)
        except Exception:  # a planner bug costs its plans, never the requests
            log.exception("planner.observe failed at step %d", step.step_index)

    def _ask_planner(self, queries: list[SpeculationQuery]) -> dict[str, int]:
        try:
            return self.planner.plan(self._step_index, queries, len(self._waiting))
        except Exception:  # fall back to the static k for this step
            log.exception("planner.plan failed at step %d; using fallback_k", self._step_index)
            return {}

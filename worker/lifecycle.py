"""How requests hold the engine's slots and how they end (loop thread only).

A queued request is admitted into a free slot; each step appends its verified tokens (stopping
at EOS, max_tokens, the context window or a stop string, and streaming the settled text); it
ends finished, cancelled or failed, which frees its slot, releases the proposer's state for it
and hands its client the outcome. Requests that end between steps are reported with the next step.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from smartspec.worker.proposers import Proposer

from .running import RequestHandle, RunningRequest
from .sequence import FinishReason, GenerationFailed, GenerationOutcome, SpeculationCounters
from .steps import RequestFacts

log = logging.getLogger(__name__)


class RequestLifecycle:
    """The running requests by id, the free slots, and the requests ended since the last step."""

    def __init__(
        self,
        *,
        slots: int,
        proposer: Proposer,
        eos_ids: frozenset[int],
        context_window: int,
        decode: Callable[[list[int]], str],
        clock: Callable[[], float],
        release_id: Callable[[str], None],   # the id may be submitted again (the engine's duplicate check)
        metrics: Any = None,                  # smartspec.worker.metrics.WorkerMetrics or None
    ) -> None:
        self.proposer = proposer
        self.eos_ids = eos_ids
        self.context_window = context_window
        self.metrics = metrics
        self._decode = decode
        self._clock = clock
        self._release_id = release_id
        self.running: dict[str, RunningRequest] = {}
        self.free_slots = list(range(slots - 1, -1, -1))
        self.pending_finished: list[RequestFacts] = []   # cancelled or failed between steps, reported next step

    def admit(self, handle: RequestHandle, queued_at: float, now: float) -> RunningRequest:
        seq = RunningRequest.admit(handle, slot=self.free_slots.pop(), queued_at=queued_at, now=now,
                                   decode=self._decode)
        self.running[seq.request_id] = seq
        return seq

    def take_pending_finished(self) -> list[RequestFacts]:
        pending, self.pending_finished = self.pending_finished, []
        return pending

    def append(self, seq: RunningRequest, new_tokens: list[int]) -> bool:
        """Add verified tokens, stop at EOS / max_tokens / context window / stop strings.
        True when the request finished (its slot is free again)."""
        if seq.first_token_at is None:
            seq.first_token_at = self._clock()
        request = seq.request
        kept: list[int] = []
        reason = None
        for token in new_tokens:
            if token in self.eos_ids and not request.ignore_eos:
                reason = FinishReason.STOP
                break
            kept.append(token)
            seq.tokens.append(token)
            seq.generated += 1
            if seq.generated >= request.max_tokens or len(seq.tokens) >= self.context_window:
                reason = FinishReason.LENGTH
                break
        delta = seq.output.extend(kept)
        if seq.output.stopped:
            reason = FinishReason.STOP
        if delta.text or delta.token_ids:
            seq.handle._put(delta)
        if reason is not None:
            self.finish(seq, reason)
            return True
        return False

    def finish(self, seq: RunningRequest, reason: FinishReason) -> None:
        request_id = seq.request_id
        if not seq.output.stopped:
            tail = seq.output.flush()
            if tail.text or tail.token_ids:
                seq.handle._put(tail)
        del self.running[request_id]
        self.free_slots.append(seq.slot)
        self.proposer.release(request_id)
        now = self._clock()
        outcome = GenerationOutcome(
            request_id=request_id,
            text=seq.output.text,
            token_ids=tuple(seq.output.ids),
            finish_reason=reason,
            prompt_tokens=len(seq.request.prompt_ids),
            speculation=seq.stats,
            time_to_first_token_ms=((seq.first_token_at or now) - seq.submitted_at) * 1000.0,
            total_ms=(now - seq.submitted_at) * 1000.0,
            queue_ms=(seq.admitted_at - seq.submitted_at) * 1000.0,
        )
        self._end(request_id, outcome, seq.handle)

    def cancel(self, seq: RunningRequest) -> None:
        """A running request cancelled between steps: finished now, reported with the next step."""
        self.finish(seq, FinishReason.CANCELLED)
        self.pending_finished.append(RequestFacts.ended(seq.request_id, context_tokens=seq.context_tokens))

    def cancel_unstarted(self, handle: RequestHandle, queued_at: float) -> None:
        """A request cancelled while queued: it never held a slot, so nothing to report to a planner."""
        elapsed = (self._clock() - queued_at) * 1000.0
        outcome = GenerationOutcome(
            request_id=handle.request.request_id, text="", token_ids=(), finish_reason=FinishReason.CANCELLED,
            prompt_tokens=len(handle.request.prompt_ids), speculation=SpeculationCounters(),
            time_to_first_token_ms=elapsed, total_ms=elapsed, queue_ms=elapsed,
        )
        self._end(handle.request.request_id, outcome, handle)

    def fail_all(self, message: str) -> None:
        """A step failed (a bug or a device error): every running request ends with `message`."""
        for seq in list(self.running.values()):
            request_id = seq.request_id
            del self.running[request_id]
            self.free_slots.append(seq.slot)
            try:
                self.proposer.release(request_id)
            except Exception:  # keep failing the others
                log.exception("proposer.release failed")
            self._release_id(request_id)
            seq.handle._put(GenerationFailed(request_id, message))
            self.pending_finished.append(RequestFacts.ended(request_id, context_tokens=seq.context_tokens))

    def _end(self, request_id: str, outcome: GenerationOutcome, handle: RequestHandle) -> None:
        self._release_id(request_id)
        if self.metrics is not None:
            self.metrics.observe_finish(outcome)
        handle._put(outcome)

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
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from smartspec.worker.proposers import Proposal, ProposalRequest, Proposer, RowVerification, SamplingParams
from smartspec.worker.proposers.device_copy import to_device_without_sync
from smartspec.worker.proposers.verify import verify_packed

from .scheduler import clamp_speculation, group_by_length, plan_prefill
from .sequence import (
    FinishReason,
    GenerationFailed,
    GenerationOutcome,
    GenerationRequest,
    OutputText,
    SpeculationCounters,
    TokenDelta,
)
from .steps import PlanQuery, Planner, RequestFacts, StepFacts

log = logging.getLogger(__name__)


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


class RequestHandle:
    """The client side of one request: iterate its events (TokenDelta..., then one outcome)."""

    def __init__(self, request: GenerationRequest, submitted_at: float = 0.0) -> None:
        self.request = request
        self.submitted_at = submitted_at       # engine clock; queue and TTFT are measured from it
        self._events: queue.Queue = queue.Queue()

    def events(self, timeout: float | None = None) -> Iterator[TokenDelta | GenerationOutcome | GenerationFailed]:
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if not isinstance(event, TokenDelta):
                return

    def result(self, timeout: float | None = None) -> GenerationOutcome:
        """Wait for the end; raises RuntimeError if the engine failed the request."""
        for event in self.events(timeout):
            if isinstance(event, GenerationFailed):
                raise RuntimeError(event.message)
            if isinstance(event, GenerationOutcome):
                return event
        raise AssertionError("unreachable")

    def _put(self, event) -> None:
        self._events.put(event)


@dataclass
class _Running:
    """A request holding a slot. `tokens` = prompt + generated; the last one is not cached yet."""

    handle: RequestHandle
    slot: int
    generator: torch.Generator | None
    sampling: SamplingParams
    output: OutputText
    submitted_at: float
    admitted_at: float
    tokens: list[int] = field(default_factory=list)
    cached: int = 0                   # tokens whose K/V are in the slot (prefill progress, then decode)
    generated: int = 0
    first_token_at: float | None = None
    stats: SpeculationCounters = field(default_factory=SpeculationCounters)

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.request.prompt_ids)


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
        self._device = model.module.device
        self.eos_ids = eos_token_ids(model)
        # Fast tokenizers may take a mutable borrow inside encode ("Already borrowed" when two
        # threads meet): the server's encodes and the loop's decodes share this lock.
        self.tokenizer_lock = threading.Lock()
        self._decode = self._locked_decode

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[RequestHandle] = deque()       # submitted, not yet seen by the loop
        self._cancels: set[str] = set()
        self._known_ids: dict[str, RequestHandle] = {}    # queued or running (duplicate check)
        self._waiting: deque[tuple[RequestHandle, float]] = deque()   # loop-thread only
        self._running: dict[str, _Running] = {}           # loop-thread only
        self._free_slots = list(range(config.max_batch_size - 1, -1, -1))
        self._pending_finished: list[RequestFacts] = []   # cancelled between steps, reported next step
        self._step_index = 0
        # When the previous step's total_ms was taken (None after an idle wait): the next step's
        # total_ms starts here, so the report/plan wait and bookkeeping between steps count.
        self._previous_step_end: float | None = None
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._counts = EngineSnapshot(0, 0, 0)

    def _locked_decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.model.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- called from any thread -------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        handle = RequestHandle(request, self._clock())
        with self._lock:
            if not self._accepting:
                raise EngineStoppedError("the worker is shutting down")
            if request.request_id in self._known_ids:
                raise DuplicateRequestError(f"request_id {request.request_id!r} is already running")
            queued = len(self._inbox) + len(self._waiting)
            busy = len(self._running) + queued
            if busy >= self.config.max_batch_size + self.config.max_queue:
                raise QueueFullError(
                    f"{queued} requests are queued (max_queue {self.config.max_queue}) and all "
                    f"{self.config.max_batch_size} slots are busy"
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
            return EngineSnapshot(self._counts.running, self._counts.queued + len(self._inbox), self._counts.steps)

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
                self._step()
            except Exception as exc:  # a bug or device error: fail the batch, keep the worker alive
                log.exception("engine step failed")
                self._fail_all(f"engine step failed: {exc}")

    def _apply_cancels(self, cancels: set[str]) -> None:
        if not cancels:
            return
        kept = deque()
        for handle, queued_at in self._waiting:
            if handle.request.request_id in cancels:
                self._finish_unstarted(handle, queued_at)
            else:
                kept.append((handle, queued_at))
        self._waiting = kept
        for request_id in cancels:
            seq = self._running.get(request_id)
            if seq is not None:
                self._finish(seq, FinishReason.CANCELLED)
                self._pending_finished.append(self._facts(seq, 0, 0, 0, 0, 0, finished=True))

    def _publish_counts(self) -> None:
        """What GetWorkerInfo reads (the loop's own structures are not shared)."""
        with self._lock:
            self._counts = EngineSnapshot(len(self._running), len(self._waiting), self._step_index)

    def _flush_idle_report(self) -> None:
        """Cancellations with nothing else to run still tell the planner those requests ended."""
        if self._pending_finished:
            self._report([], 0.0, 0.0, 0.0, 0)

    def _step(self) -> None:
        step_start = self._clock()
        iteration_start = step_start if self._previous_step_end is None else self._previous_step_end
        cfg = self.config
        decoding = [seq for seq in self._running.values() if not seq.prefilling]
        queries = [PlanQuery(s.request.request_id, len(s.tokens)) for s in decoding]
        plan = self._ask_planner(queries) if queries else {}
        ks = {
            s.request.request_id: clamp_speculation(
                plan.get(s.request.request_id, cfg.fallback_k),
                max_k=cfg.max_k,
                context_tokens=len(s.tokens),
                capacity=self.context_window,
                tokens_left=s.request.max_tokens - s.generated,
            )
            for s in decoding
        }

        # Admission: chunked prefill within what decoding leaves of the token budget.
        prefilling = [s for s in self._running.values() if s.prefilling]
        prefill = plan_prefill(
            token_budget=cfg.token_budget,
            decode_tokens=sum(k + 1 for k in ks.values()),
            remaining_prompts=[len(s.request.prompt_ids) - s.cached for s in prefilling],
            waiting_prompts=[len(h.request.prompt_ids) for h, _ in self._waiting],
            free_slots=len(self._free_slots),
        )
        for _ in range(prefill.admitted):
            handle, queued_at = self._waiting.popleft()
            prefilling.append(self._admit(handle, queued_at, step_start))
        chunks = list(prefill.continuing) + list(prefill.new_chunks)

        # Draft.
        draft_start = self._clock()
        proposals = self._propose(decoding, ks)
        draft_ms = (self._clock() - draft_start) * 1000.0

        # Verify (and prefill): the target's forwards.
        verify_start = self._clock()
        facts: list[RequestFacts] = []
        batched_tokens = 0
        if decoding:
            facts += self._verify(decoding, ks, proposals)
            batched_tokens += sum(len(proposals[s.request.request_id].tokens) + 1 for s in decoding)
        work = [(seq, chunk) for seq, chunk in zip(prefilling, chunks) if chunk > 0]
        for group in group_by_length([chunk for _, chunk in work]):
            facts += self._prefill([work[i] for i in group])
        batched_tokens += sum(chunk for _, chunk in work)
        verify_ms = (self._clock() - verify_start) * 1000.0
        # total_ms: the whole loop iteration since the previous step's report (the planner's
        # observe/plan wait, admission, text streaming included), not only this method's body.
        self._previous_step_end = self._clock()
        self._report(facts, draft_ms, verify_ms, (self._previous_step_end - iteration_start) * 1000.0, batched_tokens)

    def _report(self, facts: list[RequestFacts], draft_ms: float, verify_ms: float, total_ms: float,
                batched_tokens: int) -> None:
        step = StepFacts(
            step_index=self._step_index,
            requests=tuple(self._pending_finished + facts),
            draft_ms=draft_ms,
            verify_ms=verify_ms,
            total_ms=total_ms,
            batched_tokens=batched_tokens,
            queued_requests=len(self._waiting),
        )
        self._pending_finished = []
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

    def _ask_planner(self, queries: list[PlanQuery]) -> dict[str, int]:
        try:
            return self.planner.plan(self._step_index, queries, len(self._waiting))
        except Exception:  # fall back to the static k for this step
            log.exception("planner.plan failed at step %d; using fallback_k", self._step_index)
            return {}

    def _admit(self, handle: RequestHandle, queued_at: float, now: float) -> _Running:
        request = handle.request
        sampling = SamplingParams(request.temperature, request.top_p, request.top_k)
        generator = None
        if not sampling.is_greedy:
            # A CPU generator on every device: the same seed gives the same draws on CPU and GPU
            # (the verify and sampling functions move what they draw to the logits' device).
            generator = torch.Generator()
            generator.manual_seed(request.seed if request.seed is not None else random.getrandbits(63))
        seq = _Running(
            handle=handle,
            slot=self._free_slots.pop(),
            generator=generator,
            sampling=sampling,
            output=OutputText(self._decode, request.stop),
            submitted_at=queued_at,
            admitted_at=now,
            tokens=list(request.prompt_ids),
        )
        self._running[request.request_id] = seq
        return seq

    def _propose(self, decoding: list[_Running], ks: dict[str, int]) -> dict[str, Proposal]:
        asks = [
            ProposalRequest(s.request.request_id, list(s.tokens), ks[s.request.request_id], s.sampling, s.generator)
            for s in decoding
            if ks[s.request.request_id] > 0
        ]
        answers = self.proposer.propose(asks) if asks else []
        proposals = {s.request.request_id: Proposal([]) for s in decoding}
        for ask, answer in zip(asks, answers):
            if len(answer.tokens) > ask.k:
                raise RuntimeError(f"proposer returned {len(answer.tokens)} tokens for k = {ask.k}")
            proposals[ask.seq_id] = answer
        return proposals

    def _verify(self, decoding: list[_Running], ks: dict[str, int], proposals: dict[str, Proposal]) -> list[RequestFacts]:
        rows = sorted(decoding, key=lambda s: s.slot)   # consecutive slots let the cache read a slice
        row_tokens = [[s.tokens[-1]] + proposals[s.request.request_id].tokens for s in rows]
        width = max(len(t) for t in row_tokens)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)                  # [B, S] right-padded
        for i, tokens in enumerate(row_tokens):
            input_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        lengths = [len(t) for t in row_tokens]
        logits = self.model.module.forward_step(
            self.cache,
            input_ids.to(self._device),
            torch.tensor([s.slot for s in rows], dtype=torch.long),                     # slots: [B]
            torch.tensor([s.cached for s in rows], dtype=torch.long),                   # start_positions: [B]
            torch.tensor(lengths, dtype=torch.long),                                    # query_lengths: [B]
            logits_rows="packed",   # only real tokens reach the lm_head: no row pays for the widest k
        )                                                                               # logits: [N, V]
        # Every row at once, straight from the packed logits: one host sync for the whole step.
        verdicts = verify_packed(
            logits,
            [proposals[s.request.request_id] for s in rows],
            [s.sampling for s in rows],
            [s.generator for s in rows],
        )
        facts = []
        for seq, verdict in zip(rows, verdicts):
            request_id = seq.request.request_id
            proposed = len(proposals[request_id].tokens)
            # K/V now valid for the last token and the accepted proposals; the rest is rolled back.
            seq.cached += 1 + verdict.num_accepted
            seq.stats.observe(ks[request_id], proposed, verdict.num_accepted)
            finished = self._append(seq, verdict.tokens)
            facts.append(self._facts(seq, ks[request_id], proposed, verdict.num_accepted,
                                     verdict.tested_positions, 0, finished=finished))
        return facts

    def _prefill(self, work: list[tuple[_Running, int]]) -> list[RequestFacts]:
        """One forward over prompt chunks of similar length (right-padded, one row each)."""
        width = max(chunk for _, chunk in work)
        input_ids = torch.zeros((len(work), width), dtype=torch.long)                   # [B, C] right-padded
        for row, (seq, chunk) in enumerate(work):
            prompt = seq.request.prompt_ids
            input_ids[row, :chunk] = torch.tensor(prompt[seq.cached : seq.cached + chunk], dtype=torch.long)
        logits = self.model.module.forward_step(
            self.cache,
            input_ids.to(self._device),
            torch.tensor([seq.slot for seq, _ in work], dtype=torch.long),             # slots: [B]
            torch.tensor([seq.cached for seq, _ in work], dtype=torch.long),           # start_positions: [B]
            torch.tensor([chunk for _, chunk in work], dtype=torch.long),              # query_lengths: [B]
            logits_rows="last",
        )                                                                               # logits: [B, 1, V]
        for seq, chunk in work:
            seq.cached += chunk
        verdicts = self._first_tokens([seq for seq, _ in work], logits[:, 0])
        facts = []
        for row, (seq, chunk) in enumerate(work):
            finished = self._append(seq, verdicts[row].tokens) if row in verdicts else False
            facts.append(self._facts(seq, 0, 0, 0, 0, chunk, finished=finished))
        return facts

    def _first_tokens(self, rows: list[_Running], last_logits: torch.Tensor) -> dict[int, RowVerification]:
        """The first token of every row whose prompt is now in (by row index), from the target's
        prediction at the prompt's last position (last_logits: [B, V]): one verify_packed call with
        n = 0 proposals each. Rows still prefilling draw nothing, so a seeded request's draws do not
        depend on how its prompt was chunked."""
        done = [row for row, seq in enumerate(rows) if not seq.prefilling]
        if not done:
            return {}
        if len(done) < len(rows):
            index = to_device_without_sync(torch.tensor(done, dtype=torch.long), last_logits.device)
            last_logits = last_logits.index_select(0, index)                            # [len(done), V]
        verdicts = verify_packed(
            last_logits,
            [Proposal([]) for _ in done],
            [rows[row].sampling for row in done],
            [rows[row].generator for row in done],
        )
        return dict(zip(done, verdicts))

    def _append(self, seq: _Running, new_tokens: list[int]) -> bool:
        """Add verified tokens, stop at EOS / max_tokens / context window / stop strings."""
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
            self._finish(seq, reason)
            return True
        return False

    def _finish(self, seq: _Running, reason: FinishReason) -> None:
        request_id = seq.request.request_id
        if not seq.output.stopped:
            tail = seq.output.flush()
            if tail.text or tail.token_ids:
                seq.handle._put(tail)
        del self._running[request_id]
        self._free_slots.append(seq.slot)
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
        self._release_id(request_id)
        if self.metrics is not None:
            self.metrics.observe_finish(outcome)
        seq.handle._put(outcome)

    def _finish_unstarted(self, handle: RequestHandle, queued_at: float) -> None:
        now = self._clock()
        elapsed = (now - queued_at) * 1000.0
        outcome = GenerationOutcome(
            request_id=handle.request.request_id, text="", token_ids=(), finish_reason=FinishReason.CANCELLED,
            prompt_tokens=len(handle.request.prompt_ids), speculation=SpeculationCounters(),
            time_to_first_token_ms=elapsed, total_ms=elapsed, queue_ms=elapsed,
        )
        self._release_id(handle.request.request_id)
        if self.metrics is not None:
            self.metrics.observe_finish(outcome)
        handle._put(outcome)

    def _release_id(self, request_id: str) -> None:
        with self._lock:
            self._known_ids.pop(request_id, None)
            self._cancels.discard(request_id)

    def _fail_all(self, message: str) -> None:
        for seq in list(self._running.values()):
            request_id = seq.request.request_id
            del self._running[request_id]
            self._free_slots.append(seq.slot)
            try:
                self.proposer.release(request_id)
            except Exception:  # keep failing the others
                log.exception("proposer.release failed")
            self._release_id(request_id)
            seq.handle._put(GenerationFailed(request_id, message))
            self._pending_finished.append(self._facts(seq, 0, 0, 0, 0, 0, finished=True))

    def _facts(self, seq: _Running, k: int, proposed: int, accepted: int, tested: int, prefill: int,
               *, finished: bool) -> RequestFacts:
        proposable = None
        if not finished and not seq.prefilling:  # it decodes next step: can the proposer tell what it has?
            proposable = self.proposer.lookahead(seq.request.request_id, seq.tokens, self.config.max_k)
        return RequestFacts(
            request_id=seq.request.request_id,
            proposed_tokens=proposed,
            accepted_tokens=accepted,
            tested_positions=tested,
            context_tokens=seq.cached if seq.prefilling else len(seq.tokens),
            prefill_tokens=prefill,
            finished=finished,
            requested_tokens=k,
            proposable_tokens=proposable,
        )


def context_window(model: Any, limit: int) -> int:
    """Tokens per slot: the configured limit, capped by the model's position embeddings."""
    model_max = getattr(model.module.config, "max_position_embeddings", None) or limit
    return min(limit, int(model_max))


def eos_token_ids(model: Any) -> frozenset[int]:
    """End-of-sequence ids from the model config and the tokenizer (chat models often have two)."""
    ids: set[int] = set()
    configured = getattr(model.module.config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    tokenizer_eos = getattr(model.tokenizer, "eos_token_id", None)
    if tokenizer_eos is not None:
        ids.add(int(tokenizer_eos))
    return frozenset(ids)

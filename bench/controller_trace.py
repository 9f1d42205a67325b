"""Realistic worker step reports for load-testing a controller, built once and replayed as bytes.

A trace is what one worker at batch B would report step after step under continuous batching:
every slot holds a request; a request joins with its prompt prefilled (no proposals), then decodes
with prompt lookup (proposals asked for, fewer offered when the look-ahead found a shorter match,
a prefix of them accepted at the request's own rate), and finishes after its output length, when
a new request takes its slot. Step times follow a GPU-like cost (a fixed part plus a part per
batched token), with noise.

Why the reports do not depend on the controller's answers: the load generator must spend as
little CPU as possible (it shares the machine with the controller under test), so every report is
serialised once, and replaying it costs a few byte copies. The controller sees the same stream
whatever it plans, which also makes runs comparable. The k a report says was asked for follows a
simple rule of thumb (more for requests that accept more), not the plan.

The last step of a trace reports every request still running as finished, so a trace replayed in
a loop looks like a worker draining and refilling every `len(trace)` steps, and nothing the
controller keeps per request outlives a lap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from smartspec.core.acceptance import positions_tested
from smartspec.v1 import common_pb2, controller_pb2


@dataclass(frozen=True)
class TraceStep:
    """One report, serialised without its step_index (added when it is sent)."""

    body: bytes           # StepReport fields 2.. (step_index is field 1)
    requests: int         # outcomes in the report
    unfinished: int       # outcomes not finished: the plan must carry exactly this many entries


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def worker_message(step_index: int, step: TraceStep) -> bytes:
    """The WorkerMessage{report} bytes for `step` sent as `step_index` (fields may be concatenated)."""
    report = b"\x08" + varint(step_index) + step.body
    return b"\x12" + varint(len(report)) + report


def hello_message(worker_id: str, batch: int, max_k: int, cost_profile_id: str = "") -> bytes:
    hello = controller_pb2.WorkerHello(
        worker_id=worker_id, proposer_kind=common_pb2.PROPOSER_KIND_NGRAM, max_speculation_length=max_k,
        max_batch_size=max(1, batch), cost_profile_id=cost_profile_id, model="simulated", proposer="ngram",
        device="loadtest",
    )
    return controller_pb2.WorkerMessage(hello=hello).SerializeToString()


@dataclass
class _Request:
    request_id: str
    context: int           # tokens in the context
    remaining: int         # output tokens still to generate
    acceptance: float      # chance each offered proposal is accepted
    usual_k: int           # what this request is usually asked for
    proposable: int        # what the look-ahead says the proposer offers next step
    prefilled: bool = False


def _new_request(rng: random.Random, serial: int, max_k: int) -> _Request:
    acceptance = rng.betavariate(2.0, 2.0)
    usual_k = max(1, min(max_k, round(acceptance * max_k)))
    return _Request(request_id=f"req-{serial:07d}", context=rng.randint(64, 2048), remaining=rng.randint(32, 512),
                    acceptance=acceptance, usual_k=usual_k, proposable=0)


def _look_ahead(rng: random.Random, max_k: int) -> int:
    """Prompt lookup finds a match about 60% of the time; its continuation is 1..max_k tokens."""
    return rng.randint(1, max_k) if rng.random() < 0.6 else 0


def build_trace(batch: int, steps: int = 512, *, max_k: int = 8, seed: int = 0) -> list[TraceStep]:
    """`steps` consecutive reports of a worker with `batch` slots, all busy (see the module doc)."""
    if batch < 1 or steps < 2:
        raise ValueError(f"need batch >= 1 and steps >= 2, got {batch}, {steps}")
    rng = random.Random(seed)
    serial = 0
    running: list[_Request] = []
    trace = []
    for step in range(steps):
        while len(running) < batch:
            running.append(_new_request(rng, serial, max_k))
            serial += 1
        last = step == steps - 1
        outcomes, batched, kept = [], 0, []
        for req in running:
            if not req.prefilled:
                prompt = req.context
                req.prefilled = True
                req.context += 1
                req.remaining -= 1
                req.proposable = _look_ahead(rng, max_k)
                outcome = controller_pb2.RequestOutcome(
                    request_id=req.request_id, context_tokens=req.context, prefill_tokens=prompt,
                    proposable_tokens=req.proposable)
                batched += prompt
            else:
                requested = 0 if rng.random() < 0.1 else req.usual_k
                proposed = min(requested, req.proposable)
                accepted = 0
                while accepted < proposed and rng.random() < req.acceptance:
                    accepted += 1
                tested = positions_tested(proposed, accepted)
                req.context += accepted + 1
                req.remaining -= accepted + 1
                req.proposable = _look_ahead(rng, max_k)
                outcome = controller_pb2.RequestOutcome(
                    request_id=req.request_id, proposed_tokens=proposed, accepted_tokens=accepted,
                    tested_positions=tested, context_tokens=req.context, requested_tokens=requested,
                    proposable_tokens=req.proposable)
                batched += proposed + 1
            if req.remaining <= 0 or last:
                outcome.finished = True
                outcome.ClearField("proposable_tokens")
            else:
                kept.append(req)
            outcomes.append(outcome)
        running = kept
        verify_ms = 18.0 + 0.012 * batched + rng.gauss(0.0, 0.3)
        draft_ms = 0.2 + 0.001 * len(outcomes)
        report = controller_pb2.StepReport(
            requests=outcomes, draft_ms=draft_ms, verify_ms=max(0.1, verify_ms),
            total_ms=draft_ms + max(0.1, verify_ms) + 1.5, batched_tokens=batched,
            queued_requests=rng.randint(0, 4))
        trace.append(TraceStep(body=report.SerializeToString(), requests=len(outcomes),
                               unfinished=sum(1 for o in outcomes if not o.finished)))
    return trace

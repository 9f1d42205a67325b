"""Simulated worker streams against real controllers: round trip, decision time and steps per second.

Each simulated worker opens a real `Controller.Connect` stream, says hello, and replays a trace of
realistic step reports (`controller_trace`), pre-serialised so that the load generator's own CPU
stays small. Two ways to send:

- closed loop (`rate=0`): the next report goes as soon as the previous plan is back, so the streams
  together find the most steps per second the controllers serve;
- paced (`rate=R`): every stream sends a report every 1/R s whether or not its plan is back, as a
  worker planning one step ahead does (StepPlan.basis): the round trip then only matters when it
  exceeds a step. Streams are spread evenly over the period (workers do not step in lock step).

Round trip = report handed to gRPC -> its plan parsed, on this process's clock. Every plan is checked
against its report (same step_index, in order, one entry per unfinished request, no error), so a
point's counts must add up: answered == sent and no mismatches.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import grpc
import numpy as np

from smartspec.bench.controller_trace import TraceStep, build_trace, hello_message, worker_message
from smartspec.v1 import controller_pb2

CONNECT_METHOD = "/smartspec.v1.Controller/Connect"


@dataclass
class StreamResult:
    """One simulated worker's stream: what it sent, what came back, and the timings."""

    worker_id: str
    address: str
    sent: int = 0
    answered: int = 0
    out_of_order: int = 0          # a plan whose step_index is not the next one expected
    wrong_count: int = 0           # a plan whose entries do not match the report's unfinished requests
    errors: int = 0                # plans carrying an error
    degraded: int = 0              # plans made without Redis
    rtt_ms: list[float] = field(default_factory=list)
    decision_ms: list[float] = field(default_factory=list)
    failure: str = ""              # the stream broke (gRPC error), if it did


@dataclass
class PointResult:
    """One (batch, streams, replicas, rate) point."""

    batch: int
    streams: int
    replicas: int
    rate: float                    # steps/s per stream; 0 = closed loop
    duration_s: float
    step_ms: float                 # a round trip longer than this would stall a worker planning ahead
    results: list[StreamResult]
    controller_cpu_s: float | None = None   # CPU time the controller processes spent during the point
    loadgen_cpu_s: float = 0.0              # CPU time this process (the simulated workers) spent

    @property
    def sent(self) -> int:
        return sum(r.sent for r in self.results)

    @property
    def answered(self) -> int:
        return sum(r.answered for r in self.results)

    @property
    def mismatches(self) -> int:
        return sum(r.out_of_order + r.wrong_count + r.errors for r in self.results)

    @property
    def failures(self) -> list[str]:
        return [f"{r.worker_id}: {r.failure}" for r in self.results if r.failure]

    @property
    def steps_per_s(self) -> float:
        return self.answered / self.duration_s if self.duration_s > 0 else 0.0

    def _all(self, name: str) -> np.ndarray:
        return np.array([x for r in self.results for x in getattr(r, name)], dtype=np.float64)

    def rtt_percentile(self, q: float) -> float:
        values = self._all("rtt_ms")
        return float(np.percentile(values, q)) if values.size else float("nan")

    def decision_percentile(self, q: float) -> float:
        values = self._all("decision_ms")
        return float(np.percentile(values, q)) if values.size else float("nan")

    @property
    def late_fraction(self) -> float:
        """Share of round trips longer than one step (`step_ms`)."""
        values = self._all("rtt_ms")
        return float((values > self.step_ms).mean()) if values.size else 0.0

    @property
    def cpu_ms_per_step(self) -> float | None:
        """Controller CPU (all replicas, all threads) per answered step: ms of CPU per decision as served."""
        if self.controller_cpu_s is None or not self.answered:
            return None
        return self.controller_cpu_s * 1000.0 / self.answered

    def summary(self) -> dict:
        return {
            "batch": self.batch, "streams": self.streams, "replicas": self.replicas, "rate": self.rate,
            "duration_s": round(self.duration_s, 3), "sent": self.sent, "answered": self.answered,
            "mismatches": self.mismatches, "degraded": sum(r.degraded for r in self.results),
            "failures": self.failures, "steps_per_s": round(self.steps_per_s, 1),
            "rtt_p50_ms": round(self.rtt_percentile(50), 3), "rtt_p99_ms": round(self.rtt_percentile(99), 3),
            "decision_p50_ms": round(self.decision_percentile(50), 3),
            "decision_p99_ms": round(self.decision_percentile(99), 3),
            "late_fraction": round(self.late_fraction, 4), "step_ms": self.step_ms,
            "cpu_ms_per_step": None if self.cpu_ms_per_step is None else round(self.cpu_ms_per_step, 3),
            "loadgen_cpu_ms_per_step": round(self.loadgen_cpu_s * 1000.0 / self.answered, 3) if self.answered else None,
        }


class _Stream:
    """One simulated worker's Connect stream; `run` blocks until `stop_at` (perf_counter seconds)."""

    def __init__(self, channel: grpc.Channel, address: str, worker_id: str, trace: Sequence[TraceStep],
                 batch: int, max_k: int, cost_profile_id: str, timeout_s: float) -> None:
        self._connect = channel.stream_stream(CONNECT_METHOD, request_serializer=None,  # bytes as they are
                                              response_deserializer=controller_pb2.StepPlan.FromString)
        self._trace = trace
        self._hello = hello_message(worker_id, batch, max_k, cost_profile_id)
        self._timeout_s = timeout_s
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sent_at: dict[int, float] = {}
        self.result = StreamResult(worker_id=worker_id, address=address)

    def _messages(self):
        yield self._hello
        while True:
            message = self._outbox.get()
            if message is None:
                return
            yield message

    def _send(self, step_index: int) -> None:
        step = self._trace[step_index % len(self._trace)]
        message = worker_message(step_index, step)
        self._sent_at[step_index] = time.perf_counter()
        self._outbox.put(message)
        self.result.sent += 1

    def _check(self, plan: controller_pb2.StepPlan, expected: int) -> None:
        arrived = time.perf_counter()
        result = self.result
        result.answered += 1
        if plan.step_index != expected:
            result.out_of_order += 1
        sent = self._sent_at.pop(plan.step_index, None)
        if sent is not None:
            result.rtt_ms.append((arrived - sent) * 1000.0)
        if plan.HasField("error"):
            result.errors += 1
        elif len(plan.requests) != self._trace[plan.step_index % len(self._trace)].unfinished:
            result.wrong_count += 1
        result.degraded += plan.degraded
        result.decision_ms.append(plan.decision_ms)

    def run_closed_loop(self, stop_at: float) -> None:
        responses = self._connect(self._messages(), timeout=self._timeout_s)
        try:
            for step_index in itertools.count():
                if time.perf_counter() >= stop_at:
                    break
                self._send(step_index)
                self._check(next(responses), step_index)
            self._outbox.put(None)  # half-close; the controller ends the stream after its last write
            for plan in responses:  # none expected: every report was answered
                self._check(plan, -1)
        except (grpc.RpcError, StopIteration) as exc:
            self.result.failure = _describe(exc)
            responses.cancel()
        finally:
            self._outbox.put(None)

    def run_paced(self, stop_at: float, rate: float, phase: float = 0.0) -> None:
        responses = self._connect(self._messages(), timeout=self._timeout_s)
        sender = threading.Thread(target=self._send_paced, args=(stop_at, rate, phase), daemon=True)
        sender.start()
        try:
            for expected, plan in zip(itertools.count(), responses):
                self._check(plan, expected)
        except grpc.RpcError as exc:
            self.result.failure = _describe(exc)
        finally:
            sender.join()

    def _send_paced(self, stop_at: float, rate: float, phase: float) -> None:
        """One report every 1/rate s, the first `phase` periods in (workers are not in lock step)."""
        start = time.perf_counter()
        period = 1.0 / rate
        try:
            for step_index in itertools.count():
                due = start + (phase + step_index) * period
                if due >= stop_at:
                    break
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                self._send(step_index)
        finally:
            self._outbox.put(None)  # half-close: the controller answers what it has, then ends the stream


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return "stream ended early"


def run_point(addresses: Sequence[str], *, batch: int, streams: int, duration_s: float, rate: float = 0.0,
              step_ms: float = 25.0, max_k: int = 8, trace: Sequence[TraceStep] | None = None,
              worker_prefix: str = "load", shared_cost_profile: bool = True,
              cpu_clock=None, timeout_s: float = 600.0) -> PointResult:
    """`streams` simulated workers spread round-robin over `addresses` for `duration_s` seconds.

    shared_cost_profile: all streams share one cost profile (a fleet of identical workers), else each
    has its own. cpu_clock: a callable giving the controllers' CPU seconds so far (None: not measured).
    """
    trace = trace if trace is not None else build_trace(batch, max_k=max_k)
    channels = [grpc.insecure_channel(address) for address in addresses]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=30)
        profile = f"{worker_prefix}-profile" if shared_cost_profile else ""
        workers = [
            _Stream(channels[i % len(channels)], addresses[i % len(addresses)], f"{worker_prefix}-{i}", trace,
                    batch, max_k, profile, timeout_s)
            for i in range(streams)
        ]
        cpu_before = cpu_clock() if cpu_clock else None
        own_before = _own_cpu_s()
        start = time.perf_counter()
        stop_at = start + duration_s
        threads = [
            threading.Thread(target=w.run_paced if rate > 0 else w.run_closed_loop,
                             args=(stop_at, rate, i / streams) if rate > 0 else (stop_at,), daemon=True)
            for i, w in enumerate(workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        cpu = (cpu_clock() - cpu_before) if cpu_clock else None
        own = _own_cpu_s() - own_before
    finally:
        for channel in channels:
            channel.close()
    return PointResult(batch=batch, streams=streams, replicas=len(addresses), rate=rate, duration_s=elapsed,
                       step_ms=step_ms, results=[w.result for w in workers], controller_cpu_s=cpu,
                       loadgen_cpu_s=own)


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def markdown_table(points: Sequence[PointResult]) -> str:
    """One row per point: the figures BENCHMARKS.md quotes."""
    lines = [
        "| replicas | streams | batch | rate/stream | steps/s | RTT p50 ms | RTT p99 ms | RTT > step | "
        "decision p50 ms | decision p99 ms | controller CPU ms/step | answered/sent |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        cpu = "-" if p.cpu_ms_per_step is None else f"{p.cpu_ms_per_step:.2f}"
        rate = "max" if p.rate <= 0 else f"{p.rate:g}"
        lines.append(
            f"| {p.replicas} | {p.streams} | {p.batch} | {rate} | {p.steps_per_s:.0f} | "
            f"{p.rtt_percentile(50):.2f} | {p.rtt_percentile(99):.2f} | {100 * p.late_fraction:.1f}% | "
            f"{p.decision_percentile(50):.2f} | {p.decision_percentile(99):.2f} | {cpu} | "
            f"{p.answered}/{p.sent} |"
        )
    return "\n".join(lines)

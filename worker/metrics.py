"""Prometheus metrics of one worker, on a registry of its own (several workers can share a process).

Counters are raw (proposed and accepted per draft position, not rates), so any rate or
acceptance curve can be derived in PromQL over any window.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .sequence import GenerationOutcome
from .steps import StepFacts

_STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)


class WorkerMetrics:
    def __init__(self, max_k: int, max_batch_size: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("smartspec_worker_requests", "Finished requests.", ["finish_reason"], registry=r)
        self.generated_tokens = Counter("smartspec_worker_generated_tokens", "Completion tokens returned.", registry=r)
        self.steps = Counter("smartspec_worker_steps", "Engine steps run.", registry=r)
        self.proposed = Counter("smartspec_worker_proposed_tokens",
                                "Proposed tokens by draft position (1 = first proposal).", ["position"], registry=r)
        self.accepted = Counter("smartspec_worker_accepted_tokens",
                                "Accepted proposals by draft position.", ["position"], registry=r)
        self.chosen_k = Histogram("smartspec_worker_speculation_length", "k run per request per decode step.",
                                  buckets=tuple(range(0, max_k + 1)), registry=r)
        self.step_seconds = Histogram("smartspec_worker_step_seconds", "Step time by phase.", ["phase"],
                                      buckets=_STEP_BUCKETS_S, registry=r)
        self.batch_size = Histogram("smartspec_worker_batch_size", "Requests in a step.",
                                    buckets=_batch_buckets(max_batch_size), registry=r)
        self.fallbacks = Counter("smartspec_worker_fallback_steps",
                                 "Steps planned locally because the controller's plan was late or missing.",
                                 registry=r)
        self.plan_wait = Histogram("smartspec_worker_plan_wait_seconds",
                                   "Time a step waited for the controller's plan (bounded by the deadline).",
                                   buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5), registry=r)
        self.plan_age = Counter("smartspec_worker_plans_by_age",
                                "Steps planned from a controller plan, by how many reports behind it was "
                                "(0 = it answered the step just reported, 1 = the one before).",
                                ["age"], registry=r)
        self.backed_off = Gauge("smartspec_worker_speculation_backed_off",
                                "1 while the goodput guard holds speculation off for batches from this "
                                "size up to twice it (speculative steps measured slower than plain ones).",
                                ["batch_from"], registry=r)
        self.controller_connected = Gauge("smartspec_worker_controller_connected",
                                          "1 while the controller stream is open.", registry=r)
        self.queue_depth = Gauge("smartspec_worker_queued_requests", "Requests waiting for a slot.", registry=r)
        self.running = Gauge("smartspec_worker_running_requests", "Requests holding a slot.", registry=r)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose /metrics on `port` until `close()`."""
        self._http = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if isinstance(http, tuple):          # prometheus_client >= 0.20 returns (server, thread)
            http[0].shutdown()
            http[0].server_close()
        self._http = None

    def observe_step(self, step: StepFacts, *, batch_size: int, decode_ks: list[int], running: int,
                     queued: int) -> None:
        self.steps.inc()
        self.step_seconds.labels("draft").observe(step.draft_ms / 1000.0)
        self.step_seconds.labels("verify").observe(step.verify_ms / 1000.0)
        self.step_seconds.labels("total").observe(step.total_ms / 1000.0)
        self.batch_size.observe(batch_size)
        for k in decode_ks:
            self.chosen_k.observe(k)
        for outcome in step.requests:
            for position in range(1, outcome.proposed_tokens + 1):
                self.proposed.labels(str(position)).inc()
            for position in range(1, outcome.accepted_tokens + 1):
                self.accepted.labels(str(position)).inc()
        self.queue_depth.set(queued)
        self.running.set(running)

    def observe_finish(self, outcome: GenerationOutcome) -> None:
        self.requests.labels(outcome.finish_reason.value).inc()
        self.generated_tokens.inc(outcome.completion_tokens)

    def observe_plan_wait(self, waited_ms: float) -> None:
        self.plan_wait.observe(waited_ms / 1000.0)

    def observe_plan_age(self, age_steps: int) -> None:
        self.plan_age.labels(str(max(0, age_steps))).inc()

    def set_backed_off(self, batch_from: str, backed_off: bool) -> None:
        self.backed_off.labels(batch_from).set(1 if backed_off else 0)

    def observe_fallback(self) -> None:
        self.fallbacks.inc()

    def set_controller_connected(self, connected: bool) -> None:
        self.controller_connected.set(1 if connected else 0)


def _batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(float(size))
        size *= 2
    buckets.append(float(max_batch_size))
    return tuple(buckets)

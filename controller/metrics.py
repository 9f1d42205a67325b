"""Prometheus metrics of one controller server (own CollectorRegistry: several servers per process).

Raw counters and histograms only; ratios (acceptance rate, prediction error) are PromQL's job.
"""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250)
_STEP_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_GOODPUT_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class SmallIntHistogram:
    """A Prometheus histogram of small non-negative integers with one bucket per value, observed a
    batch at a time: a step's 256 ks are one bincount, not 256 `Histogram.observe` calls."""

    def __init__(self, name: str, documentation: str, max_bucket: int, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._counts = np.zeros(max_bucket + 2, dtype=np.int64)  # values 0..max_bucket, then the rest
        self._sum = 0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values) -> None:
        values = np.asarray(values, dtype=np.int64)  # [N]
        if not values.size:
            return
        last = self._counts.size - 1
        counts = np.bincount(np.clip(values, 0, last), minlength=self._counts.size)
        with self._lock:
            self._counts += counts
            self._sum += int(values.sum())

    def describe(self):
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self):
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        buckets = [(floatToGoString(value), count) for value, count in enumerate(cumulative[:-1])]
        buckets.append(("+Inf", cumulative[-1]))
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], buckets, total)
        yield family


class ControllerMetrics:
    """Every metric the controller exports, bound to one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.steps = Counter("smartspec_controller_steps", "Step reports planned", ["policy"], registry=r)
        self.rejected_reports = Counter(
            "smartspec_controller_rejected_reports", "Reports answered with an error", ["field"], registry=r
        )
        self.decision_ms = Histogram(
            "smartspec_controller_decision_ms",
            "Time to plan one step (ms): its Redis read included, its write (after the reply) not",
            buckets=_LATENCY_BUCKETS_MS, registry=r,
        )
        self.chosen_k = SmallIntHistogram(
            "smartspec_controller_chosen_k", "Speculation length chosen per request-step", 16, r)
        self.proposed_tokens = Counter("smartspec_controller_proposed_tokens", "Tokens proposed (reported)",
                                       registry=r)
        self.accepted_tokens = Counter("smartspec_controller_accepted_tokens", "Tokens accepted (reported)",
                                       registry=r)
        self.predicted_step_ms = Histogram(
            "smartspec_controller_predicted_step_ms", "Predicted step time of planned steps (ms)",
            buckets=_STEP_BUCKETS_MS, registry=r,
        )
        self.measured_step_ms = Histogram(
            "smartspec_controller_measured_step_ms", "Measured step time of reported steps (ms)",
            buckets=_STEP_BUCKETS_MS, registry=r,
        )
        self.step_ms_error = Histogram(
            "smartspec_controller_step_ms_abs_error", "|measured - predicted| step time (ms), per step",
            buckets=_STEP_BUCKETS_MS, registry=r,
        )
        self.predicted_goodput = Histogram(
            "smartspec_controller_predicted_goodput_tok_s", "Predicted goodput of planned steps (tokens/s)",
            buckets=_GOODPUT_BUCKETS, registry=r,
        )
        self.measured_goodput = Histogram(
            "smartspec_controller_measured_goodput_tok_s", "Measured goodput of reported steps (tokens/s)",
            buckets=_GOODPUT_BUCKETS, registry=r,
        )
        self.redis_errors = Counter("smartspec_controller_redis_errors", "Failed Redis round trips", registry=r)
        self.degraded_steps = Counter("smartspec_controller_degraded_steps", "Steps planned without Redis",
                                      registry=r)
        self.redis_ok = Gauge("smartspec_controller_redis_ok", "1 if the last Redis call succeeded", registry=r)
        self.policy_version = Gauge("smartspec_controller_policy_version", "Version of the policy last used",
                                    registry=r)
        self.redis_ok.set(1)
        self._http = None

    def observe_step(self, *, policy: str, decision_ms: float, ks, proposed: int, accepted: int,
                     predicted_ms: float, predicted_tokens: float, measured_ms: float, generated: int,
                     previous_predicted_ms: float | None, degraded: bool, policy_version: int) -> None:
        self.steps.labels(policy).inc()
        self.decision_ms.observe(decision_ms)
        self.chosen_k.observe_many(ks)
        self.proposed_tokens.inc(proposed)
        self.accepted_tokens.inc(accepted)
        if predicted_ms > 0:
            self.predicted_step_ms.observe(predicted_ms)
            self.predicted_goodput.observe(predicted_tokens * 1000.0 / predicted_ms)
        if measured_ms > 0:
            self.measured_step_ms.observe(measured_ms)
            self.measured_goodput.observe(generated * 1000.0 / measured_ms)
            if previous_predicted_ms:
                self.step_ms_error.observe(abs(measured_ms - previous_predicted_ms))
        if degraded:
            self.degraded_steps.inc()
        self.policy_version.set(policy_version)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics over HTTP; returns the bound port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

"""OpenTelemetry tracing: off by default, free when off, exported by OTLP (or printed) when on.

Spans (names are stable, attributes prefixed `smartspec.`):

- worker `Generate` (`smartspec.generate`, one per request): its parent is the caller's W3C
  `traceparent` from the gRPC metadata, if any. Attributes: request id, prompt / max / completion
  tokens, proposed and accepted totals.
- worker engine step (`smartspec.engine.step`, one per step): a step serves a whole batch, i.e.
  many requests' traces at once. Its parent is the Generate span of the batch's oldest traced
  request and every other request in the batch is a span *link*, so a request's own trace shows
  the steps that started while it was the oldest (for one request alone: all of them) and the
  links name the rest. Attributes: step index, batch size, speculating rows, tokens, step ms.
- worker plan (`smartspec.worker.plan`, child of the step): the controller link's re-plan.
- controller plan (`smartspec.controller.plan`): its parent is the worker's step span.

Propagation worker -> controller: a Connect stream's gRPC metadata is sent once, at open, while a
stream carries thousands of steps, each its own span. So every `StepReport` has an optional
`trace_context` map (W3C `traceparent` / `tracestate`), filled only when tracing is on: the
controller's plan span is then a real child of the step it answers (same trace id), which a
stream-level link could not give. It costs nothing when off (an empty map is not on the wire).

When off (`ENABLED` is False, the default) callers test that module-level flag before building
anything: no span objects, no context, no opentelemetry import (`tests/test_tracing.py` checks
`sys.modules`). opentelemetry is an optional extra: `pip install smartspec[tracing]`.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

ENABLED = False          # read on the hot paths: `if tracing.ENABLED:` before any tracing work
_tracer: Any = None
_provider: Any = None
_propagator: Any = None

EXPORTERS = ("", "otlp", "console", "none")


def add_tracing_options(parser) -> None:
    """`--otel-endpoint` (OTLP gRPC, e.g. http://127.0.0.1:4317) and `--otel-exporter`."""
    from smartspec.core.config import add_option

    add_option(parser, "--otel-endpoint", default="",
               help="OpenTelemetry: export spans by OTLP gRPC to this collector (empty = tracing off)")
    add_option(parser, "--otel-exporter", default="", choices=EXPORTERS,
               help="OpenTelemetry exporter: otlp (to --otel-endpoint), console (print each span "
                    "as JSON on stdout), none; empty = otlp when --otel-endpoint is set, else off")
    add_option(parser, "--otel-sample-ratio", default=1.0, type=float,
               help="fraction of requests traced (their steps and plans follow the request's "
                    "decision, a caller's sampled traceparent always wins)")


def configure_from_args(args, service_name: str) -> bool:
    """Turn tracing on as the CLI flags say; returns whether it is on."""
    exporter = getattr(args, "otel_exporter", "") or ""
    endpoint = getattr(args, "otel_endpoint", "") or ""
    if exporter == "none" or (not exporter and not endpoint):
        return False
    try:
        return configure(service_name=service_name, exporter=exporter or "otlp", endpoint=endpoint,
                         sample_ratio=getattr(args, "otel_sample_ratio", 1.0))
    except ImportError as exc:
        raise TracingUnavailable(
            f"--otel-exporter/--otel-endpoint need OpenTelemetry: pip install 'smartspec[tracing]' ({exc})") from exc


class TracingUnavailable(RuntimeError):
    """Tracing was asked for but the `tracing` extra (opentelemetry) is not installed."""


def configure(*, service_name: str = "smartspec", exporter: Any = "otlp", endpoint: str = "",
              simple: bool | None = None, sample_ratio: float = 1.0) -> bool:
    """Turn tracing on in this process. `exporter`: "otlp", "console" or a SpanExporter object
    (tests pass an InMemorySpanExporter); `simple`: export each span as it ends (default for
    console and objects) instead of in batches. `sample_ratio`: the share of root traces (new
    requests) recorded; a child follows its parent (a step its oldest request, a controller plan
    its step), so a busy server can trace a few requests in full. An unsampled span is a
    non-recording one: no attributes, links or export. Raises ImportError without the tracing extra."""
    if not 0.0 <= sample_ratio <= 1.0:
        raise ValueError(f"otel_sample_ratio: must be in [0, 1], got {sample_ratio}")
    global ENABLED, _tracer, _provider, _propagator
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
        simple = bool(simple)
    elif exporter == "console":
        span_exporter = ConsoleSpanExporter(service_name=service_name)
        simple = True if simple is None else simple
    else:
        span_exporter = exporter
        simple = True if simple is None else simple
    shutdown()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                              sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    provider.add_span_processor(SimpleSpanProcessor(span_exporter) if simple else BatchSpanProcessor(span_exporter))
    _provider, _tracer = provider, provider.get_tracer("smartspec")
    _propagator = TraceContextTextMapPropagator()
    ENABLED = True
    log.info("tracing on: service %s, exporter %s", service_name,
             exporter if isinstance(exporter, str) else type(exporter).__name__)
    return True


def shutdown() -> None:
    """Flush and turn tracing off (the process's hot paths go back to the flag check)."""
    global ENABLED, _tracer, _provider
    ENABLED = False
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def tracer() -> Any:
    """The tracer (only meaningful while ENABLED; callers check the flag first)."""
    return _tracer


def extract(carrier: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Any:
    """The OpenTelemetry Context carried by W3C headers (a mapping or gRPC metadata pairs); None when
    there is no `traceparent`."""
    if not carrier:
        return None
    if not isinstance(carrier, Mapping):
        carrier = {key: value for key, value in carrier if isinstance(value, str)}
    if "traceparent" not in carrier:
        return None
    return _propagator.extract(carrier)


def inject(span: Any, carrier: Any) -> None:
    """Write `span`'s W3C headers into `carrier` (a dict or a protobuf string map)."""
    from opentelemetry import trace

    _propagator.inject(carrier, context=trace.set_span_in_context(span))


def start_span(name: str, *, parent: Any = None, parent_context: Any = None, links: Iterable[Any] = (),
               attributes: Mapping[str, Any] | None = None) -> Any:
    """A started span (end it with `.end()`). `parent`: a span, `parent_context`: a Context
    (e.g. from `extract`); neither: a root. `links`: spans to link to."""
    from opentelemetry import trace
    from opentelemetry.trace import Link

    if parent is not None:
        parent_context = trace.set_span_in_context(parent)
    link_list = [Link(span.get_span_context()) for span in links]
    return _tracer.start_span(name, context=parent_context, links=link_list, attributes=attributes)


def use_span(span: Any):
    """Context manager making `span` current (not ending it)."""
    from opentelemetry import trace

    return trace.use_span(span, end_on_exit=False)


def current_span() -> Any:
    """The current span (a non-recording one when none)."""
    from opentelemetry import trace

    return trace.get_current_span()


def record_error(span: Any, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, str(exc)))

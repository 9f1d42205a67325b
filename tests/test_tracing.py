"""OpenTelemetry tracing (core/tracing.py): one Generate's trace crosses worker and controller;
off by default, and then opentelemetry is never even imported.

A real controller (Redis) and a real worker serving the tiny test model; spans go to an in-memory
exporter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from smartspec.core import tracing
from smartspec.v1 import generation_pb2 as gen
from smartspec.v1 import generation_pb2_grpc

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-tracing"))


@pytest.fixture
def exporter():
    pytest.importorskip("opentelemetry.sdk", reason="the tracing extra: pip install 'smartspec[tracing]'")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    tracing.configure(service_name="smartspec-test", exporter=spans)
    yield spans
    tracing.shutdown()


def start_worker(tiny, controller_address: str | None):
    from smartspec.worker.engine import EngineConfig
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.server import WorkerOptions, WorkerServer

    options = WorkerOptions(engine=EngineConfig(max_batch_size=2, max_context_tokens=128, max_queue=2,
                                                token_budget=128, max_k=4),
                            controller=controller_address, local_policy="fixed:3", profile_steps=0,
                            default_max_tokens=12, plan_deadline_ms=500.0, proposer_name="ngram")
    server = WorkerServer(tiny, make_proposer("ngram"), options)
    port = server.start()
    if controller_address is not None:
        deadline = time.monotonic() + 10
        while not server.link.connected:
            assert time.monotonic() < deadline, "the worker never connected to the controller"
            time.sleep(0.02)
    return server, port


def generate(port: int, metadata=None) -> gen.GenerationResult:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = gen.GenerateRequest(prompt="t5 t6 t7 t5 t6 t7 t5 t6", max_tokens=12, request_id="traced-1",
                                      ignore_eos=True)
        results = [m.result for m in stub.Generate(request, metadata=metadata, timeout=60) if m.HasField("result")]
    assert len(results) == 1
    return results[0]


def by_name(spans, name: str):
    return [s for s in spans if s.name == name]


def test_one_generate_is_one_trace_across_worker_and_controller(tiny, controller, exporter):
    worker, port = start_worker(tiny, controller.address)
    try:
        result = generate(port, metadata=[("traceparent", f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01")])
    finally:
        worker.stop(0)        # the last reports are planned (and their spans ended) before this returns
    controller_deadline = time.monotonic() + 5
    while True:
        spans = exporter.get_finished_spans()
        steps = by_name(spans, "smartspec.engine.step")
        plans = by_name(spans, "smartspec.controller.plan")
        if len(plans) >= len(steps) - 1 or time.monotonic() > controller_deadline:
            break
        time.sleep(0.05)

    # Generate: a child of the client's traceparent, with the request's figures.
    [generate_span] = by_name(spans, "smartspec.generate")
    assert format(generate_span.context.trace_id, "032x") == CLIENT_TRACE_ID
    assert format(generate_span.parent.span_id, "016x") == CLIENT_SPAN_ID
    attributes = generate_span.attributes
    assert attributes["smartspec.request_id"] == "traced-1"
    assert attributes["smartspec.max_tokens"] == 12
    assert attributes["smartspec.completion_tokens"] == result.usage.completion_tokens == 12
    assert attributes["smartspec.prompt_tokens"] == result.usage.prompt_tokens > 0
    assert attributes["smartspec.proposed_tokens"] == result.speculation.proposed_tokens
    assert attributes["smartspec.accepted_tokens"] == result.speculation.accepted_tokens

    # Every engine step ran for this one request: each is a child of its Generate span.
    trace_id = generate_span.context.trace_id
    assert steps, "no engine step spans"
    for step in steps:
        assert step.context.trace_id == trace_id
        assert step.parent.span_id == generate_span.context.span_id
        assert step.attributes["smartspec.batch_size"] == 1
        assert step.attributes["smartspec.step_ms"] > 0
    assert any(step.attributes["smartspec.speculating_rows"] == 1 for step in steps)
    step_ids = {step.context.span_id for step in steps}

    # The worker's plans are children of the steps they plan.
    worker_plans = by_name(spans, "smartspec.worker.plan")
    assert worker_plans and all(p.parent.span_id in step_ids for p in worker_plans)

    # The controller's plans: propagated in StepReport.trace_context, so same trace, parent a step.
    assert plans, "no controller plan spans"
    for plan in plans:
        assert plan.context.trace_id == trace_id
        assert plan.parent.span_id in step_ids
        assert plan.attributes["smartspec.worker_id"] == "worker-0"
        assert plan.attributes["smartspec.policy"]
        assert plan.attributes["smartspec.predicted_step_ms"] >= 0
    step_index = {step.context.span_id: step.attributes["smartspec.step_index"] for step in steps}
    assert all(plan.attributes["smartspec.step_index"] == step_index[plan.parent.span_id] for plan in plans)
    assert plans[0].resource.attributes["service.name"] == "smartspec-test"


def test_a_step_of_two_requests_links_the_second(tiny, exporter):
    worker, port = start_worker(tiny, None)
    try:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: generate_without_id(port), range(2)))
    finally:
        worker.stop(0)
    spans = exporter.get_finished_spans()
    generates = {s.context.span_id for s in by_name(spans, "smartspec.generate")}
    assert len(generates) == 2
    shared = [s for s in by_name(spans, "smartspec.engine.step") if s.attributes["smartspec.batch_size"] == 2]
    assert shared, "the two requests never shared a step"
    for step in shared:
        related = {step.parent.span_id} | {link.context.span_id for link in step.links}
        assert related == generates


def generate_without_id(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        list(stub.Generate(gen.GenerateRequest(prompt="t5 t6 t7 t5 t6", max_tokens=12, ignore_eos=True),
                           timeout=60))


def test_flags_and_environment_turn_it_on(monkeypatch):
    import argparse

    pytest.importorskip("opentelemetry.sdk", reason="the tracing extra: pip install 'smartspec[tracing]'")

    def parse(*argv):
        parser = argparse.ArgumentParser()
        tracing.add_tracing_options(parser)
        return parser.parse_args(argv)

    assert not tracing.configure_from_args(parse(), "x") and not tracing.ENABLED
    assert not tracing.configure_from_args(parse("--otel-exporter", "none", "--otel-endpoint", "h:1"), "x")
    try:
        assert tracing.configure_from_args(parse("--otel-exporter", "console"), "x") and tracing.ENABLED
        monkeypatch.setenv("SMARTSPEC_OTEL_ENDPOINT", "http://127.0.0.1:4317")
        args = parse()
        assert args.otel_endpoint == "http://127.0.0.1:4317"
        assert tracing.configure_from_args(args, "x") and tracing.ENABLED   # OTLP exporter, batched
    finally:
        tracing.shutdown()
    assert not tracing.ENABLED


def test_unsampled_requests_record_nothing_downstream(tiny, controller):
    """ratio 0: a request is not traced, nor are its steps and the controller's plans for them."""
    pytest.importorskip("opentelemetry.sdk", reason="the tracing extra: pip install 'smartspec[tracing]'")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    tracing.configure(exporter=spans, sample_ratio=0.0)
    try:
        worker, port = start_worker(tiny, controller.address)
        try:
            generate(port)
        finally:
            worker.stop(0)
        time.sleep(0.2)
        assert spans.get_finished_spans() == ()
        # ... while a caller's sampled traceparent is always honoured
        worker, port = start_worker(tiny, None)
        try:
            generate(port, metadata=[("traceparent", f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01")])
        finally:
            worker.stop(0)
        names = {s.name for s in spans.get_finished_spans()}
        assert {"smartspec.generate", "smartspec.engine.step"} <= names
    finally:
        tracing.shutdown()


# opentelemetry is made unimportable, as on an install without the tracing extra (only checking
# sys.modules would not do: redis-py imports it by itself when it is installed).
OFF_SCRIPT = textwrap.dedent("""
    import sys

    class NoOpenTelemetry:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "opentelemetry":
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoOpenTelemetry())
    import grpc
    sys.path.insert(0, {tests!r})
    from tiny_model import write_tiny_model
    from smartspec.controller.server import ControllerServer
    from smartspec.controller.cli import configure as configure_controller
    from smartspec.worker.cli import configure as configure_worker
    from smartspec.worker.engine import EngineConfig
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.server import WorkerOptions, WorkerServer
    from smartspec.v1 import generation_pb2 as gen, generation_pb2_grpc

    controller = ControllerServer(port=0, redis_url={redis!r}, prefix={prefix!r})
    controller.start()
    options = WorkerOptions(engine=EngineConfig(max_batch_size=2, max_context_tokens=128, max_queue=2,
                                                token_budget=128, max_k=4),
                            controller=controller.address, profile_steps=0, plan_deadline_ms=500.0)
    worker = WorkerServer(write_tiny_model({folder!r}), make_proposer("ngram"), options)
    port = worker.start()
    with grpc.insecure_channel(f"127.0.0.1:{{port}}") as channel:
        replies = list(generation_pb2_grpc.GenerationStub(channel).Generate(
            gen.GenerateRequest(prompt="t5 t6 t7 t5 t6", max_tokens=8, ignore_eos=True),
            metadata=[("traceparent", "00-{trace}-{span}-01")], timeout=60))
    worker.stop(0)
    controller.stop(0)
    assert replies[-1].result.usage.completion_tokens == 8
    from smartspec.core import tracing
    assert not tracing.ENABLED and tracing.tracer() is None
    loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
    print("opentelemetry modules:", loaded)
    sys.exit(1 if loaded else 0)
""")


def test_off_by_default_runs_without_opentelemetry(tmp_path, redis_url, redis_prefix):
    script = OFF_SCRIPT.format(tests=str(TESTS), redis=redis_url, prefix=redis_prefix, folder=str(tmp_path / "m"),
                               trace=CLIENT_TRACE_ID, span=CLIENT_SPAN_ID)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTSPEC_OTEL", "OTEL_"))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "opentelemetry modules: []" in done.stdout

"""The Generation service end to end: a real WorkerServer on a loopback port, the real SmolLM2 model.

Validation, streaming, stop conditions, seeded sampling, cancellation, queue limits, health, auth.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smartspec.core.security import ServerSecurity
from smartspec.v1 import generation_pb2 as pb
from smartspec.v1 import generation_pb2_grpc
from smartspec.worker.engine import EngineConfig
from smartspec.worker.model import load_model
from smartspec.worker.proposers import make_proposer
from smartspec.worker.server import WorkerOptions, WorkerServer

pytestmark = pytest.mark.slow

CONTEXT = 256
QUESTION = [pb.ChatMessage(role="user", content="Describe a sunny day at the beach in a few sentences.")]


@pytest.fixture(scope="module")
def model():
    return load_model()


def start_server(model, *, max_batch_size=4, max_queue=4, policy="fixed:3", security=ServerSecurity(),
                 metrics_port=0):
    options = WorkerOptions(
        metrics_port=metrics_port,
        engine=EngineConfig(max_batch_size=max_batch_size, max_context_tokens=CONTEXT, max_queue=max_queue,
                            token_budget=256, max_k=4),
        local_policy=policy,
        profile_steps=0,
        default_max_tokens=16,
        proposer_name="ngram",
    )
    server = WorkerServer(model, make_proposer("ngram"), options, security=security)
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return server, channel


@pytest.fixture(scope="module")
def worker(model):
    server, channel = start_server(model)
    yield server, generation_pb2_grpc.GenerationStub(channel), channel
    channel.close()
    server.stop(0)


def generate(stub, **fields) -> tuple[str, list[int], pb.GenerationResult]:
    """Run one Generate; returns (concatenated delta text, delta token ids, result)."""
    return run_generate(stub, pb.GenerateRequest(**fields))


def run_generate(stub, request: pb.GenerateRequest, timeout: float = 120) -> tuple[str, list[int], pb.GenerationResult]:
    """Read one Generate stream: every delta before exactly one result."""
    text, ids, results = "", [], []
    for message in stub.Generate(request, timeout=timeout):
        if message.HasField("delta"):
            assert not results, "a delta after the result"
            text += message.delta.text
            ids += list(message.delta.token_ids)
        else:
            results.append(message.result)
    assert len(results) == 1
    return text, ids, results[0]


@pytest.mark.parametrize(
    "fields, field_name",
    [
        ({}, "prompt"),
        ({"prompt": "hi", "messages": QUESTION}, "messages"),
        ({"messages": [pb.ChatMessage(role="robot", content="hi")]}, "messages[0].role"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "temperature": float("nan")}, "temperature"),
        ({"prompt": "hi", "top_p": 0.0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "max_tokens": CONTEXT + 1}, "max_tokens"),
        ({"prompt": "word " * (CONTEXT + 10)}, "prompt"),
        ({"prompt": "hi", "stop": ["x"] * 17}, "stop"),
        ({"prompt": "hi", "stop": ["ok", ""]}, "stop[1]"),
        ({"prompt": "hi", "request_id": "x" * 200}, "request_id"),
    ],
)
def test_invalid_requests_name_the_field_and_the_worker_keeps_serving(worker, fields, field_name):
    _, stub, _ = worker
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(pb.GenerateRequest(**fields), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field_name + ":"), caught.value.details()
    text, _, result = generate(stub, prompt="The sky is", max_tokens=3, ignore_eos=True)
    assert result.usage.completion_tokens == 3 and text


def test_stream_deltas_add_up_to_the_result(worker, model):
    _, stub, _ = worker
    text, ids, result = generate(stub, messages=QUESTION, max_tokens=20, request_id="my-id")
    assert result.request_id == "my-id"
    assert text == result.text and text
    assert result.usage.completion_tokens == len(ids)
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == text
    stats = result.speculation
    assert list(stats.speculation_lengths) and all(k <= 3 for k in stats.speculation_lengths)
    assert stats.steps == len(stats.speculation_lengths)
    assert result.time_to_first_token_ms <= result.total_ms


def test_max_tokens_ends_with_length(worker):
    _, stub, _ = worker
    _, ids, result = generate(stub, prompt="Once upon a time", max_tokens=5, ignore_eos=True)
    assert result.finish_reason == pb.FINISH_REASON_LENGTH
    assert result.usage.completion_tokens == 5 == len(ids)


def test_eos_ends_with_stop_unless_ignored(worker):
    _, stub, _ = worker
    short = [pb.ChatMessage(role="user", content="Reply with just the word: yes")]
    _, _, stopped = generate(stub, messages=short, max_tokens=30)
    assert stopped.finish_reason == pb.FINISH_REASON_STOP
    assert stopped.usage.completion_tokens < 30
    _, _, ignored = generate(stub, messages=short, max_tokens=stopped.usage.completion_tokens + 4, ignore_eos=True)
    assert ignored.finish_reason == pb.FINISH_REASON_LENGTH
    assert ignored.usage.completion_tokens == stopped.usage.completion_tokens + 4


def test_stop_string_cuts_the_output_before_it(worker):
    _, stub, _ = worker
    full_text, _, full = generate(stub, messages=QUESTION, max_tokens=30, ignore_eos=True)
    words = full_text.split()
    assert len(words) > 6
    stop = " " + words[len(words) // 2]            # a word in the middle, with its leading space
    cut_at = full_text.index(stop)
    text, _, result = generate(stub, messages=QUESTION, max_tokens=30, ignore_eos=True, stop=[stop, "@@@"])
    assert result.finish_reason == pb.FINISH_REASON_STOP
    assert text == result.text == full_text[:cut_at]
    assert result.usage.completion_tokens < full.usage.completion_tokens


def test_seeded_sampling_is_reproducible(worker):
    _, stub, _ = worker
    common = dict(messages=QUESTION, max_tokens=16, temperature=1.0, top_p=0.95, ignore_eos=True)
    first, _, _ = generate(stub, seed=123, **common)
    again, _, _ = generate(stub, seed=123, **common)
    other, _, _ = generate(stub, seed=124, **common)
    assert first == again
    assert other != first


def test_duplicate_running_request_id_is_already_exists(worker):
    _, stub, _ = worker
    running = stub.Generate(pb.GenerateRequest(prompt="Count: 1, 2, 3,", max_tokens=60, ignore_eos=True,
                                               request_id="dup"), timeout=120)
    next(running)                                   # it holds a slot now
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(pb.GenerateRequest(prompt="hi", request_id="dup"), timeout=30))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "request_id" in caught.value.details()
    running.cancel()
    _wait_running(stub, 0)


def test_worker_info_and_health(worker, model):
    server, stub, channel = worker
    info = stub.GetWorkerInfo(pb.GetWorkerInfoRequest(), timeout=10)
    assert info.model == model.name
    assert info.controller == "none" and not info.controller_connected
    assert info.local_policy.name == "fixed" and info.local_policy.parameters["k"].int_value == 3
    assert info.max_speculation_length == 4 and info.max_batch_size == 4 and info.context_window == CONTEXT
    assert info.reports_proposable_tokens  # prompt lookup knows its next offer
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="smartspec.v1.Generation"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    services = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {"smartspec.v1.Generation", "grpc.health.v1.Health"} <= services


def test_metrics_count_finished_requests(worker):
    server, stub, _ = worker
    _wait_running(stub, 0)                          # earlier tests' cancelled requests have ended
    registry = server.metrics.registry
    before = registry.get_sample_value("smartspec_worker_requests_total", {"finish_reason": "length"}) or 0.0
    tokens_before = registry.get_sample_value("smartspec_worker_generated_tokens_total") or 0.0
    generate(stub, prompt="One, two,", max_tokens=4, ignore_eos=True)
    assert registry.get_sample_value("smartspec_worker_requests_total", {"finish_reason": "length"}) == before + 1
    assert registry.get_sample_value("smartspec_worker_generated_tokens_total") == tokens_before + 4


def _wait_running(stub, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = stub.GetWorkerInfo(pb.GetWorkerInfoRequest(), timeout=10)
        if info.running_requests == count:
            return
        time.sleep(0.05)
    raise AssertionError(f"running_requests never became {count}")


def test_cancellation_frees_the_slot_for_the_next_request(model):
    # One slot, no queue: the next request fits only if the cancelled one released its slot.
    server, channel = start_server(model, max_batch_size=1, max_queue=0)
    stub = generation_pb2_grpc.GenerationStub(channel)
    try:
        long_call = stub.Generate(pb.GenerateRequest(prompt="Count: 1, 2, 3,", max_tokens=200, ignore_eos=True),
                                  timeout=120)
        next(long_call)
        with pytest.raises(grpc.RpcError) as caught:   # the slot is taken
            list(stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=2), timeout=30))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        long_call.cancel()
        _wait_running(stub, 0)
        _, _, result = generate(stub, prompt="Hello", max_tokens=3, ignore_eos=True)
        assert result.usage.completion_tokens == 3
    finally:
        channel.close()
        server.stop(0)


def test_full_queue_is_resource_exhausted(model):
    server, channel = start_server(model, max_batch_size=1, max_queue=1)
    stub = generation_pb2_grpc.GenerationStub(channel)
    try:
        running = stub.Generate(pb.GenerateRequest(prompt="A, B, C,", max_tokens=200, ignore_eos=True), timeout=120)
        next(running)
        queued = stub.Generate(pb.GenerateRequest(prompt="X", max_tokens=2), timeout=120)
        deadline = time.monotonic() + 30
        while stub.GetWorkerInfo(pb.GetWorkerInfoRequest()).queued_requests != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(pb.GenerateRequest(prompt="Y", max_tokens=2), timeout=30))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        running.cancel()
        # The queued request gets the slot and completes.
        results = [m.result for m in queued if m.HasField("result")]
        assert results[0].usage.completion_tokens >= 1 and results[0].queue_ms > 0
    finally:
        channel.close()
        server.stop(0)


def test_bearer_token_is_required_when_configured(model):
    server, channel = start_server(model, security=ServerSecurity(auth_token="s3cret"))
    stub = generation_pb2_grpc.GenerationStub(channel)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=1), timeout=30))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        responses = list(stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=1), timeout=30,
                                       metadata=[("authorization", "Bearer s3cret")]))
        assert responses[-1].result.usage.completion_tokens == 1
    finally:
        channel.close()
        server.stop(0)


def test_graceful_stop_finishes_running_requests(model):
    server, channel = start_server(model)
    stub = generation_pb2_grpc.GenerationStub(channel)
    call = stub.Generate(pb.GenerateRequest(prompt="1, 2, 3,", max_tokens=12, ignore_eos=True), timeout=120)
    next(call)
    server.stop(grace=60)
    results = [m.result for m in call if m.HasField("result")]
    assert results[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert results[0].usage.completion_tokens == 12
    channel.close()


def test_metrics_endpoint_exposes_per_position_speculation_counters(model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    server, channel = start_server(model, metrics_port=metrics_port)
    stub = generation_pb2_grpc.GenerationStub(channel)
    try:
        _, _, result = generate(stub, prompt="a b c a b c a b c a b c", max_tokens=12, ignore_eos=True)
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        registry = server.metrics.registry

        def counter(name, position):
            return registry.get_sample_value(f"smartspec_worker_{name}_tokens_total", {"position": str(position)}) or 0

        assert "smartspec_worker_proposed_tokens_total" in body
        assert counter("proposed", 1) > 0
        # A proposal at position j exists only if there was one at j - 1; acceptance likewise.
        for position in (1, 2):
            assert counter("proposed", position) >= counter("proposed", position + 1)
            assert counter("accepted", position) >= counter("accepted", position + 1)
            assert counter("accepted", position) <= counter("proposed", position)
        # Step metrics are recorded right after the step that delivered the result: poll briefly.
        deadline = time.monotonic() + 10
        while registry.get_sample_value("smartspec_worker_speculation_length_count") != result.speculation.steps:
            assert time.monotonic() < deadline, "k histogram never matched the request's decode steps"
            time.sleep(0.02)
        assert sum(counter("accepted", p) for p in (1, 2, 3)) == result.speculation.accepted_tokens
    finally:
        channel.close()
        server.stop(0)


def test_concurrent_clients_beyond_the_slots_queue_and_get_the_same_greedy_text(worker):
    from concurrent.futures import ThreadPoolExecutor

    _, stub, _ = worker
    prompts = ["The capital of France is", "Water boils at", "My favourite colour is"]
    alone = {p: generate(stub, prompt=p, max_tokens=10, ignore_eos=True)[0] for p in prompts}
    jobs = prompts * 2                                   # 6 requests, 4 slots: two wait in the queue
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda p: generate(stub, prompt=p, max_tokens=10, ignore_eos=True), jobs))
    for prompt, (text, _, result) in zip(jobs, results):
        assert text == alone[prompt]
        assert result.usage.completion_tokens == 10
    # Two requests waited for a slot: at least as long as a first-batch request took to decode.
    queue_ms = sorted(r.queue_ms for _, _, r in results)
    fastest_decode_ms = min(r.total_ms - r.time_to_first_token_ms for _, _, r in results)
    assert queue_ms[-2] >= 0.8 * fastest_decode_ms


def test_generation_stops_at_the_context_window(worker, model):
    _, stub, _ = worker
    # The longest "hello hello ..." prompt that still leaves room for a few tokens.
    prompt = next(p for p in ("hello " * n for n in range(CONTEXT, 0, -1))
                  if CONTEXT - len(model.tokenizer.encode(p)) >= 3)
    room = CONTEXT - len(model.tokenizer.encode(prompt))
    assert 3 <= room < 16
    _, ids, result = generate(stub, prompt=prompt, max_tokens=100, ignore_eos=True)
    assert result.finish_reason == pb.FINISH_REASON_LENGTH
    assert result.usage.completion_tokens == len(ids) == room
    assert result.usage.prompt_tokens + result.usage.completion_tokens == CONTEXT

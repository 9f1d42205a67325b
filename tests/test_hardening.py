"""Issue 13 (hardening): every finding of the outside test, re-tried the way it was found, against a
real controller (gRPC on loopback, real Redis) and a real worker server (a tiny random model).

1. The shared cost model could be poisoned through Decide (total_ms = 1e300 naming another worker's
   cost profile) and token counts of 2^32 - 1 were accepted: now refused at validation, Decide
   never touches a stream's state, and the online fit clips what it is given.
2. verify_ms ~ 1.3e154 raised OverflowError inside the cost model (Decide: UNKNOWN; stream:
   "internal controller error"): now INVALID_ARGUMENT naming the field, and the fit cannot raise.
3. Invalid UTF-8 in a Generate request was INTERNAL; a second hello on a Connect stream, a hello
   with max_batch_size 0 and ids with ':', newlines or NUL were accepted; the worker's queue-full
   message counted more queued requests than its limit.
"""

from __future__ import annotations

import json
import queue
import re

import grpc
import numpy as np
import pytest

from cost_steps import TRUE_MODEL, random_step
from smartspec.core.cost_fit import OnlineCostFit
from smartspec.v1 import admin_pb2, admin_pb2_grpc, common_pb2, controller_pb2, controller_pb2_grpc
from smartspec.v1 import generation_pb2 as gen
from wire import outcome

KEY_SAFE = re.compile(r"[A-Za-z0-9._/@+=~:-]+")  # what a key may hold after the prefix (':' separates)


def hello(worker_id="w0", *, profile="", max_k=8, max_batch=64) -> controller_pb2.WorkerHello:
    return controller_pb2.WorkerHello(worker_id=worker_id, proposer_kind=common_pb2.PROPOSER_KIND_NGRAM,
                                      max_speculation_length=max_k, max_batch_size=max_batch,
                                      cost_profile_id=profile)


def timed_report(step: int, ks, contexts, prefills, draft_ms: float, verify_ms: float, total_ms: float,
                 **kw) -> controller_pb2.StepReport:
    """A report whose rows attended `contexts` with every proposal accepted (what the fit reads)."""
    outcomes = [controller_pb2.RequestOutcome(
        request_id=f"r{i}", proposed_tokens=int(k), accepted_tokens=int(k), tested_positions=int(k),
        requested_tokens=int(k), context_tokens=int(c + k + 1 + p), prefill_tokens=int(p))
        for i, (k, c, p) in enumerate(zip(ks, contexts, prefills))]
    return controller_pb2.StepReport(step_index=step, requests=outcomes, draft_ms=draft_ms, verify_ms=verify_ms,
                                     total_ms=total_ms, **kw)


def honest_report(step: int, rng) -> controller_pb2.StepReport:
    ks, contexts, prefills = random_step(rng)
    draft, verify = TRUE_MODEL.draft_ms(ks, contexts), TRUE_MODEL.verify_ms(ks, contexts, prefills)
    return timed_report(step, ks, contexts, prefills, draft, verify, draft + verify + 1.0)


class Stream:
    """A live Connect stream: one message in, its plan out."""

    def __init__(self, channel, first: controller_pb2.WorkerHello) -> None:
        self._outbox: queue.Queue = queue.Queue()
        self._outbox.put(controller_pb2.WorkerMessage(hello=first))
        self._plans = controller_pb2_grpc.ControllerStub(channel).Connect(iter(self._outbox.get, None), timeout=60)

    def send(self, report: controller_pb2.StepReport) -> controller_pb2.StepPlan:
        self._outbox.put(controller_pb2.WorkerMessage(report=report))
        return next(self._plans)

    def send_hello(self, worker: controller_pb2.WorkerHello) -> None:
        self._outbox.put(controller_pb2.WorkerMessage(hello=worker))

    def close(self) -> None:
        self._outbox.put(None)
        assert list(self._plans) == []


def state_of(raw, prefix: str) -> dict[bytes, object]:
    """Every key under the prefix with its value (strings and hashes), for before/after comparisons."""
    state = {}
    for key in raw.scan_iter(match=prefix + "*"):
        kind = raw.type(key)
        state[key] = raw.get(key) if kind == b"string" else raw.hgetall(key) if kind == b"hash" else kind
    return state


def victim_stream(channel, steps: int = 30) -> None:
    """Worker `victim` of profile `gpu-a` runs honest steps and disconnects (its fit is stored)."""
    rng = np.random.default_rng(0)
    stream = Stream(channel, hello("victim", profile="gpu-a", max_k=8, max_batch=32))
    for step in range(steps):
        assert not stream.send(honest_report(step, rng)).HasField("error")
    stream.close()


# ---------------------------------------------------------------- finding 1: the shared cost model


def test_twenty_decides_with_absurd_totals_naming_another_profile_are_refused(channel, raw, redis_prefix):
    victim_stream(channel)
    before = state_of(raw, redis_prefix)
    decide = controller_pb2_grpc.ControllerStub(channel).Decide
    for step in range(20):
        request = controller_pb2.DecideRequest(
            worker=hello("mallory", profile="gpu-a", max_batch=32),
            report=timed_report(step, [2, 2], [100, 100], [0, 0], 1.0, 1.0, 1e300))
        with pytest.raises(grpc.RpcError) as info:
            decide(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("report.total_ms:"), info.value.details()
    assert state_of(raw, redis_prefix) == before


@pytest.mark.parametrize("times", [(0.0, 0.0, 60_000.0), (60_000.0, 60_000.0, 60_000.0)], ids=["instant", "slow"])
def test_decide_naming_a_streaming_worker_and_its_profile_changes_none_of_their_state(channel, raw, redis_prefix,
                                                                                      times):
    """In-bounds but absurd steps through Decide, with the victim's own worker id and cost profile:
    served (they are plausible), yet every key a stream reads is unchanged byte for byte."""
    victim_stream(channel)
    before = state_of(raw, redis_prefix)
    stored_fit = raw.hget(f"{redis_prefix}fit:gpu-a", "fit")
    assert stored_fit is not None
    decide = controller_pb2_grpc.ControllerStub(channel).Decide
    rng = np.random.default_rng(1)
    for step in range(20):
        ks, contexts, prefills = random_step(rng)
        plan = decide(controller_pb2.DecideRequest(
            worker=hello("victim", profile="gpu-a", max_batch=32),
            report=timed_report(step, ks, contexts, prefills, *times)), timeout=10)
        assert not plan.HasField("error") and len(plan.requests) == len(ks)
    after = state_of(raw, redis_prefix)
    assert {k: v for k, v in after.items() if k in before} == before   # nothing a stream reads changed
    added = sorted(k.decode()[len(redis_prefix):] for k in set(after) - set(before))
    assert added and all(":decide:" in k or k == "workers" for k in added), added   # Decide's own keys only
    status = admin_pb2_grpc.AdminStub(channel).GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
    assert [w.worker_id for w in status.workers] == ["victim"]   # a Decide caller is not a worker


def test_a_hostile_stream_sharing_a_profile_moves_its_fit_a_bounded_amount(channel, raw, redis_prefix):
    """A stream may write its own profile's fit: twenty ~0 ms steps with 60 s totals, then twenty
    60 s steps, from a second worker of the profile (after 150 honest steps of the first) move the
    stored model's predictions by less than a factor of two, its overhead by a fraction of a step
    (unclipped, those steps made the overhead alone seconds long; see test_cost_fit.py)."""
    victim_stream(channel, steps=150)
    sampler = np.random.default_rng(6)
    held_out = [random_step(sampler) for _ in range(50)]
    before = OnlineCostFit.from_dict(json.loads(raw.hget(f"{redis_prefix}fit:gpu-a", "fit"))).model()
    rng = np.random.default_rng(2)
    stream = Stream(channel, hello("mallory", profile="gpu-a", max_k=8, max_batch=32))
    for step in range(40):
        ks, contexts, prefills = random_step(rng)
        part = 0.001 if step < 20 else 60_000.0   # (0 + 0 is no measurement: the planner skips it)
        assert not stream.send(timed_report(step, ks, contexts, prefills, part, part, 60_000.0)).HasField("error")
    stream.close()
    after = OnlineCostFit.from_dict(json.loads(raw.hget(f"{redis_prefix}fit:gpu-a", "fit"))).model()
    ratios = [after.predict_ms(*s) / before.predict_ms(*s) for s in held_out]
    assert 0.5 < min(ratios) and max(ratios) < 2.0, (min(ratios), max(ratios))
    assert after.overhead_ms < 100.0


def test_token_counts_of_two_to_the_32_are_refused_and_no_metric_moves(server, channel):
    registry = server.metrics.registry
    names = ["smartspec_controller_proposed_tokens_total", "smartspec_controller_accepted_tokens_total",
             "smartspec_controller_measured_step_ms_sum", "smartspec_controller_predicted_step_ms_sum"]
    stream = Stream(channel, hello(max_k=8))
    assert not stream.send(timed_report(0, [2], [100], [0], 1.0, 50.0, 52.0)).HasField("error")
    before = {name: registry.get_sample_value(name) for name in names}
    huge = 2**32 - 1
    for report, field in [
        (controller_pb2.StepReport(step_index=1, requests=[outcome("r0", huge, huge)], verify_ms=50.0),
         "requests[0].proposed_tokens"),
        (controller_pb2.StepReport(step_index=1, requests=[outcome("r0", 2, 2, context=huge)], verify_ms=50.0),
         "requests[0].context_tokens"),
        (timed_report(1, [2], [100], [0], 1.0, 50.0, 52.0, queued_requests=huge), "queued_requests"),
        (timed_report(1, [2], [100], [0], 1.0, 50.0, 52.0, batched_tokens=huge), "batched_tokens"),
    ]:
        plan = stream.send(report)
        assert plan.error.field == field
        assert plan.error.grpc_status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert {name: registry.get_sample_value(name) for name in names} == before
    stream.close()


# ---------------------------------------------------------------- finding 2: overflow in the cost model


@pytest.mark.parametrize("field", ["verify_ms", "draft_ms"])
def test_times_near_1e154_are_invalid_argument_on_both_paths_never_internal(channel, field):
    times = {"draft_ms": 1.0, "verify_ms": 50.0, "total_ms": 52.0, field: 1.3e154}
    report = controller_pb2.StepReport(step_index=3, requests=[outcome("a", 2, 2)], **times)
    with pytest.raises(grpc.RpcError) as info:
        controller_pb2_grpc.ControllerStub(channel).Decide(
            controller_pb2.DecideRequest(worker=hello(), report=report), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"report.{field}:")
    stream = Stream(channel, hello())
    plan = stream.send(report)
    assert plan.error.field == field and plan.error.grpc_status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "internal" not in plan.error.message
    assert not stream.send(timed_report(4, [2], [100], [0], 1.0, 50.0, 52.0)).HasField("error")
    stream.close()


# ---------------------------------------------------------------- finding 3: hellos and ids


def test_a_second_hello_even_for_another_worker_ends_the_stream_with_failed_precondition(channel, raw, redis_prefix):
    stream = Stream(channel, hello("w0"))
    assert not stream.send(timed_report(0, [0], [10], [0], 0.0, 50.0, 51.0)).HasField("error")
    stream.send_hello(hello("w1"))
    with pytest.raises(grpc.RpcError) as info:
        stream.send(timed_report(1, [0], [11], [0], 0.0, 50.0, 51.0))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith("hello:")
    assert raw.exists(f"{redis_prefix}hist:w1") == 0 and raw.exists(f"{redis_prefix}hist:w0") == 1


def test_a_hello_with_max_batch_size_zero_is_refused(channel):
    stub = controller_pb2_grpc.ControllerStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Connect(iter([controller_pb2.WorkerMessage(hello=hello(max_batch=0))]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("hello.max_batch_size:")


@pytest.mark.parametrize("bad", ["a:b", "a\nb", "a\x00b", "a b", "{tag}", "*", "é", "x" * 257])
def test_ids_outside_the_charset_never_reach_a_redis_key(channel, raw, redis_prefix, bad):
    stub = controller_pb2_grpc.ControllerStub(channel)
    for worker, report, field in [
        (hello(bad), timed_report(0, [0], [10], [0], 0.0, 5.0, 6.0), "worker.worker_id"),
        (hello("w0", profile=bad), timed_report(0, [0], [10], [0], 0.0, 5.0, 6.0), "worker.cost_profile_id"),
        (hello("w0"), controller_pb2.StepReport(requests=[outcome(bad)], verify_ms=5.0), "report.requests[0].request_id"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            stub.Decide(controller_pb2.DecideRequest(worker=worker, report=report), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field + ":"), info.value.details()
    stream = Stream(channel, hello("w0"))
    plan = stream.send(controller_pb2.StepReport(requests=[outcome("fine"), outcome(bad)], verify_ms=5.0))
    assert plan.error.field == "requests[1].request_id"
    stream.close()
    for key in raw.scan_iter(match=redis_prefix + "*"):
        assert KEY_SAFE.fullmatch(key.decode()[len(redis_prefix):]), key


# ---------------------------------------------------------------- the worker: Generate and its queue


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-hardening"))


@pytest.fixture(scope="module")
def worker(tiny):
    from smartspec.worker.engine import EngineConfig
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.server import WorkerOptions, WorkerServer

    options = WorkerOptions(engine=EngineConfig(max_batch_size=2, max_context_tokens=128, max_queue=2,
                                                token_budget=128, max_k=4),
                            local_policy="fixed:3", profile_steps=0, default_max_tokens=8)
    server = WorkerServer(tiny, make_proposer("ngram"), options)
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    channel.close()
    server.stop(0)


def raw_generate(channel, payload: bytes):
    """Generate with the request's bytes as given (no client-side serialisation)."""
    call = channel.unary_stream("/smartspec.v1.Generation/Generate", request_serializer=None,
                                response_deserializer=gen.GenerateResponse.FromString)
    return list(call(payload, timeout=30))


def _string_field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


@pytest.mark.parametrize("payload, field", [
    (_string_field(1, b"t5 \xff t6"), "prompt"),
    (_string_field(1, b"t5") + _string_field(7, b"\xc3\x28"), "stop[0]"),
    (_string_field(1, b"t5") + _string_field(7, b"ok") + _string_field(7, b"\xed\xa0\x80"), "stop[1]"),
    (_string_field(2, _string_field(1, b"user") + _string_field(2, b"t5 \x80")), "messages[0].content"),
    (_string_field(2, _string_field(1, b"user") + _string_field(2, b"t5"))
     + _string_field(2, _string_field(1, b"\xfe") + _string_field(2, b"t6")), "messages[1].role"),
    (_string_field(1, b"t5") + _string_field(9, b"id-\xff"), "request_id"),
    (b"\x0a\x7f", "request"),          # a length running past the end: not a message at all
])
def test_invalid_utf8_in_generate_is_invalid_argument_naming_the_field(worker, payload, field):
    with pytest.raises(grpc.RpcError) as info:
        raw_generate(worker, payload)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":"), info.value.details()
    # the worker keeps serving, and the same route decodes valid bytes as usual
    good = gen.GenerateRequest(prompt="t5 t6 t7", max_tokens=3, ignore_eos=True).SerializeToString()
    responses = raw_generate(worker, good)
    assert responses[-1].result.usage.completion_tokens == 3


@pytest.mark.parametrize("bad", ["a:b", "a\nb", "a\x00b", "a b", "x" * 129])
def test_generate_request_ids_follow_the_controllers_charset(worker, bad):
    from smartspec.v1 import generation_pb2_grpc

    stub = generation_pb2_grpc.GenerationStub(worker)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(gen.GenerateRequest(prompt="t5", max_tokens=1, request_id=bad), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request_id:"), info.value.details()
    ok = list(stub.Generate(gen.GenerateRequest(prompt="t5", max_tokens=1, request_id="ok-id_1.2/x@y"), timeout=30))
    assert ok[-1].result.request_id == "ok-id_1.2/x@y"


def test_queue_full_message_never_counts_more_waiting_than_max_queue(tiny):
    """All submissions sit in the inbox of an engine whose loop has not started: the worker counted
    them all as queued (4 "queued" with max_queue 2). Now: slots first, then the queue."""
    from smartspec.worker.engine import Engine, EngineConfig, QueueFullError
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.sequence import GenerationRequest
    from smartspec.worker.steps import StaticPlanner

    engine = Engine(tiny, make_proposer("ngram"), EngineConfig(max_batch_size=2, max_context_tokens=64, max_queue=2,
                                                               token_budget=64, max_k=2), StaticPlanner(0))
    for i in range(4):
        engine.submit(GenerationRequest(f"r{i}", (5, 6, 7), 2))
    with pytest.raises(QueueFullError) as info:
        engine.submit(GenerationRequest("one-too-many", (5, 6, 7), 2))
    message = str(info.value)
    waiting = int(re.search(r"(\d+) requests wait", message).group(1))
    assert waiting == 2 and "max_queue 2" in message and "all 2 slots" in message, message
    engine.stop(0)


def test_a_request_that_has_streamed_a_token_counts_as_running(tiny):
    """GetWorkerInfo's running count was published at the top of the loop and after the step, so a
    client that had its first token could still see its request uncounted (a CI failure: 5 of 8
    streaming requests counted). Counted here at the instant each first token is handed over."""
    from smartspec.worker.engine import Engine, EngineConfig
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.sequence import GenerationRequest, TokenDelta
    from smartspec.worker.steps import StaticPlanner

    engine = Engine(tiny, make_proposer("ngram"), EngineConfig(max_batch_size=4, max_context_tokens=64, max_queue=4,
                                                               token_budget=64, max_k=2), StaticPlanner(0))
    seen_at_first_token: dict[str, int] = {}
    handles = [engine.submit(GenerationRequest(f"r{i}", (5, 6, 7, 8), 3)) for i in range(3)]
    for handle in handles:
        def put(event, handle=handle, put=handle._put):
            if isinstance(event, TokenDelta) and handle.request.request_id not in seen_at_first_token:
                seen_at_first_token[handle.request.request_id] = engine.snapshot().running
            put(event)
        handle._put = put
    engine.start()
    try:
        for handle in handles:
            handle.result(timeout=60)
    finally:
        engine.stop(0)
    assert seen_at_first_token == {"r0": 3, "r1": 3, "r2": 3}, seen_at_first_token


def test_a_real_workers_reports_all_pass_the_new_bounds(tiny, server):
    """The bounds must not refuse what a real worker sends: a tiny-model worker with a startup
    profile, chunked prefill (a prompt longer than the token budget), prompt lookup's look-ahead and
    concurrent requests, planned by the controller; not one report is rejected."""
    from concurrent.futures import ThreadPoolExecutor

    from smartspec.v1 import generation_pb2_grpc
    from smartspec.worker.engine import EngineConfig
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.server import WorkerOptions, WorkerServer

    options = WorkerOptions(engine=EngineConfig(max_batch_size=3, max_context_tokens=128, max_queue=4,
                                                token_budget=24, max_k=4),
                            controller=server.address, profile_steps=1, default_max_tokens=12,
                            worker_id="real-worker", proposer_name="ngram")
    worker = WorkerServer(tiny, make_proposer("ngram"), options)
    port = worker.start()
    registry = server.metrics.registry
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            prompts = ["t7 t19 t33 t41 " * 10, "t5 t6 t7 t5 t6 t7", "t90 t91", "t12 t13 t14 t15 " * 3]
            with ThreadPoolExecutor(len(prompts)) as pool:
                done = list(pool.map(lambda p: list(stub.Generate(gen.GenerateRequest(
                    prompt=p, max_tokens=12, ignore_eos=True, request_id=f"id-{len(p)}"), timeout=120)), prompts))
            assert all(responses[-1].result.usage.completion_tokens == 12 for responses in done)
    finally:
        worker.stop(0)
    steps = sum(s.value for m in registry.collect() if m.name == "smartspec_controller_steps" for s in m.samples
                if s.name.endswith("_total"))
    rejected = {s.labels["field"]: s.value for m in registry.collect()
                if m.name == "smartspec_controller_rejected_reports" for s in m.samples if s.name.endswith("_total")}
    assert steps > 10 and not any(rejected.values()), (steps, rejected)


def test_the_batch_id_check_agrees_with_the_one_by_one_check():
    """core/ids.py's fast path (all ids at once) and its walk (one id, naming the problem) agree."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from smartspec.core.ids import all_valid, id_problem

    alphabet = st.sampled_from(list("abzAZ09._/@+=~-") + [",", ":", " ", "\n", "\x00", "é", "*", "{"])
    one_id = st.one_of(st.text(alphabet, max_size=6), st.text(st.sampled_from("xy"), min_size=250, max_size=260))

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(st.lists(one_id, max_size=6))
    def agree(ids):
        assert all_valid(ids) == all(id_problem(i) is None for i in ids), ids

    agree()


# ------------------------------------- issue 13, second pass: the controller's RPCs and invalid UTF-8

def _spoiled(message, marker: bytes, bad: bytes) -> bytes:
    """`message`'s bytes with the string `marker` replaced by `bad` (same length: every length
    prefix stays right), e.g. invalid UTF-8 in one string field."""
    assert len(marker) == len(bad)
    data = message.SerializeToString()
    assert data.count(marker) == 1
    return data.replace(marker, bad)


def _raw_unary(channel, path: str, response_class):
    return channel.unary_unary(path, request_serializer=None, response_deserializer=response_class.FromString)


def _raw_connect(channel, messages):
    call = channel.stream_stream("/smartspec.v1.Controller/Connect", request_serializer=None,
                                 response_deserializer=controller_pb2.StepPlan.FromString)
    return call(iter(messages), timeout=30)


def test_invalid_utf8_in_a_report_gets_an_error_plan_naming_the_field_and_the_stream_goes_on(channel):
    good_hello = controller_pb2.WorkerMessage(hello=hello("w0")).SerializeToString()
    good = controller_pb2.WorkerMessage(report=timed_report(0, [1], [10], [0], 1.0, 2.0, 4.0))
    bad = _spoiled(controller_pb2.WorkerMessage(report=timed_report(1, [1], [10], [0], 1.0, 2.0, 4.0)),
                   b"r0", b"\xffr")
    bad_trace = controller_pb2.WorkerMessage(report=timed_report(2, [1], [10], [0], 1.0, 2.0, 4.0))
    bad_trace.report.trace_context["traceparent"] = "XY"
    then = controller_pb2.WorkerMessage(report=timed_report(3, [1], [10], [0], 1.0, 2.0, 4.0))
    plans = list(_raw_connect(channel, [good_hello, good.SerializeToString(), bad,
                                        _spoiled(bad_trace, b"XY", b"\xc3\x28"), then.SerializeToString()]))
    assert [p.step_index for p in plans] == [0, 1, 2, 3]
    assert not plans[0].HasField("error") and not plans[3].HasField("error")
    for plan, field in [(plans[1], "requests[0].request_id"), (plans[2], "trace_context.value")]:
        assert plan.error.field == field, plan.error
        assert plan.error.grpc_status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "UTF-8" in plan.error.message


def test_invalid_utf8_in_the_hello_ends_the_stream_with_invalid_argument_and_a_later_stream_is_fine(channel):
    bad = _spoiled(controller_pb2.WorkerMessage(hello=hello("w-XY")), b"XY", b"\xed\xa0")
    with pytest.raises(grpc.RpcError) as info:
        list(_raw_connect(channel, [bad]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("hello.worker_id:"), info.value.details()
    with pytest.raises(grpc.RpcError) as info:   # not a message at all
        list(_raw_connect(channel, [b"\x0a\x7f"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request:"), info.value.details()
    stream = Stream(channel, hello("w-ok"))
    assert not stream.send(timed_report(0, [1], [10], [0], 1.0, 2.0, 4.0)).HasField("error")
    stream.close()


@pytest.mark.parametrize("path, payload, field, response", [
    ("/smartspec.v1.Controller/Decide",
     _spoiled(controller_pb2.DecideRequest(worker=hello("w-XY"), report=timed_report(0, [1], [10], [0], 1, 2, 4)),
              b"XY", b"\xff\xff"), "worker.worker_id", controller_pb2.StepPlan),
    ("/smartspec.v1.Controller/Decide",
     _spoiled(controller_pb2.DecideRequest(worker=hello("w0"), report=timed_report(0, [1], [10], [0], 1, 2, 4)),
              b"r0", b"r\x80"), "report.requests[0].request_id", controller_pb2.StepPlan),
    ("/smartspec.v1.Admin/SetPolicy",
     _spoiled(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(name="fiXYd")), b"XY", b"\xc3\x28"),
     "policy.name", admin_pb2.ActivePolicy),
    ("/smartspec.v1.Admin/SetPolicy",
     _spoiled(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(
         name="fixed", parameters={"kXY": common_pb2.ParameterValue(int_value=2)})), b"kXY", b"k\xc3\x28"),
     "policy.parameters.key", admin_pb2.ActivePolicy),
    ("/smartspec.v1.Admin/GetPolicy", b"\x0a\x7f", "request", admin_pb2.ActivePolicy),
    ("/smartspec.v1.Admin/ListPolicies", b"\x0a\x7f", "request", admin_pb2.ListPoliciesResponse),
    ("/smartspec.v1.Admin/GetStatus", b"\x0a\x02\xff\xfe\x12", "request", admin_pb2.ControllerStatus),
])
def test_undecodable_unary_requests_are_invalid_argument_naming_the_field(channel, path, payload, field, response):
    call = _raw_unary(channel, path, response)
    with pytest.raises(grpc.RpcError) as info:
        call(payload, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(field + ":"), info.value.details()
    # the same route still decodes valid bytes
    admin = admin_pb2_grpc.AdminStub(channel)
    assert "fixed" in [p.name for p in admin.ListPolicies(admin_pb2.ListPoliciesRequest(), timeout=30).policies]
    assert _raw_unary(channel, "/smartspec.v1.Admin/GetPolicy", admin_pb2.ActivePolicy)(b"", timeout=30).version >= 0


def test_the_wire_walk_lives_in_the_core_and_the_worker_uses_it():
    from smartspec.core import wire_check
    from smartspec.worker import requests

    assert not hasattr(requests, "_invalid_utf8_field")
    data = _spoiled(gen.GenerateRequest(prompt="t5", stop=["a", "XY"]), b"XY", b"\xff\xff")
    assert wire_check.invalid_utf8_field(data, gen.GenerateRequest.DESCRIPTOR) == "stop[1]"
    error = requests.decode_generate_request(data)
    assert isinstance(error, requests.InvalidRequest) and error.field == "stop[1]"
    assert wire_check.varint_at(controller_pb2.WorkerMessage(report=controller_pb2.StepReport(
        step_index=300)).SerializeToString(), (2, 1)) == 300


# ------------------------------------------------------------- trace_context and cost override bounds

@pytest.mark.parametrize("trace, what", [
    ({f"k{i}": "v" for i in range(9)}, "entries"),
    ({"k" * 65: "v"}, "keys"),
    ({"traceparent": "v" * 513}, "values"),
])
def test_an_oversized_trace_context_is_refused(channel, trace, what):
    report = timed_report(0, [1], [10], [0], 1.0, 2.0, 4.0)
    report.trace_context.update(trace)
    with pytest.raises(grpc.RpcError) as info:
        controller_pb2_grpc.ControllerStub(channel).Decide(
            controller_pb2.DecideRequest(worker=hello(), report=report), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("report.trace_context:") and what in info.value.details()
    stream = Stream(channel, hello("w-trace"))
    plan = stream.send(report)
    assert plan.error.field == "trace_context"
    ok = timed_report(1, [1], [10], [0], 1.0, 2.0, 4.0)
    ok.trace_context.update({f"k{i}": "v" * 512 for i in range(8)})
    assert not stream.send(ok).HasField("error")
    stream.close()


def test_the_workers_own_trace_context_is_within_the_bound():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider

    from smartspec.controller.validation import validate_trace_context
    from smartspec.core import tracing

    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    span = TracerProvider().get_tracer("t").start_span("step")
    carrier = controller_pb2.StepReport().trace_context
    saved, tracing._propagator = tracing._propagator, TraceContextTextMapPropagator()  # what enabling sets
    try:
        tracing.inject(span, carrier)   # the worker's one write into a report (controller_link.py)
    finally:
        tracing._propagator = saved
    span.end()
    assert "traceparent" in carrier and len(carrier) <= 2   # traceparent (+ tracestate: W3C caps it at 512)
    validate_trace_context(carrier)


@pytest.mark.parametrize("override", [
    common_pb2.CostModel(),
    common_pb2.CostModel(c_fixed_ms=0.0, c_tok_ms=0.0),
    common_pb2.CostModel(d_tok_ms=1.0, c_spec_ms=2.0),    # only speculation costs: a k = 0 step is free
])
def test_a_cost_override_where_a_step_takes_0_ms_is_refused(channel, override):
    request = controller_pb2.DecideRequest(worker=hello(), report=timed_report(0, [1], [10], [0], 1, 2, 4),
                                           cost_model_override=override)
    with pytest.raises(grpc.RpcError) as info:
        controller_pb2_grpc.ControllerStub(channel).Decide(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("cost_model_override:"), info.value.details()
    assert "0 ms" in info.value.details()
    request.cost_model_override.c_fixed_ms = 1.0
    assert not controller_pb2_grpc.ControllerStub(channel).Decide(request, timeout=30).HasField("error")

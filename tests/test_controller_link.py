"""The worker's controller link against a real controller (real Redis, loopback gRPC).

The link alone is driven with the step facts an engine would report; the slow tests run a whole
worker with the real model: plans applied, the controller killed mid-generation (serving goes on,
fallbacks are counted) and restarted on the same port (the link reconnects).
"""

from __future__ import annotations

import itertools
import logging
import random
import socket
import threading
import time

import grpc
import pytest

from smartspec.controller.server import ControllerServer
from smartspec.v1 import admin_pb2, admin_pb2_grpc, common_pb2, controller_pb2
from smartspec.v1 import generation_pb2 as pb
from smartspec.v1 import generation_pb2_grpc
from smartspec.worker.controller_link import ControllerLink, LinkConfig, backoff_delay
from smartspec.worker.steps import SpeculationQuery, RequestFacts, StepFacts


def wait_until(condition, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hello(worker_id: str = "link-test") -> controller_pb2.WorkerHello:
    return controller_pb2.WorkerHello(worker_id=worker_id, proposer_kind=common_pb2.PROPOSER_KIND_NGRAM,
                                      max_speculation_length=4, max_batch_size=4)


def prefill_step(index: int, request_id: str) -> StepFacts:
    return StepFacts(index, (RequestFacts(request_id, 0, 0, 0, context_tokens=40, prefill_tokens=39),),
                     draft_ms=0.0, verify_ms=90.0, total_ms=91.0, batched_tokens=39, queued_requests=0)


def set_fixed_policy(address: str, k: int) -> None:
    with grpc.insecure_channel(address) as channel:
        admin_pb2_grpc.AdminStub(channel).SetPolicy(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(
            name="fixed", parameters={"k": common_pb2.ParameterValue(int_value=k)})), timeout=10)


@pytest.fixture
def controller(redis_url, redis_prefix):
    server = ControllerServer(0, redis_url, redis_prefix, redis_retry_after_s=0.0)
    server.start()
    yield server
    server.stop(0)


def test_backoff_grows_is_capped_and_jittered():
    rng = random.Random(1)
    delays = [backoff_delay(attempt, 0.1, 2.0, rng) for attempt in range(12)]
    for attempt, delay in enumerate(delays):
        ceiling = min(2.0, 0.1 * 2 ** attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 2.0
    assert len({round(d, 6) for d in delays[6:]}) > 1          # capped, but not in lockstep


def test_without_a_controller_every_step_falls_back_and_nothing_blocks():
    link = ControllerLink(LinkConfig(f"127.0.0.1:{closed_port()}", plan_deadline_ms=5000, fallback_k=2,
                                     connect_timeout_s=0.2), hello())
    link.start()
    try:
        started = time.monotonic()
        for step in range(3):
            link.observe(prefill_step(step, f"r{step}"))       # not connected: returns at once
            assert link.plan(step + 1, [SpeculationQuery("r0", 41)], 0) == {"r0": 2}
        assert time.monotonic() - started < 2.0                 # far below one 5 s plan deadline
        assert link.fallback_steps == 3 and not link.connected
    finally:
        link.close()


def test_plan_from_the_controller_is_applied(controller):
    set_fixed_policy(controller.address, 3)
    link = ControllerLink(LinkConfig(controller.address, plan_deadline_ms=5000, fallback_k=0), hello())
    link.start()
    try:
        wait_until(lambda: link.connected, what="link connected")
        link.observe(prefill_step(0, "a"))
        assert link.plan(1, [SpeculationQuery("a", 40)], 0) == {"a": 3}
        assert link.fallback_steps == 0 and link.plans_applied == 1
        # A request the plan did not cover (admitted after the report) is planned here with the
        # plan's policy, not left at the fallback k.
        link.observe(prefill_step(1, "b"))
        assert link.plan(2, [SpeculationQuery("b", 40), SpeculationQuery("c", 12)], 0) == {"b": 3, "c": 3}
    finally:
        link.close()


def test_what_prompt_lookup_can_offer_reaches_the_controller_and_caps_the_plan(controller):
    """proposable_tokens travels the real stream: under fixed k = 3 a request with no match is not
    asked, one with 2 tokens to offer is asked for 2, one without the figure gets 3."""
    set_fixed_policy(controller.address, 3)
    link = ControllerLink(LinkConfig(controller.address, plan_deadline_ms=5000, fallback_k=0), hello())
    link.start()
    try:
        wait_until(lambda: link.connected, what="link connected")
        facts = [RequestFacts("dry", 0, 0, 0, 40, requested_tokens=3, proposable_tokens=0),
                 RequestFacts("short", 3, 3, 3, 44, requested_tokens=3, proposable_tokens=2),
                 RequestFacts("unknown", 3, 3, 3, 44, requested_tokens=3)]
        link.observe(StepFacts(0, tuple(facts), draft_ms=1.0, verify_ms=50.0, total_ms=52.0, batched_tokens=10,
                               queued_requests=0))
        queries = [SpeculationQuery("dry", 40), SpeculationQuery("short", 44), SpeculationQuery("unknown", 44)]
        assert link.plan(1, queries, 0) == {"dry": 0, "short": 2, "unknown": 3}
    finally:
        link.close()


def test_a_late_plan_is_re_solved_until_its_basis_is_too_old(controller):
    set_fixed_policy(controller.address, 3)
    link = ControllerLink(LinkConfig(controller.address, plan_deadline_ms=0.0, fallback_k=1, basis_max_age_s=0.5),
                          hello("late"))
    link.start()
    try:
        wait_until(lambda: link.connected, what="link connected")
        link.observe(prefill_step(0, "a"))                      # no wait at all: the plan is late
        wait_until(lambda: link._latest is not None, what="the late plan")
        # The engine ran step 1 meanwhile: the answer to report 0 plans step 2, on time ...
        assert link.plan(2, [SpeculationQuery("a", 41)], 0) == {"a": 3}
        assert (link.plans_applied, link.late_steps, link.fallback_steps) == (1, 0, 0)
        # ... and, re-solved, step 3 too (late), new requests included ...
        assert link.plan(3, [SpeculationQuery("a", 42), SpeculationQuery("new", 9)], 0) == {"a": 3, "new": 3}
        assert (link.plans_applied, link.late_steps, link.fallback_steps) == (1, 1, 0)
        # ... until the basis is older than basis_max_age_s: then each request keeps the k it last
        # ran and a request never planned gets the fallback k.
        time.sleep(0.6)
        assert link.plan(4, [SpeculationQuery("a", 43), SpeculationQuery("newer", 9)], 0) == {"a": 3, "newer": 1}
        assert link.fallback_steps == 1
    finally:
        link.close()


def test_the_step_after_a_report_does_not_wait_for_its_plan(controller, monkeypatch):
    """Report 1's answer is held back inside the real controller: observe(1) still returns at
    once (it only needs the answer to report 0), and step 2 is planned from that answer."""
    set_fixed_policy(controller.address, 2)
    release = threading.Event()
    real_step = controller.decider.step

    def gated_step(session, report, **kwargs):
        if report.step_index >= 1:
            release.wait(timeout=30)
        return real_step(session, report, **kwargs)

    monkeypatch.setattr(controller.decider, "step", gated_step)
    link = ControllerLink(LinkConfig(controller.address, plan_deadline_ms=20_000, fallback_k=0), hello("ahead"))
    link.start()
    try:
        wait_until(lambda: link.connected, what="link connected")
        link.observe(prefill_step(0, "a"))                      # first report on the stream: waits for its plan
        assert link._latest.step_index == 0
        decode = StepFacts(1, (RequestFacts("a", 2, 1, 2, 42, requested_tokens=2),), draft_ms=0.0,
                           verify_ms=80.0, total_ms=81.0, batched_tokens=3, queued_requests=0)
        started = time.monotonic()
        link.observe(decode)
        assert time.monotonic() - started < 10.0               # far below the 20 s deadline: no wait
        assert link._latest.step_index == 0                    # report 1 is still unanswered
        assert link.plan(2, [SpeculationQuery("a", 42)], 0) == {"a": 2}
        assert link.fallback_steps == 0 and link.plans_applied == 1
        # The local book already holds report 1's evidence (the controller has not seen it yet).
        assert link.book.requests["a"].tested == 2
    finally:
        release.set()
        link.close()


def test_plan_with_an_error_falls_back(controller):
    set_fixed_policy(controller.address, 3)
    link = ControllerLink(LinkConfig(controller.address, plan_deadline_ms=5000, fallback_k=1), hello("bad"))
    link.start()
    try:
        wait_until(lambda: link.connected, what="link connected")
        link.observe(prefill_step(0, "a"))
        assert link.plan(1, [SpeculationQuery("a", 40)], 0) == {"a": 3}
        impossible = StepFacts(1, (RequestFacts("a", proposed_tokens=2, accepted_tokens=5, tested_positions=5,
                                                context_tokens=46),),
                               draft_ms=1.0, verify_ms=90.0, total_ms=91.0, batched_tokens=3, queued_requests=0)
        link.observe(impossible)
        wait_until(lambda: link._latest.step_index == 1, what="the answer to the bad report")
        assert link._latest.HasField("error")
        # The error plan is not applied: the last good basis is re-solved; the stream stays up.
        assert link.plan(2, [SpeculationQuery("a", 46)], 0) == {"a": 3}
        assert link.late_steps == 1 and link.fallback_steps == 0 and link.connected
    finally:
        link.close()


class RecordingLink(ControllerLink):
    """A link that notes when each Connect attempt starts."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attempts: list[float] = []

    def _stream_once(self):
        self.attempts.append(time.monotonic())
        return super()._stream_once()


@pytest.mark.parametrize("token", ["not-the-token", ""])
def test_a_refused_token_backs_off_on_the_long_schedule_and_is_logged_rarely(redis_url, redis_prefix, caplog, token):
    from smartspec.core.security import ServerSecurity

    caplog.set_level(logging.INFO, logger="smartspec.worker.controller_link")
    server = ControllerServer(0, redis_url, redis_prefix, security=ServerSecurity(auth_token="the-real-token"))
    server.start()
    ticks = itertools.count()          # a fake clock for the log's rate limit: one second per refusal
    # Small schedules so the test is quick; the transient one is tiny, so a refusal treated as
    # transient (or a backoff reset after every refused stream: the old bug) would show at once.
    config = LinkConfig(server.address, plan_deadline_ms=5000, fallback_k=1, auth_token=token,
                        backoff_initial_s=0.001, backoff_max_s=0.002,
                        auth_backoff_initial_s=0.1, auth_backoff_max_s=0.8, auth_log_interval_s=3.0)
    link = RecordingLink(config, hello("refused"), rng=random.Random(3), clock=lambda: float(next(ticks)))
    link.start()
    try:
        wait_until(lambda: link.refusals >= 7, what="seven refused attempts")
    finally:
        link.close()
        server.stop(0)
    rng = random.Random(3)                   # the link's draws, in the same order
    expected = [backoff_delay(i, 0.1, 0.8, rng) for i in range(link.refusals)]
    gaps = [b - a for a, b in zip(link.attempts, link.attempts[1:])]
    assert len(gaps) >= 6
    for gap, delay in zip(gaps, expected):
        assert gap >= delay - 0.002           # each wait at least its (growing) backoff
    # 0.05-0.1 s, then doubling to the cap (0.4-0.8 s from the 4th wait on); an attempt itself costs
    # well under 0.4 s here, so a schedule reset after each refusal (the old bug) would fail this
    assert expected[0] <= 0.1 and all(0.4 <= d <= 0.8 for d in expected[3:len(gaps)])
    assert min(gaps[3:]) >= 0.4
    assert link.connections == 0 and not link.connected

    lines = [r.getMessage() for r in caplog.records if r.name == "smartspec.worker.controller_link"]
    refusal_lines = [line for line in lines if "refused this worker" in line]
    assert len(refusal_lines) == -(-link.refusals // 3)       # refusals at fake t = 0, 3, 6, ... are said
    assert refusal_lines == [line for line in lines]          # nothing else: no per-attempt warnings
    assert "UNAUTHENTICATED" in refusal_lines[0] and "1 attempt refused" in refusal_lines[0]
    assert "Sent a bearer token" in refusal_lines[0] if token else "Sent no token" in refusal_lines[0]
    assert "--controller-token" in refusal_lines[0]
    if len(refusal_lines) > 1:
        assert "3 attempts refused" in refusal_lines[1]
    assert "the-real-token" not in caplog.text and (not token or token not in caplog.text)


def test_a_transient_failure_keeps_the_short_schedule():
    link = RecordingLink(LinkConfig(f"127.0.0.1:{closed_port()}", connect_timeout_s=0.05, backoff_initial_s=0.01,
                                    backoff_max_s=0.02), hello("gone"))
    link.start()
    try:
        wait_until(lambda: len(link.attempts) >= 4, timeout=10, what="four attempts")
    finally:
        link.close()
    assert link.refusals == 0


# ---- whole worker, real model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from smartspec.worker.model import load_model

    return load_model()


def start_worker(model, controller_address: str, deadline_ms: float = 5000):
    from smartspec.worker.engine import EngineConfig
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.server import WorkerOptions, WorkerServer

    options = WorkerOptions(
        worker_id="link-e2e",
        engine=EngineConfig(max_batch_size=2, max_context_tokens=256, token_budget=256, max_k=4, fallback_k=0),
        controller=controller_address,
        plan_deadline_ms=deadline_ms,
        profile_steps=0,
    )
    server = WorkerServer(model, make_proposer("ngram"), options)
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, generation_pb2_grpc.GenerationStub(channel)


def info(stub) -> pb.WorkerInfo:
    return stub.GetWorkerInfo(pb.GetWorkerInfoRequest(), timeout=10)


def result_of(call) -> pb.GenerationResult:
    return [m.result for m in call if m.HasField("result")][0]


@pytest.mark.slow
def test_worker_runs_the_controllers_plan(model, controller):
    set_fixed_policy(controller.address, 3)
    server, channel, stub = start_worker(model, controller.address)
    try:
        wait_until(lambda: info(stub).controller_connected, what="worker connected")
        result = result_of(stub.Generate(pb.GenerateRequest(prompt="1, 2, 3, 4,", max_tokens=20, ignore_eos=True)))
        ks = list(result.speculation.speculation_lengths)
        # Every step runs the planned k = 3, or 0 where prompt lookup reported nothing to offer (the
        # planner caps k at proposable_tokens), except where fewer tokens were left to generate
        # (k is clamped to tokens_left - 1, which is below 3 in at most the last 3 steps).
        assert ks[0] == 3 and all(k in (0, 3) for k in ks[:-3]) and all(k <= 3 for k in ks)
        assert result.speculation.proposed_tokens == result.speculation.requested_tokens  # no dry asks
        assert info(stub).fallback_steps == 0
        # Every step's plan wait (mostly none) is exported.
        registry = server.metrics.registry
        wait_until(lambda: registry.get_sample_value("smartspec_worker_plan_wait_seconds_count")
                   == server.engine.snapshot().steps, timeout=10, what="every step's plan wait recorded")
    finally:
        channel.close()
        server.stop(0)


@pytest.mark.slow
def test_controller_killed_mid_run_then_restarted_on_the_same_port(model, redis_url, redis_prefix):
    first = ControllerServer(0, redis_url, redis_prefix, redis_retry_after_s=0.0)
    port = first.start()
    set_fixed_policy(first.address, 2)
    server, channel, stub = start_worker(model, first.address)
    try:
        wait_until(lambda: info(stub).controller_connected, what="worker connected")
        call = stub.Generate(pb.GenerateRequest(prompt="a b c d e f g", max_tokens=40, ignore_eos=True))
        for _ in range(3):
            next(call)
        first.stop(0)                                            # the controller dies mid-generation
        result = result_of(call)
        assert result.finish_reason == pb.FINISH_REASON_LENGTH
        assert result.usage.completion_tokens == 40               # serving went on
        after_kill = info(stub)
        assert not after_kill.controller_connected
        # Meanwhile the worker re-solved the last basis it got (younger than basis_max_age_s).
        assert server.link.late_steps > 0
        assert server.metrics.registry.get_sample_value("smartspec_worker_fallback_steps_total") == \
            after_kill.fallback_steps

        second = ControllerServer(port, redis_url, redis_prefix, redis_retry_after_s=0.0)
        second.start()
        try:
            wait_until(lambda: info(stub).controller_connected, timeout=20, what="reconnect")
            fallbacks = info(stub).fallback_steps
            result = result_of(stub.Generate(pb.GenerateRequest(prompt="1, 2, 3, 4,", max_tokens=12,
                                                                ignore_eos=True)))
            ks = list(result.speculation.speculation_lengths)
            # the policy in Redis survived the restart: k = 2 wherever prompt lookup has a match (it
            # has one at the first step of this prompt), 0 where it has none, less only at the end
            assert ks[0] == 2 and all(k in (0, 2) for k in ks[:-2]) and all(k <= 2 for k in ks)
            assert info(stub).fallback_steps == fallbacks         # plans arrive again
            assert server.link.connections == 2
        finally:
            second.stop(0)
    finally:
        channel.close()
        server.stop(0)

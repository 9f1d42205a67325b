"""Property-based tests (hypothesis) of every RPC: the controller's Connect stream and Decide, the
Admin service (SetPolicy, GetPolicy, ListPolicies, GetStatus) and the worker's Generate.

Strategies draw mostly VALID messages and a share of hostile ones (one field broken at a time, so
the field the answer must name is known), and each property asserts:

- valid -> served: OK, a plan per report with the unfinished request ids in order and every k
  within the worker's limits (and its look-ahead); for Generate one result after the deltas, and
  for greedy requests the same text and token ids as a non-speculative worker gives;
- invalid -> the right status naming the field (INVALID_ARGUMENT, FAILED_PRECONDITION for a
  second hello or a stale expected_version), never UNKNOWN or INTERNAL; a stream survives a bad
  report (an error plan) and the server survives everything;
- a concurrent healthy stream is untouched: a Connect stream of its own (and, for Generate, a
  greedy request repeated in a loop) runs in a background thread throughout, and every one of its
  answers is checked.

Cases per RPC, derandomized (CI sees the same cases every run, up to a few that hypothesis
adapts), and the valid share, counted per message and asserted >= 70% (printed with `pytest -s`):

    Connect      60 streams, ~177 messages (hellos, reports, empty messages, second hellos): ~93% valid
    Decide       100 requests: ~80% valid
    SetPolicy    80 requests: ~79% valid (the hostile ones include stale expected_versions)
    GetPolicy, ListPolicies, GetStatus: 15 requests each (empty, or unknown fields only): all valid
    Generate     60 requests: ~88% valid (hostile ones include raw bytes with invalid UTF-8);
                 ~38 greedy ones compared token for token with the plain worker

The whole file runs in ~15 s. With SMARTSPEC_PROPERTIES_RANDOM=1 (fresh cases) the shares were
71-93% over three runs; SMARTSPEC_PROPERTIES_SCALE=5 (5x the cases) passed as well.
Raw bytes that are no protobuf message at all are sent to Generate only: the controller's services
are still registered with the generated deserializers (controller/server.py), which answer
undecodable bytes with INTERNAL.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import threading
import time
import uuid
import zlib
from collections import Counter
from typing import Any

import grpc
import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from smartspec.controller.history_table import HistoryTable
from smartspec.controller.server import ControllerServer
from smartspec.core.policies import default_registry
from smartspec.core.policies.base import ParameterType
from smartspec.v1 import admin_pb2, admin_pb2_grpc, common_pb2, controller_pb2, controller_pb2_grpc
from smartspec.v1 import generation_pb2 as gen
from smartspec.v1 import generation_pb2_grpc
from test_worker_server import run_generate as read_generate_stream
from wire import outcome

MIN_VALID_SHARE = 0.7
# Derandomized so CI sees the same cases every run; SMARTSPEC_PROPERTIES_RANDOM=1 explores new ones
# (the valid share is then printed, not asserted), SMARTSPEC_PROPERTIES_SCALE=5 runs 5x the cases.
DERANDOMIZE = os.environ.get("SMARTSPEC_PROPERTIES_RANDOM") != "1"
SCALE = float(os.environ.get("SMARTSPEC_PROPERTIES_SCALE", "1"))
COMMON = dict(deadline=None, database=None, derandomize=DERANDOMIZE, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
ID_ALPHABET = "abcxyzABZ0129._/@+=~-"
BAD_ID_CHARS = [":", "\n", "\x00", " ", "\t", "{", "}", "*", "?", "[", "é", "\u2028"]
CONTEXT_CAP = 1 << 24


SALT = st.binary(min_size=8, max_size=8)   # hashed with the content: equal messages still differ in kind


def roll_of(*messages) -> int:
    """Which kind of case to make of these messages, 0..99: a hash of their bytes. Every strategy
    draws the valid message AND its hostile variants, then picks by this roll, so the number of
    draws does not depend on the choice: hypothesis favours small numbers, near-copies of earlier
    examples and examples with fewer draws, and a drawn choice swung the valid share by +-20 points
    between runs. The hash spreads evenly and replays the same case for the same example."""
    data = b"".join(m if isinstance(m, bytes) else m.SerializeToString(deterministic=True) for m in messages)
    return zlib.crc32(data) % 100


def examples(count: int) -> int:
    return max(1, round(count * SCALE))


def record(counts: Counter, valid: bool) -> None:
    counts["valid" if valid else "hostile"] += 1
    event("valid" if valid else "hostile")


def check_share(name: str, counts: Counter) -> None:
    total = counts["valid"] + counts["hostile"]
    share = counts["valid"] / total
    print(f"\n{name}: {total} cases, {counts['valid']} valid ({share:.0%}), {counts['hostile']} hostile")
    assert total > 0
    if DERANDOMIZE:
        assert share >= MIN_VALID_SHARE, (name, dict(counts))


# ================================================================ strategies: the controller's messages

ids = st.text(ID_ALPHABET, min_size=1, max_size=12)


@st.composite
def bad_ids(draw) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(["", "x" * 257]))
    return draw(st.text(ID_ALPHABET, max_size=4)) + draw(st.sampled_from(BAD_ID_CHARS)) + draw(
        st.text(ID_ALPHABET, max_size=4))


@st.composite
def valid_hellos(draw) -> controller_pb2.WorkerHello:
    profile = []
    for _ in range(draw(st.integers(0, 2))):
        profile.append(common_pb2.ProfileSample(
            batch_size=draw(st.integers(1, 32)), speculation_length=draw(st.integers(0, 8)),
            context_tokens=draw(st.integers(0, 4096)), draft_ms=draw(st.floats(0, 200)),
            verify_ms=draw(st.floats(0.5, 2000))))
    return controller_pb2.WorkerHello(
        worker_id="w-" + draw(ids),   # never the healthy stream's id
        proposer_kind=draw(st.sampled_from(list(common_pb2.ProposerKind.values()))),
        max_speculation_length=draw(st.integers(0, 8)),
        max_batch_size=draw(st.integers(1, 12)),
        cost_profile_id=draw(st.sampled_from(["", "p-a", "p-b"])),
        profile=profile,
        model=draw(st.text(max_size=20)), proposer=draw(st.sampled_from(["ngram", "draft", ""])), device="cpu",
    )


@st.composite
def hostile_hello(draw, hello: controller_pb2.WorkerHello, prefix: str) -> tuple[controller_pb2.WorkerHello, str]:
    """One field of a valid hello broken; returns it with the field the answer must name."""
    bad = controller_pb2.WorkerHello()
    bad.CopyFrom(hello)
    choice = draw(st.sampled_from(["worker_id", "cost_profile_id", "max_speculation_length", "max_batch_size",
                                   "max_batch_size_big", "proposer_kind", "model", "profile"]))
    if choice == "worker_id":
        bad.worker_id = draw(bad_ids())
    elif choice == "cost_profile_id":
        bad.cost_profile_id = draw(bad_ids().filter(bool))
    elif choice == "max_speculation_length":
        bad.max_speculation_length = draw(st.integers(65, 2**32 - 1))
    elif choice == "max_batch_size":
        bad.max_batch_size = 0
    elif choice == "max_batch_size_big":
        choice = "max_batch_size"
        bad.max_batch_size = draw(st.integers(4097, 2**32 - 1))
    elif choice == "proposer_kind":
        bad.proposer_kind = draw(st.integers(5, 1000))
    elif choice == "model":
        bad.model = "m" * draw(st.integers(257, 400))
    else:
        del bad.profile[:]
        sample = common_pb2.ProfileSample(batch_size=4, speculation_length=2, context_tokens=100,
                                          draft_ms=1.0, verify_ms=50.0)
        field = draw(st.sampled_from(["batch_size", "speculation_length", "context_tokens", "draft_ms", "verify_ms"]))
        value = {"batch_size": draw(st.sampled_from([0, 4097])), "speculation_length": 65,
                 "context_tokens": CONTEXT_CAP + 1,
                 "draft_ms": draw(st.sampled_from([math.nan, -1.0, math.inf, 1e300])),
                 "verify_ms": draw(st.sampled_from([math.nan, -1.0, 60_001.0, 1.3e154]))}[field]
        setattr(sample, field, value)
        bad.profile.append(sample)
        return bad, f"{prefix}.profile[0].{field}"
    return bad, f"{prefix}.{choice}"


@st.composite
def valid_outcomes(draw, request_id: str, max_k: int) -> controller_pb2.RequestOutcome:
    requested = draw(st.integers(0, max_k))
    proposed = draw(st.integers(0, requested if requested else max_k))
    accepted = draw(st.integers(0, proposed))
    tested = accepted + (1 if accepted < proposed and draw(st.booleans()) else 0)
    context = draw(st.one_of(st.integers(1, 4096), st.integers(1, CONTEXT_CAP)))
    message = controller_pb2.RequestOutcome(
        request_id=request_id, proposed_tokens=proposed, accepted_tokens=accepted, tested_positions=tested,
        context_tokens=context, prefill_tokens=draw(st.integers(0, min(context, 2048))),
        finished=draw(st.booleans()), requested_tokens=requested)
    proposable = draw(st.none() | st.integers(0, max_k))
    if proposable is not None:
        message.proposable_tokens = proposable
    return message


step_ms = st.one_of(st.floats(0, 500), st.floats(0, 60_000))


@st.composite
def valid_reports(draw, hello: controller_pb2.WorkerHello, step: int | None = None) -> controller_pb2.StepReport:
    count = draw(st.integers(0, hello.max_batch_size))
    request_ids = draw(st.lists(ids, min_size=count, max_size=count, unique=True))
    return controller_pb2.StepReport(
        step_index=step if step is not None else draw(st.integers(0, 2**64 - 1)),
        requests=[draw(valid_outcomes(rid, hello.max_speculation_length)) for rid in request_ids],
        draft_ms=draw(step_ms), verify_ms=draw(step_ms), total_ms=draw(step_ms),
        batched_tokens=draw(st.integers(0, 4096) | st.integers(0, CONTEXT_CAP)),
        queued_requests=draw(st.integers(0, 100) | st.integers(0, CONTEXT_CAP)),
    )


@st.composite
def hostile_report(draw, report: controller_pb2.StepReport, hello: controller_pb2.WorkerHello,
                   prefix: str = "") -> tuple[controller_pb2.StepReport, str]:
    """One field of a valid report broken, and the field the answer must name."""
    bad = controller_pb2.StepReport()
    bad.CopyFrom(report)
    max_k = hello.max_speculation_length
    kinds = ["draft_ms", "verify_ms", "total_ms", "batched_tokens", "queued_requests", "requests"]
    if len(bad.requests):
        kinds += ["request_id", "duplicate", "proposed_tokens", "accepted_tokens", "tested_positions",
                  "requested_tokens", "context_tokens", "prefill_tokens", "proposable_tokens"] * 2
    kind = draw(st.sampled_from(kinds))
    if kind in ("draft_ms", "verify_ms", "total_ms"):
        setattr(bad, kind, draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-9, 60_000.5,
                                                 1.3e154, 1e300, 1.7e308])))
        return bad, prefix + kind
    if kind in ("batched_tokens", "queued_requests"):
        setattr(bad, kind, draw(st.integers(CONTEXT_CAP + 1, 2**32 - 1)))
        return bad, prefix + kind
    if kind == "requests":   # one more outcome than the hello allows
        while len(bad.requests) <= hello.max_batch_size:   # "extra-N" is outside the drawn ids' alphabet
            bad.requests.append(outcome(f"extra-{len(bad.requests)}"))
        return bad, prefix + "requests"
    index = draw(st.integers(0, len(bad.requests) - 1))
    target = bad.requests[index]
    where = f"{prefix}requests[{index}]"
    if kind == "request_id":
        target.request_id = draw(bad_ids())
        return bad, f"{where}.request_id"
    if kind == "duplicate":
        if len(bad.requests) < 2:
            target.request_id = draw(bad_ids())
            return bad, f"{where}.request_id"
        first = draw(st.integers(0, len(bad.requests) - 2))
        later = draw(st.integers(first + 1, len(bad.requests) - 1))
        bad.requests[later].request_id = bad.requests[first].request_id
        return bad, f"{prefix}requests[{later}].request_id"
    if kind == "proposed_tokens":
        target.proposed_tokens = draw(st.integers(max_k + 1, 2**32 - 1))
    elif kind == "accepted_tokens":
        if target.proposed_tokens >= 2**32 - 1:
            return bad, f"{where}.accepted_tokens"
        target.accepted_tokens = draw(st.integers(target.proposed_tokens + 1, 2**32 - 1))
    elif kind == "tested_positions":
        target.tested_positions = draw(st.integers(target.accepted_tokens + 2, 2**32 - 1))
    elif kind == "requested_tokens":
        target.requested_tokens = draw(st.integers(max_k + 1, 2**32 - 1))
    elif kind == "context_tokens":
        target.context_tokens = draw(st.integers(CONTEXT_CAP + 1, 2**32 - 1))
    elif kind == "prefill_tokens":
        target.prefill_tokens = draw(st.integers(target.context_tokens + 1, 2**32 - 1))
    else:
        target.proposable_tokens = draw(st.integers(max_k + 1, 2**32 - 1))
    return bad, f"{where}.{kind}"


def check_plan(plan: controller_pb2.StepPlan, report: controller_pb2.StepReport,
               hello: controller_pb2.WorkerHello) -> None:
    """A served report: no error, its step echoed, one entry per unfinished request, k in limits."""
    assert not plan.HasField("error"), plan.error
    assert plan.step_index == report.step_index
    unfinished = [o for o in report.requests if not o.finished]
    assert [r.request_id for r in plan.requests] == [o.request_id for o in unfinished]
    for entry, reported in zip(plan.requests, unfinished):
        assert 0 <= entry.speculation_length <= hello.max_speculation_length
        if reported.HasField("proposable_tokens"):
            assert entry.speculation_length <= reported.proposable_tokens
    assert plan.policy_name and math.isfinite(plan.predicted_step_ms) and plan.predicted_step_ms >= 0


def check_error_plan(plan: controller_pb2.StepPlan, step_index: int, field: str) -> None:
    assert plan.error.field == field, (plan.error, field)
    assert plan.error.grpc_status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0], plan.error
    assert plan.step_index == step_index and not plan.requests


# ================================================================ the controller and its healthy stream

HEALTHY = controller_pb2.WorkerHello(worker_id="healthy", proposer_kind=common_pb2.PROPOSER_KIND_NGRAM,
                                     max_speculation_length=4, max_batch_size=4, cost_profile_id="healthy")


class HealthyStream:
    """A well-behaved worker's Connect stream, reporting every 20 ms from its own thread while the
    properties run; every plan it gets must be a good one."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._outbox: queue.Queue = queue.Queue()
        self._outbox.put(controller_pb2.WorkerMessage(hello=HEALTHY))
        self._plans = controller_pb2_grpc.ControllerStub(channel).Connect(iter(self._outbox.get, None))
        self.sent = 0
        self.problems: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthy-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                step = self.sent
                report = controller_pb2.StepReport(
                    step_index=step, requests=[outcome("h", 2, 1, context=100 + 2 * step)],
                    draft_ms=1.0, verify_ms=40.0, total_ms=42.0)
                self._outbox.put(controller_pb2.WorkerMessage(report=report))
                plan = next(self._plans)
                self.sent += 1
                if plan.HasField("error") or plan.step_index != step or [r.request_id for r in plan.requests] != ["h"]:
                    self.problems.append(plan)
                time.sleep(0.02)
        except Exception as exc:  # noqa: BLE001 - recorded, asserted by check()
            self.problems.append(exc)

    def check(self) -> None:
        assert not self.problems, self.problems[:3]
        assert self._thread.is_alive() and self.sent > 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._outbox.put(None)
        assert list(self._plans) == []


@dataclasses.dataclass
class ControllerEnv:
    server: ControllerServer
    channel: grpc.Channel
    healthy: HealthyStream
    prefix: str


@pytest.fixture(scope="module")
def env(redis_url):
    prefix = f"smartspec-test:{uuid.uuid4().hex[:12]}:"
    server = ControllerServer(0, redis_url, prefix, redis_retry_after_s=0.0)
    server.start()
    channel = grpc.insecure_channel(server.address)
    healthy = HealthyStream(channel)
    yield ControllerEnv(server, channel, healthy, prefix)
    healthy.close()
    client = redis.Redis.from_url(redis_url)
    try:
        # the healthy worker's history holds every one of its steps: nothing else wrote its table
        table = HistoryTable.decode(client.get(f"{prefix}hist:healthy"))
        assert table["h"].steps == healthy.sent and table["h"].accepted == healthy.sent
    finally:
        channel.close()
        server.stop(0)
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


class Stream:
    def __init__(self, channel: grpc.Channel, first: controller_pb2.WorkerMessage) -> None:
        self._outbox: queue.Queue = queue.Queue()
        self._outbox.put(first)
        self._plans = controller_pb2_grpc.ControllerStub(channel).Connect(iter(self._outbox.get, None), timeout=60)

    def put(self, message: controller_pb2.WorkerMessage) -> None:
        self._outbox.put(message)

    def next(self) -> controller_pb2.StepPlan:
        return next(self._plans)

    def end(self) -> list:
        self._outbox.put(None)
        return list(self._plans)

    def abandon(self) -> None:
        """After the server ended the stream with an error (already seen): let the request thread go."""
        self._outbox.put(None)


# ---------------------------------------------------------------- Connect


@st.composite
def connect_cases(draw):
    """(first message, expected field if the stream must be refused, [(message, expectation)])."""
    hello = draw(valid_hellos())
    bad_hello, bad_field = draw(hostile_hello(hello, "hello"))
    steps = []
    for step in range(draw(st.integers(1, 5))):
        report = draw(valid_reports(hello, step))
        steps.append((report, draw(hostile_report(report, hello)), draw(valid_hellos())))
    salt = draw(SALT)
    roll = roll_of(hello, salt)
    if roll < 5:
        return controller_pb2.WorkerMessage(hello=bad_hello), bad_field, []
    if roll < 7:   # a report first
        return controller_pb2.WorkerMessage(report=steps[0][0]), "hello", []
    messages = []
    for report, (bad, field), other in steps:
        roll = roll_of(hello, report, salt)
        if roll < 86:
            messages.append((controller_pb2.WorkerMessage(report=report), ("plan", report)))
        elif roll < 96:
            messages.append((controller_pb2.WorkerMessage(report=bad), ("error", field)))
        elif roll < 98:
            messages.append((controller_pb2.WorkerMessage(), ("error", "kind")))
        else:   # a second hello (another worker's, even): the stream ends
            messages.append((controller_pb2.WorkerMessage(hello=other), ("closed", "hello")))
            break
    return controller_pb2.WorkerMessage(hello=hello), None, messages


def test_connect_streams(env):
    counts: Counter = Counter()

    @settings(max_examples=examples(60), **COMMON)
    @given(connect_cases())
    def run(case):
        first, bad_hello_field, messages = case
        stream = Stream(env.channel, first)
        if bad_hello_field is not None:
            record(counts, False)
            with pytest.raises(grpc.RpcError) as info:
                stream.next()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith(bad_hello_field), info.value.details()
            stream.abandon()
            return
        record(counts, True)
        hello = first.hello
        for message, (expect, detail) in messages:
            stream.put(message)
            if expect == "closed":
                record(counts, False)
                with pytest.raises(grpc.RpcError) as info:
                    stream.next()
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert info.value.details().startswith("hello:")
                stream.abandon()
                return
            plan = stream.next()
            if expect == "plan":
                record(counts, True)
                check_plan(plan, detail, hello)
            else:
                record(counts, False)
                check_error_plan(plan, message.report.step_index, detail)
        assert stream.end() == []

    run()
    env.healthy.check()
    check_share("Connect", counts)


# ---------------------------------------------------------------- Decide


@st.composite
def decide_cases(draw):
    """(request, expected field or None)."""
    hello = draw(valid_hellos())
    report = draw(valid_reports(hello))
    override = None
    if draw(st.booleans()):
        override = common_pb2.CostModel(**{name: draw(st.floats(0, 100)) for name in
                                           draw(st.sets(st.sampled_from(COST_FIELDS), max_size=4))})
        # A valid override costs every step something (a step cannot take 0 ms): one per-step term > 0.
        setattr(override, draw(st.sampled_from(STEP_COST_FIELDS)), draw(st.floats(0.01, 100)))
    bad_hello, hello_field = draw(hostile_hello(hello, "worker"))
    bad_report, report_field = draw(hostile_report(report, hello, "report."))
    bad_override = common_pb2.CostModel()
    if override is not None:
        bad_override.CopyFrom(override)
    coefficient = draw(st.sampled_from(COST_FIELDS))
    setattr(bad_override, coefficient, draw(st.sampled_from([math.nan, math.inf, -1.0, 60_001.0, 1e300])))
    roll = roll_of(hello, report, override or b"", draw(SALT))
    field = None
    if roll < 81:
        pass
    elif roll < 83:
        hello, field = None, "worker"
    elif roll < 88:
        hello, field = bad_hello, hello_field
    elif roll < 97:
        report, field = bad_report, report_field
    else:
        override, field = bad_override, f"cost_model_override.{coefficient}"
    request = controller_pb2.DecideRequest(report=report)
    if hello is not None:
        request.worker.CopyFrom(hello)
    if override is not None:
        request.cost_model_override.CopyFrom(override)
    return request, field


STEP_COST_FIELDS = ("c_fixed_ms", "c_tok_ms", "c_kv_ms", "overhead_ms", "c_row_ms", "c_width_ms")
COST_FIELDS = [f.name for f in common_pb2.CostModel.DESCRIPTOR.fields if f.name != "token_count_ms"]  # the scalars


def test_decide(env):
    counts: Counter = Counter()
    decide = controller_pb2_grpc.ControllerStub(env.channel).Decide

    @settings(max_examples=examples(100), **COMMON)
    @given(decide_cases())
    def run(case):
        request, field = case
        record(counts, field is None)
        if field is None:
            check_plan(decide(request, timeout=30), request.report, request.worker)
            return
        with pytest.raises(grpc.RpcError) as info:
            decide(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
        assert info.value.details().startswith(field + ":"), (info.value.details(), field)

    run()
    env.healthy.check()
    check_share("Decide", counts)


# ---------------------------------------------------------------- Admin

REGISTRY = default_registry()
SAFE_KEY = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@st.composite
def valid_parameters(draw, name: str) -> dict[str, common_pb2.ParameterValue]:
    """Parameters within the schema, cross-field rules included (heuristic, table)."""
    policy = REGISTRY.get(name)
    values: dict[str, Any] = {}
    for spec in policy.parameters:
        low = int(spec.minimum) if spec.minimum is not None else -1000
        high = min(int(spec.maximum), 10_000) if spec.maximum is not None else 1000
        if spec.type is ParameterType.INT:
            values[spec.name] = common_pb2.ParameterValue(int_value=draw(st.integers(low, high)))
        elif spec.type is ParameterType.FLOAT:
            values[spec.name] = common_pb2.ParameterValue(float_value=draw(st.floats(spec.minimum or 0.0,
                                                                                    spec.maximum or 1.0)))
        elif spec.type is ParameterType.BOOL:
            values[spec.name] = common_pb2.ParameterValue(bool_value=draw(st.booleans()))
        elif spec.type is ParameterType.STRING:
            values[spec.name] = common_pb2.ParameterValue(string_value=draw(st.text(max_size=8)))
    if name == "heuristic":
        low = values["min_k"].int_value
        values["start_k"] = common_pb2.ParameterValue(int_value=draw(st.integers(low, 64)))
    if name == "table":
        size = draw(st.integers(1, 4))
        bounds = sorted(draw(st.sets(st.integers(1, 10_000), min_size=size, max_size=size)))
        ks = draw(st.lists(st.integers(0, 64), min_size=size, max_size=size))
        values = {"batch_sizes": common_pb2.ParameterValue(int_list_value=common_pb2.IntList(values=bounds)),
                  "ks": common_pb2.ParameterValue(int_list_value=common_pb2.IntList(values=ks))}
    keep = draw(st.sets(st.sampled_from(sorted(values)), max_size=len(values))) if values else set()
    if name in ("heuristic", "table"):
        keep = set(values)  # the cross-field rules hold for these values, not for the defaults beside them
    return {key: value for key, value in values.items() if key in keep}


@st.composite
def set_policy_cases(draw):
    """(request, ("ok", None) | ("field", field) | ("stale", None), "zero" | "current")."""
    name = draw(st.sampled_from(REGISTRY.names()))
    parameters = draw(valid_parameters(name))
    specs = {spec.name: spec for spec in REGISTRY.get(name).parameters}
    # every hostile variant is drawn; the roll picks one (see roll_of)
    bad_name = draw(st.sampled_from(["", "no-such-policy", "GOODPUT", "fixed "]))
    unknown_key = "zz_" + draw(SAFE_KEY)
    key = draw(st.sampled_from(sorted(specs))) if specs else None
    wrong = draw(st.sampled_from(["type", "bounds", "unset"]))
    float_bad = draw(st.sampled_from([math.nan, math.inf, 1.0]))
    int_excess = draw(st.integers(1, 10**6))
    version_choice = draw(st.sampled_from(["zero", "zero", "current"]))
    roll = roll_of(common_pb2.PolicySpec(name=name, parameters=parameters), draw(SALT))
    expect = ("ok", None)
    if roll < 85:
        pass
    elif roll < 87:
        name, expect = bad_name, ("field", "policy.name")
    elif roll < 90:
        parameters[unknown_key] = common_pb2.ParameterValue(int_value=1)
        expect = ("field", f'policy.parameters["{unknown_key}"]')
    elif roll < 96 and key is not None:
        spec = specs[key]
        expect = ("field", f'policy.parameters["{key}"]')
        if wrong == "unset":
            parameters[key] = common_pb2.ParameterValue()
        elif wrong == "type":
            parameters[key] = (common_pb2.ParameterValue(string_value="4") if spec.type is not ParameterType.STRING
                               else common_pb2.ParameterValue(int_value=4))
        elif spec.type is ParameterType.INT_LIST:   # element 1 out of bounds: found before any cross-field rule
            values = [int(spec.minimum), int(spec.maximum) + 1]
            parameters[key] = common_pb2.ParameterValue(int_list_value=common_pb2.IntList(values=values))
            expect = ("field", f'policy.parameters["{key}"][1]')
        elif spec.type is ParameterType.FLOAT:
            parameters[key] = common_pb2.ParameterValue(float_value=float_bad + (spec.maximum if float_bad == 1.0
                                                                                  else 0.0))
        else:
            parameters[key] = common_pb2.ParameterValue(int_value=int(spec.maximum) + int_excess)
    else:
        expect = ("stale", None)
    request = admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(name=name, parameters=parameters))
    return request, expect, version_choice


def test_admin_set_policy(env):
    counts: Counter = Counter()
    admin = admin_pb2_grpc.AdminStub(env.channel)

    @settings(max_examples=examples(80), **COMMON)
    @given(set_policy_cases())
    def run(case):
        request, (expect, field), version_choice = case
        before = admin.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=10)
        if expect == "stale":
            request.expected_version = before.version + 7
        elif version_choice == "current":
            request.expected_version = before.version
        record(counts, expect == "ok")
        if expect == "ok":
            answer = admin.SetPolicy(request, timeout=10)
            assert answer.version == before.version + 1 and answer.policy.name == request.policy.name
            for key, value in request.policy.parameters.items():
                assert answer.policy.parameters[key] == value
            assert admin.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=10) == answer
            return
        with pytest.raises(grpc.RpcError) as info:
            admin.SetPolicy(request, timeout=10)
        if expect == "stale":
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert info.value.details().startswith("expected_version")
        else:
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
            assert info.value.details().startswith(field), (info.value.details(), field)
        assert admin.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=10) == before   # nothing changed

    run()
    env.healthy.check()
    check_share("SetPolicy", counts)


def _unknown_fields(draw) -> bytes:
    """Protobuf bytes of fields no Admin request declares (proto3 keeps and ignores them)."""
    payload = b""
    for _ in range(draw(st.integers(0, 3))):
        number = draw(st.integers(20, 1000))
        value = draw(st.integers(0, 2**20))
        payload += _varint(number << 3) + _varint(value)
    return payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.parametrize("method", ["GetPolicy", "ListPolicies", "GetStatus"])
def test_admin_reads(env, method):
    counts: Counter = Counter()
    response_type = {"GetPolicy": admin_pb2.ActivePolicy, "ListPolicies": admin_pb2.ListPoliciesResponse,
                     "GetStatus": admin_pb2.ControllerStatus}[method]
    call = env.channel.unary_unary(f"/smartspec.v1.Admin/{method}", request_serializer=None,
                                   response_deserializer=response_type.FromString)

    @settings(max_examples=examples(15), **COMMON)
    @given(st.composite(_unknown_fields)())
    def run(payload):
        record(counts, True)
        answer = call(payload, timeout=10)
        if method == "ListPolicies":
            assert [p.name for p in answer.policies] == REGISTRY.names()
        elif method == "GetPolicy":
            assert answer.policy.name in REGISTRY.names()
        else:
            assert answer.redis_ok and "healthy" in [w.worker_id for w in answer.workers]
            assert not any(w.worker_id.startswith("decide:") for w in answer.workers)

    run()
    env.healthy.check()
    check_share(method, counts)


# ================================================================ the worker: Generate

CONTEXT = 128
WORDS = st.integers(5, 126).map(lambda i: f"t{i}")


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """A speculating worker (prompt lookup, fixed k = 3) and a plain one (`off`) on one tiny model."""
    from tiny_model import write_tiny_model
    from smartspec.worker.engine import EngineConfig
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.server import WorkerOptions, WorkerServer

    model = write_tiny_model(tmp_path_factory.mktemp("tiny-properties"))
    servers, stubs, channels = [], [], []
    for policy in ("fixed:3", "off"):
        options = WorkerOptions(engine=EngineConfig(max_batch_size=4, max_context_tokens=CONTEXT, max_queue=8,
                                                    token_budget=CONTEXT, max_k=4),
                                local_policy=policy, profile_steps=0, default_max_tokens=8)
        server = WorkerServer(model, make_proposer("ngram"), options)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.start()}")
        servers.append(server)
        channels.append(channel)
        stubs.append(generation_pb2_grpc.GenerationStub(channel))
    yield stubs[0], stubs[1], channels[0]
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(0)


def run_generate(stub, request: gen.GenerateRequest) -> tuple[str, list[int], gen.GenerationResult]:
    return read_generate_stream(stub, request, timeout=60)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80", b"\xf8\x88\x80\x80\x80", b"t5 \xfe"]


@st.composite
def valid_generate(draw) -> gen.GenerateRequest:
    request = gen.GenerateRequest(max_tokens=draw(st.integers(0, 24)), ignore_eos=draw(st.booleans()))
    if draw(st.integers(0, 3)):   # a raw prompt, often with a repeated span for prompt lookup to find
        words = draw(st.lists(WORDS, min_size=1, max_size=12))
        request.prompt = " ".join(words * draw(st.integers(1, 3)))
    else:
        for _ in range(draw(st.integers(1, 2))):
            request.messages.add(role=draw(st.sampled_from(["system", "user", "assistant"])),
                                 content=" ".join(draw(st.lists(WORDS, min_size=1, max_size=10))))
    if draw(st.integers(0, 4)) == 0:   # sampled: served, but not comparable token for token
        request.temperature = draw(st.floats(0.125, 2.0, width=32))
        request.seed = draw(st.integers(0, 2**64 - 1))
    elif draw(st.booleans()):
        request.temperature = 0.0
    if draw(st.booleans()):
        request.top_p = draw(st.floats(0.0625, 1.0, width=32))
    if draw(st.booleans()):
        request.top_k = draw(st.integers(0, 64))
    request.stop.extend(" ".join(draw(st.lists(WORDS, min_size=1, max_size=2)))
                        for _ in range(draw(st.integers(0, 2))))
    if draw(st.booleans()):
        request.request_id = draw(st.text(ID_ALPHABET, min_size=1, max_size=40))
    return request


@st.composite
def generate_cases(draw):
    """(request or raw bytes, expected field or None, greedy)."""
    request = draw(valid_generate())
    # every hostile variant is drawn; the roll picks one (see roll_of)
    utf8_where = draw(st.sampled_from(["prompt", "stop", "request_id", "content"]))
    utf8_bad = draw(st.sampled_from(INVALID_UTF8))
    kind = draw(st.sampled_from(["neither", "both", "role", "temperature", "top_p", "stops", "empty_stop",
                                 "long_stop", "max_tokens", "long_prompt", "request_id"]))
    bad_role = draw(st.sampled_from(["robot", "", "User", "tool"]))
    bad_temperature = draw(st.sampled_from([math.nan, 2.5, -0.5, math.inf]))
    bad_top_p = draw(st.sampled_from([0.0, 1.5, math.nan, -1.0]))
    bad_max_tokens = draw(st.integers(CONTEXT + 1, 2**32 - 1))
    long_prompt = draw(st.integers(CONTEXT, CONTEXT + 50))
    bad_request_id = draw(bad_ids().filter(bool))
    roll = roll_of(request, draw(SALT))
    greedy = not request.HasField("temperature") or request.temperature == 0.0
    if roll < 82:
        return request, None, greedy
    if roll < 89:   # raw bytes with invalid UTF-8 in one string field
        if utf8_where == "prompt":
            request.ClearField("messages")
            request.ClearField("prompt")
            return request.SerializeToString() + _field_bytes(1, b"t5 " + utf8_bad), "prompt", False
        if utf8_where == "stop":
            return request.SerializeToString() + _field_bytes(7, utf8_bad), f"stop[{len(request.stop)}]", False
        if utf8_where == "request_id":
            return request.SerializeToString() + _field_bytes(9, b"id-" + utf8_bad), "request_id", False
        entry = _field_bytes(2, _field_bytes(1, b"user") + _field_bytes(2, utf8_bad))
        return request.SerializeToString() + entry, f"messages[{len(request.messages)}].content", False
    if kind == "neither":
        request.ClearField("prompt")
        request.ClearField("messages")
        field = "prompt"
    elif kind == "both":
        request.prompt = "t5 t6"
        request.messages.add(role="user", content="t7")
        field = "messages"
    elif kind == "role":
        request.ClearField("prompt")
        request.messages.add(role=bad_role, content="t5")
        field = f"messages[{len(request.messages) - 1}].role"
    elif kind == "temperature":
        request.temperature = bad_temperature
        field = "temperature"
    elif kind == "top_p":
        request.top_p = bad_top_p
        field = "top_p"
    elif kind == "stops":
        request.stop.extend(["t9"] * (17 - len(request.stop)))
        field = "stop"
    elif kind == "empty_stop":
        field = f"stop[{len(request.stop)}]"
        request.stop.append("")
    elif kind == "long_stop":
        field = f"stop[{len(request.stop)}]"
        request.stop.append("x" * 257)
    elif kind == "max_tokens":
        request.max_tokens = bad_max_tokens
        field = "max_tokens"
    elif kind == "long_prompt":
        request.ClearField("messages")
        request.prompt = " ".join(["t9"] * long_prompt)
        field = "prompt"
    else:
        request.request_id = bad_request_id
        field = "request_id"
    return request, field, False


class HealthyGeneration:
    """One greedy request, repeated from its own thread against the speculating worker while the
    properties run; each answer must equal the plain worker's."""

    REQUEST = gen.GenerateRequest(prompt="t7 t19 t33 t41 t58 t60 t7 t19 t33", max_tokens=24, ignore_eos=True)

    def __init__(self, speculative, plain) -> None:
        self.expected = run_generate(plain, self.REQUEST)[:2]
        self._stub = speculative
        self.runs = 0
        self.problems: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthy-generation", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                got = run_generate(self._stub, self.REQUEST)[:2]
            except Exception as exc:  # noqa: BLE001 - recorded, asserted by close()
                self.problems.append(exc)
                return
            if got != self.expected:
                self.problems.append(got)
            self.runs += 1
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self.problems, self.problems[:3]
        assert self.runs > 0


def test_generate(workers):
    speculative, plain, channel = workers
    counts: Counter = Counter()
    raw = channel.unary_stream("/smartspec.v1.Generation/Generate", request_serializer=None,
                               response_deserializer=gen.GenerateResponse.FromString)
    healthy = HealthyGeneration(speculative, plain)
    speculated = Counter()

    @settings(max_examples=examples(60), **COMMON)
    @given(generate_cases())
    def run(case):
        request, field, greedy = case
        record(counts, field is None)
        if isinstance(request, gen.GenerateRequest) and request.request_id:
            request.request_id += f"-{uuid.uuid4().hex[:6]}"   # unique among running requests
        if field is not None:
            with pytest.raises(grpc.RpcError) as info:
                if isinstance(request, bytes):
                    list(raw(request, timeout=60))
                else:
                    list(speculative.Generate(request, timeout=60))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
            assert info.value.details().startswith(field + ":"), (info.value.details(), field)
            return
        text, token_ids, result = run_generate(speculative, request)
        assert text == result.text and result.usage.completion_tokens == len(token_ids)
        assert result.finish_reason in (gen.FINISH_REASON_STOP, gen.FINISH_REASON_LENGTH)
        assert all(k <= 3 for k in result.speculation.speculation_lengths)
        if greedy:
            plain_text, plain_ids, plain_result = run_generate(plain, request)
            assert (text, token_ids, result.finish_reason) == (plain_text, plain_ids, plain_result.finish_reason)
            speculated["accepted"] += result.speculation.accepted_tokens
            speculated["greedy"] += 1

    run()
    healthy.close()
    # the worker survived all of it: nothing left running, and it still answers like the plain one
    assert speculative.GetWorkerInfo(gen.GetWorkerInfoRequest(), timeout=10).running_requests == 0
    assert run_generate(speculative, HealthyGeneration.REQUEST)[:2] == healthy.expected
    check_share("Generate", counts)
    print(f"Generate: {speculated['greedy']} greedy requests compared, {speculated['accepted']} proposals accepted, "
          f"{healthy.runs} healthy runs alongside")
    assert speculated["greedy"] > 10 and speculated["accepted"] > 0   # not vacuous: speculation happened

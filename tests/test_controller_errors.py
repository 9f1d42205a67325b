"""Bad input gets a precise error and harms nothing else; a Redis outage degrades, never stalls."""

from __future__ import annotations

import queue
import socket
import threading

import grpc
import pytest
import redis

from smartspec.controller.history_table import HistoryTable
from smartspec.controller.server import ControllerServer
from smartspec.v1 import admin_pb2, admin_pb2_grpc, common_pb2, controller_pb2, controller_pb2_grpc
from wire import outcome


def hello(worker_id="w0", max_k=4, max_batch=8) -> controller_pb2.WorkerHello:
    return controller_pb2.WorkerHello(worker_id=worker_id, proposer_kind=common_pb2.PROPOSER_KIND_DRAFT,
                                      max_speculation_length=max_k, max_batch_size=max_batch)


def report(step, outcomes, **kw) -> controller_pb2.StepReport:
    times = {"draft_ms": 1.0, "verify_ms": 50.0, "total_ms": 52.0, **kw}
    return controller_pb2.StepReport(step_index=step, requests=outcomes, **times)


class Conversation:
    """A live Connect stream: send one message, read its plan, keep going."""

    def __init__(self, channel, first: controller_pb2.WorkerMessage) -> None:
        self._outbox: queue.Queue = queue.Queue()
        self._outbox.put(first)
        self._plans = controller_pb2_grpc.ControllerStub(channel).Connect(iter(self._outbox.get, None), timeout=30)

    def send(self, step: controller_pb2.StepReport) -> controller_pb2.StepPlan:
        return self.send_message(controller_pb2.WorkerMessage(report=step))

    def send_hello(self, worker: controller_pb2.WorkerHello) -> None:
        """A hello is answered by no plan."""
        self._outbox.put(controller_pb2.WorkerMessage(hello=worker))

    def send_message(self, message: controller_pb2.WorkerMessage) -> controller_pb2.StepPlan:
        self._outbox.put(message)
        return next(self._plans)

    def close(self) -> None:
        self._outbox.put(None)
        assert list(self._plans) == []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BAD_REPORTS = [
    # (report builder, field the error must name)
    (lambda: report(5, [outcome("ok", 2, 2), outcome("x", 2, 3, tested=2)]), "requests[1].accepted_tokens"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("x", 2, 1, tested=3)]), "requests[1].tested_positions"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("x", 3, 2, tested=1)]), "requests[1].tested_positions"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("x", 4, 1, tested=3)]), "requests[1].tested_positions"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("x", 4, 1, requested=3)]), "requests[1].requested_tokens"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("", 1, 1)]), "requests[1].request_id"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("x"), outcome("ok")]), "requests[2].request_id"),
    (lambda: report(5, [outcome("ok", 2, 2)] + [outcome(f"r{i}") for i in range(8)]), "requests"),
    (lambda: report(5, [outcome("ok", 2, 2)], verify_ms=float("nan")), "verify_ms"),
    (lambda: report(5, [outcome("ok", 2, 2)], draft_ms=-1.0), "draft_ms"),
    # plausibility bounds (issue 13): nothing beyond what a real step produces enters shared state
    (lambda: report(5, [outcome("ok", 2, 2)], total_ms=1e300), "total_ms"),
    (lambda: report(5, [outcome("ok", 2, 2)], verify_ms=1.3e154), "verify_ms"),
    (lambda: report(5, [outcome("ok", 2, 2)], draft_ms=60_001.0), "draft_ms"),
    (lambda: report(5, [outcome("ok", 2, 2)], queued_requests=2**32 - 1), "queued_requests"),
    (lambda: report(5, [outcome("ok", 2, 2)], batched_tokens=2**32 - 1), "batched_tokens"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("x", context=2**32 - 1)]), "requests[1].context_tokens"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("x", 5, 5)]), "requests[1].proposed_tokens"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("x", 2**32 - 1, 2**32 - 1)]), "requests[1].proposed_tokens"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("x", 2, 2, requested=5)]), "requests[1].requested_tokens"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("x", proposable=5)]), "requests[1].proposable_tokens"),
    (lambda: report(5, [outcome("ok", 2, 2), controller_pb2.RequestOutcome(
        request_id="x", context_tokens=10, prefill_tokens=11)]), "requests[1].prefill_tokens"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("a:b")]), "requests[1].request_id"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("a\nb")]), "requests[1].request_id"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("a\x00b")]), "requests[1].request_id"),
    (lambda: report(5, [outcome("ok", 2, 2), outcome("x" * 257)]), "requests[1].request_id"),
]


@pytest.mark.parametrize("bad, field", BAD_REPORTS, ids=[f for _, f in BAD_REPORTS])
def test_bad_report_gets_error_plan_and_stream_survives(channel, raw, redis_prefix, bad, field):
    talk = Conversation(channel, controller_pb2.WorkerMessage(hello=hello()))
    first = talk.send(report(4, [outcome("ok", context=30), outcome("other", context=40)]))
    assert [r.request_id for r in first.requests] == ["ok", "other"]

    rejected = talk.send(bad())  # (the stream stores step 4 before it reads the next report)
    assert rejected.step_index == 5
    assert rejected.error.field == field
    assert rejected.error.grpc_status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rejected.error.message and not rejected.requests

    # Nothing of the bad report was recorded: the histories are those of step 4 alone.
    def histories():
        return {rid: (h.accepted, h.tested, h.steps)
                for rid, h in HistoryTable.decode(raw.get(f"{redis_prefix}hist:w0")).items()}

    assert histories() == {"ok": (0, 0, 1), "other": (0, 0, 1)}

    # The next good report is planned, and it builds on the pre-error history.
    good = talk.send(report(6, [outcome("ok", 2, 1, context=33), outcome("other", 2, 2, context=43)]))
    assert not good.HasField("error") and [r.request_id for r in good.requests] == ["ok", "other"]
    talk.close()  # the stream ends after its last write
    assert histories()["ok"] == (1, 2, 2)


def test_batch_over_controller_cap_is_resource_exhausted(channel):
    talk = Conversation(channel, controller_pb2.WorkerMessage(hello=hello(max_batch=4096)))  # the cap itself
    plan = talk.send(report(1, [outcome(f"r{i}") for i in range(4097)]))
    assert plan.error.field == "requests"
    assert plan.error.grpc_status_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert not talk.send(report(2, [outcome("a")])).HasField("error")
    talk.close()


def test_empty_message_gets_an_error_plan_and_a_second_hello_ends_the_stream(channel, raw, redis_prefix):
    talk = Conversation(channel, controller_pb2.WorkerMessage(hello=hello(max_k=4)))
    plan = talk.send_message(controller_pb2.WorkerMessage())
    assert plan.error.field == "kind" and plan.error.grpc_status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not talk.send(report(1, [outcome("a", 2, 2)])).HasField("error")
    # A second hello, even for another worker id, is refused: one stream, one worker; a worker
    # re-introduces itself (after re-profiling, say) by reconnecting.
    talk.send_hello(hello("someone-else", max_k=4, max_batch=1))
    with pytest.raises(grpc.RpcError) as info:
        talk.send(report(2, [outcome("a"), outcome("b")]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith("hello:"), info.value.details()
    # Nothing was stored under the other id; the stream's own step 1 was.
    assert raw.exists(f"{redis_prefix}hist:someone-else") == 0
    assert set(HistoryTable.decode(raw.get(f"{redis_prefix}hist:w0"))) == {"a"}
    # The controller serves the next stream as usual.
    fresh = Conversation(channel, controller_pb2.WorkerMessage(hello=hello("someone-else", max_batch=1)))
    assert fresh.send(report(0, [outcome("a"), outcome("b")])).error.field == "requests"
    assert not fresh.send(report(1, [outcome("a")])).HasField("error")
    fresh.close()


def test_stream_must_start_with_a_valid_hello(channel):
    stub = controller_pb2_grpc.ControllerStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Connect(iter([controller_pb2.WorkerMessage(report=report(0, []))]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hello" in info.value.details()

    for bad_hello, field in [
        (controller_pb2.WorkerHello(), "hello.worker_id"),
        (controller_pb2.WorkerHello(worker_id="a:b", max_batch_size=1), "hello.worker_id"),
        (controller_pb2.WorkerHello(worker_id="w", max_speculation_length=1000), "hello.max_speculation_length"),
        (controller_pb2.WorkerHello(worker_id="w", max_batch_size=0), "hello.max_batch_size"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Connect(iter([controller_pb2.WorkerMessage(hello=bad_hello)]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field)


def test_decide_errors_are_status_codes_naming_the_field(channel):
    stub = controller_pb2_grpc.ControllerStub(channel)
    cases = [
        (controller_pb2.DecideRequest(report=report(0, [])), "worker"),
        (controller_pb2.DecideRequest(worker=hello(), report=report(0, [outcome("a", 1, 2, tested=1)])),
         "report.requests[0].accepted_tokens"),
        (controller_pb2.DecideRequest(worker=hello(), report=report(0, [outcome("a")]),
                                      cost_model_override=common_pb2.CostModel(c_tok_ms=-1.0)),
         "cost_model_override.c_tok_ms"),
        (controller_pb2.DecideRequest(worker=hello(), report=report(0, [outcome("a")]),
                                      cost_model_override=common_pb2.CostModel(c_fixed_ms=1e300)),
         "cost_model_override.c_fixed_ms"),
        (controller_pb2.DecideRequest(worker=hello(), report=report(0, [outcome("a")]),
                                      cost_model_override=common_pb2.CostModel(c_fixed_ms=10.0,
                                                                               token_count_ms=[0.0, -11.0])),
         "cost_model_override.token_count_ms"),
        (controller_pb2.DecideRequest(worker=hello(), report=report(0, [outcome("a")]),
                                      cost_model_override=common_pb2.CostModel(c_fixed_ms=10.0,
                                                                               token_count_ms=[float("nan")])),
         "cost_model_override.token_count_ms"),
        (controller_pb2.DecideRequest(worker=hello(), report=report(0, [outcome("a")]),
                                      cost_model_override=common_pb2.CostModel(c_fixed_ms=10.0,
                                                                               token_count_ms=[1.0] * 66)),
         "cost_model_override.token_count_ms"),
        (controller_pb2.DecideRequest(worker=hello(), report=report(0, [outcome("a")], total_ms=1e300)),
         "report.total_ms"),
        (controller_pb2.DecideRequest(worker=hello(), report=report(0, [outcome("a")], verify_ms=1.3e154)),
         "report.verify_ms"),
        (controller_pb2.DecideRequest(worker=hello(max_batch=0), report=report(0, [outcome("a")])),
         "worker.max_batch_size"),
        (controller_pb2.DecideRequest(worker=hello("w\n0"), report=report(0, [outcome("a")])), "worker.worker_id"),
        (controller_pb2.DecideRequest(worker=hello(), report=report(0, [outcome("a\x00")])),
         "report.requests[0].request_id"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.Decide(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field + ":"), info.value.details()


@pytest.mark.parametrize("spec, field", [
    (common_pb2.PolicySpec(name="no-such-policy"), "policy.name"),
    (common_pb2.PolicySpec(name=""), "policy.name"),
    (common_pb2.PolicySpec(name="fixed", parameters={"k": common_pb2.ParameterValue(int_value=-1)}),
     'policy.parameters["k"]'),
    (common_pb2.PolicySpec(name="fixed", parameters={"k": common_pb2.ParameterValue(string_value="4")}),
     'policy.parameters["k"]'),
    (common_pb2.PolicySpec(name="fixed", parameters={"kk": common_pb2.ParameterValue(int_value=4)}),
     'policy.parameters["kk"]'),
    (common_pb2.PolicySpec(name="fixed", parameters={"k": common_pb2.ParameterValue()}),
     'policy.parameters["k"]'),
])
def test_bad_set_policy_is_invalid_argument_and_changes_nothing(channel, spec, field):
    admin = admin_pb2_grpc.AdminStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=spec), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()
    assert admin.GetPolicy(admin_pb2.GetPolicyRequest()).version == 0


def test_unreachable_redis_plans_degraded_from_priors(redis_prefix):
    srv = ControllerServer(0, f"redis://127.0.0.1:{closed_port()}/0", redis_prefix,
                           redis_timeout_s=0.2, redis_retry_after_s=0.0)
    srv.start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            talk = Conversation(ch, controller_pb2.WorkerMessage(hello=hello()))
            for step in range(3):
                plan = talk.send(report(step, [outcome("a", 2, 2, context=20 + step), outcome("b", context=30)]))
                assert plan.degraded and not plan.HasField("error")
                assert [r.request_id for r in plan.requests] == ["a", "b"]
                assert plan.policy_name == "goodput" and plan.predicted_step_ms > 0
            talk.close()

            admin = admin_pb2_grpc.AdminStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(name="off")), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            status = admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
            assert not status.redis_ok and status.policy.policy.name == "goodput"
    finally:
        srv.stop(0)


class TcpProxy:
    """Loopback TCP relay to Redis that a test can cut, to simulate an outage mid-run."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self._target))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self._open.clear()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._conns.clear()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self.cut()
        self._listener.close()


def test_outage_mid_run_keeps_last_policy_and_recovers(redis_url, redis_prefix):
    proxy = TcpProxy(redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"])
    srv = ControllerServer(0, f"redis://127.0.0.1:{proxy.port}/0", redis_prefix,
                           redis_timeout_s=0.5, redis_retry_after_s=0.0)
    srv.start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            admin_pb2_grpc.AdminStub(ch).SetPolicy(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(
                name="fixed", parameters={"k": common_pb2.ParameterValue(int_value=2)})))
            talk = Conversation(ch, controller_pb2.WorkerMessage(hello=hello()))
            plan = talk.send(report(0, [outcome("a")]))
            assert (plan.policy_name, plan.policy_version, plan.degraded) == ("fixed", 1, False)

            proxy.cut()
            plan = talk.send(report(1, [outcome("a", 2, 2)]))
            # Planned without Redis, with the policy this replica last saw.
            assert plan.degraded and (plan.policy_name, plan.policy_version) == ("fixed", 1)
            assert [r.speculation_length for r in plan.requests] == [2]

            proxy.restore()
            plan = talk.send(report(2, [outcome("a", 2, 1)]))
            assert not plan.degraded
            talk.close()
    finally:
        srv.stop(0)
        proxy.close()

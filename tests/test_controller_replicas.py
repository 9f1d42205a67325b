"""Replicas share nothing but Redis: any replica serves any step with the same answer."""

from __future__ import annotations

import uuid

import grpc
import redis

from smartspec.controller.history_table import HistoryTable
from smartspec.core.policies import BasePolicy, Registry
from smartspec.core.policies.registry import BUILTIN_POLICIES
from smartspec.controller.server import ControllerServer
from smartspec.v1 import admin_pb2, admin_pb2_grpc, common_pb2, controller_pb2, controller_pb2_grpc
from wire import comparable, outcome, workload


def hello(worker_id="w0") -> controller_pb2.WorkerHello:
    return controller_pb2.WorkerHello(
        worker_id=worker_id, proposer_kind=common_pb2.PROPOSER_KIND_NGRAM, max_speculation_length=6,
        max_batch_size=16, cost_profile_id="cpu-smollm2",
        profile=[common_pb2.ProfileSample(batch_size=b, speculation_length=k, context_tokens=200,
                                              draft_ms=0.2 * k, verify_ms=80.0 + 3.0 * b * (k + 1) + (30.0 if k else 0))
                 for b in (1, 8) for k in (0, 4)],
    )


def test_policy_set_on_one_replica_is_used_by_the_other_next_step(replicas):
    a, b = replicas
    decide_b = controller_pb2_grpc.ControllerStub(b).Decide
    request = controller_pb2.DecideRequest(worker=hello(), report=controller_pb2.StepReport(
        step_index=0, requests=[outcome("x", context=10)]))
    assert decide_b(request).policy_name == "goodput"

    admin_pb2_grpc.AdminStub(a).SetPolicy(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(
        name="fixed", parameters={"k": common_pb2.ParameterValue(int_value=5)})))
    plan = decide_b(request)
    assert (plan.policy_name, plan.policy_version) == ("fixed", 1)
    assert [r.speculation_length for r in plan.requests] == [5]
    got = admin_pb2_grpc.AdminStub(b).GetPolicy(admin_pb2.GetPolicyRequest())
    assert (got.policy.name, got.version) == ("fixed", 1)

    admin_pb2_grpc.AdminStub(b).SetPolicy(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(name="off")))
    plan = controller_pb2_grpc.ControllerStub(a).Decide(request)
    assert (plan.policy_name, plan.policy_version, plan.requests[0].speculation_length) == ("off", 2, 0)


def test_alternating_replicas_answer_exactly_like_one(redis_url, replicas):
    """Steps spread over two replicas give the same plans as all steps on one replica (fresh prefix)."""
    stubs = [controller_pb2_grpc.ControllerStub(ch) for ch in replicas]
    alternating = [comparable(stubs[i % 2].Decide(controller_pb2.DecideRequest(worker=hello(), report=r)))
                   for i, r in enumerate(workload())]

    solo_prefix = f"smartspec-test:{uuid.uuid4().hex[:12]}:"
    solo = ControllerServer(0, redis_url, solo_prefix)
    solo.start()
    try:
        with grpc.insecure_channel(solo.address) as ch:
            stub = controller_pb2_grpc.ControllerStub(ch)
            single = [comparable(stub.Decide(controller_pb2.DecideRequest(worker=hello(), report=r)))
                      for r in workload()]
    finally:
        solo.stop(0)
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=solo_prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()

    assert alternating == single
    # The workload is informative: the learned acceptance separates the requests.
    last = {r.request_id: r.speculation_length for r in single[-2].requests}
    assert last["good"] > last["poor"]


def test_stream_moves_to_another_replica_without_losing_history(replicas, redis_url, redis_prefix):
    """Kill-free failover: a worker reconnects to replica B and B continues A's request history."""
    steps = workload()
    first = [controller_pb2.WorkerMessage(hello=hello())] + [controller_pb2.WorkerMessage(report=r) for r in steps[:4]]
    rest = [controller_pb2.WorkerMessage(hello=hello())] + [controller_pb2.WorkerMessage(report=r) for r in steps[4:]]
    list(controller_pb2_grpc.ControllerStub(replicas[0]).Connect(iter(first)))
    plans = list(controller_pb2_grpc.ControllerStub(replicas[1]).Connect(iter(rest)))
    assert [p.step_index for p in plans] == [4, 5, 6, 7]

    client = redis.Redis.from_url(redis_url)
    good = HistoryTable.decode(client.get(f"{redis_prefix}hist:w0"))["good"]
    client.close()
    assert (good.accepted, good.steps) == (4 * 7, 8)
    # tested also counts a failed position whenever the replayed 4 proposals were fewer than the k
    # the controller planned (a proposer that ran dry, see core/acceptance.py)
    assert 4 * 7 <= good.tested <= 4 * 7 + 7


class AlwaysOne(BasePolicy):
    """A plugin policy installed on one replica only."""

    name = "always-one"
    description = "k = 1 for every request"

    def decide(self, batch, cost, params):
        return [1] * len(batch.requests)


def test_replica_without_a_plugin_falls_back_to_the_default_policy(redis_url, redis_prefix):
    with_plugin = Registry(BUILTIN_POLICIES)
    with_plugin.register(AlwaysOne())
    servers = [ControllerServer(0, redis_url, redis_prefix, registry=with_plugin),
               ControllerServer(0, redis_url, redis_prefix)]
    for s in servers:
        s.start()
    try:
        a, b = (grpc.insecure_channel(s.address) for s in servers)
        admin_pb2_grpc.AdminStub(a).SetPolicy(admin_pb2.SetPolicyRequest(
            policy=common_pb2.PolicySpec(name="always-one")))
        request = controller_pb2.DecideRequest(worker=hello(), report=controller_pb2.StepReport(
            step_index=0, requests=[outcome("x", context=10), outcome("y", context=10)]))
        plan_a = controller_pb2_grpc.ControllerStub(a).Decide(request)
        assert (plan_a.policy_name, plan_a.policy_version) == ("always-one", 1)
        assert [r.speculation_length for r in plan_a.requests] == [1, 1]
        # Replica B cannot run it: it plans with the default and says so, instead of failing the step.
        plan_b = controller_pb2_grpc.ControllerStub(b).Decide(request)
        assert (plan_b.policy_name, plan_b.policy_version) == ("goodput", 1)
        assert not plan_b.HasField("error") and len(plan_b.requests) == 2
        a.close()
        b.close()
    finally:
        for s in servers:
            s.stop(0)

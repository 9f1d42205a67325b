"""Redis loses everything (a restart without persistence, a FLUSHALL): the operator's policy choice
comes back, with its version, from the controllers that saw it; versions never go backwards.

Redis is shared with other tests, so "losing everything" here is deleting every key under the
test's own prefix, which is all a controller on that prefix can see.
"""

from __future__ import annotations

import json
import logging
import queue

import grpc

from smartspec.controller.server import ControllerServer
from smartspec.controller.store import ControllerStore
from smartspec.controller.store_policy import PolicyRecord
from smartspec.v1 import admin_pb2, admin_pb2_grpc, common_pb2, controller_pb2, controller_pb2_grpc
from wire import outcome


def hello(worker_id: str = "loss-w0") -> controller_pb2.WorkerHello:
    return controller_pb2.WorkerHello(worker_id=worker_id, proposer_kind=common_pb2.PROPOSER_KIND_NGRAM,
                                      max_speculation_length=8, max_batch_size=16)


def fixed(k: int) -> common_pb2.PolicySpec:
    return common_pb2.PolicySpec(name="fixed", parameters={"k": common_pb2.ParameterValue(int_value=k)})


def report(step: int) -> controller_pb2.StepReport:
    return controller_pb2.StepReport(step_index=step, requests=[outcome("x", context=20 + step)],
                                     draft_ms=1.0, verify_ms=90.0, total_ms=92.0)


def lose_everything(raw, prefix: str) -> int:
    """What FLUSHALL does to this prefix: every key gone."""
    keys = list(raw.scan_iter(match=prefix + "*", count=1000))
    if keys:
        raw.delete(*keys)
    assert not list(raw.scan_iter(match=prefix + "*", count=1000))
    return len(keys)


def decide(channel, step: int) -> controller_pb2.StepPlan:
    return controller_pb2_grpc.ControllerStub(channel).Decide(
        controller_pb2.DecideRequest(worker=hello(), report=report(step)), timeout=10)


def test_policy_comes_back_after_the_keys_are_lost_next_step_and_get_policy(server, raw, redis_prefix, caplog):
    caplog.set_level(logging.WARNING, logger="smartspec.controller.store")
    with grpc.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=fixed(5)), timeout=10)
        chosen = admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=fixed(3)), timeout=10)
        assert chosen.version == 2
        plan = decide(channel, 0)
        assert (plan.policy_name, plan.policy_version, plan.requests[0].speculation_length) == ("fixed", 2, 3)

        assert lose_everything(raw, redis_prefix) > 0        # the policy, histories, prior, fit, workers

        plan = decide(channel, 1)                            # the next step: the operator's choice, not goodput
        assert (plan.policy_name, plan.policy_version, plan.requests[0].speculation_length) == ("fixed", 2, 3)
        stored = {k.decode(): v.decode() for k, v in raw.hgetall(redis_prefix + "policy").items()}
        assert stored["name"] == "fixed" and json.loads(stored["parameters"]) == {"k": 3}
        assert (int(stored["version"]), int(stored["updated_unix_ms"])) == (2, chosen.updated_unix_ms)

        lose_everything(raw, redis_prefix)
        got = admin.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=10)   # GetPolicy restores it too
        assert (got.policy.name, got.version, got.updated_unix_ms) == ("fixed", 2, chosen.updated_unix_ms)
        assert got.policy.parameters["k"].int_value == 3

        lose_everything(raw, redis_prefix)
        status = admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        assert (status.policy.policy.name, status.policy.version) == ("fixed", 2)

        # a new choice after a loss follows the old version rather than starting again from 1
        lose_everything(raw, redis_prefix)
        later = admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(name="off"),
                                                           expected_version=2), timeout=10)
        assert (later.policy.name, later.version) == ("off", 3)
        assert decide(channel, 2).policy_version == 3
    restored = [r.getMessage() for r in caplog.records if "restored it" in r.getMessage()]
    assert restored and "'fixed' v2" in restored[0]


def test_an_open_stream_keeps_the_policy_across_the_loss(server, raw, redis_prefix):
    with grpc.insecure_channel(server.address) as channel:
        admin_pb2_grpc.AdminStub(channel).SetPolicy(admin_pb2.SetPolicyRequest(policy=fixed(4)), timeout=10)
        outbox: queue.Queue = queue.Queue()

        def messages():
            yield controller_pb2.WorkerMessage(hello=hello("loss-stream"))
            while (item := outbox.get()) is not None:
                yield item

        plans = controller_pb2_grpc.ControllerStub(channel).Connect(messages(), timeout=30)
        try:
            outbox.put(controller_pb2.WorkerMessage(report=report(0)))
            first = next(plans)
            assert (first.policy_name, first.policy_version, first.requests[0].speculation_length) == ("fixed", 1, 4)
            lose_everything(raw, redis_prefix)
            outbox.put(controller_pb2.WorkerMessage(report=report(1)))
            second = next(plans)
            assert (second.policy_name, second.policy_version, second.requests[0].speculation_length) == \
                ("fixed", 1, 4)
            assert not second.degraded
        finally:
            outbox.put(None)
            plans.cancel()
    assert raw.hget(redis_prefix + "policy", "name") == b"fixed"


def test_a_choice_made_after_the_loss_by_a_replica_that_kept_nothing_stays_renumbered_up(
        redis_url, redis_prefix, raw):
    old = ControllerServer(0, redis_url, redis_prefix, redis_retry_after_s=0.0)
    old.start()
    try:
        with grpc.insecure_channel(old.address) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            for k in (2, 3, 4):
                admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=fixed(k)), timeout=10)
            assert decide(channel, 0).policy_version == 3
            lose_everything(raw, redis_prefix)
            # a replica started after the loss knows nothing to restore: the operator's new choice is v1 there
            fresh = ControllerStore(redis_url, redis_prefix)
            try:
                assert fresh.get_policy() is None
                assert fresh.set_policy("off", {}).version == 1
            finally:
                fresh.close()
            # the old replica's next step keeps that newer choice but numbers it above what it saw
            plan = decide(channel, 1)
            assert (plan.policy_name, plan.policy_version) == ("off", 4)
            assert raw.hget(redis_prefix + "policy", "version") == b"4"
            got = admin.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=10)
            assert (got.policy.name, got.version) == ("off", 4)
    finally:
        old.stop(0)


def test_an_older_record_brought_back_is_replaced_by_the_kept_one(redis_url, redis_prefix, raw):
    store = ControllerStore(redis_url, redis_prefix, retry_after_s=0.0)
    try:
        first = store.set_policy("fixed", {"k": 2})
        second = store.set_policy("fixed", {"k": 6})
        assert store.kept_policy == second
        # an old snapshot restored into Redis: the first record, with its older stamp
        raw.hset(redis_prefix + "policy", mapping={"name": "fixed", "parameters": json.dumps({"k": 2}),
                                                    "version": first.version,
                                                    "updated_unix_ms": first.updated_unix_ms})
        assert store.get_policy() == second
        assert raw.hget(redis_prefix + "policy", "version") == b"2"
        # a record newer than the kept one (set by another replica) is taken, and kept from then on
        other = ControllerStore(redis_url, redis_prefix, retry_after_s=0.0)
        try:
            third = other.set_policy("off", {})
        finally:
            other.close()
        assert store.get_policy() == third and store.kept_policy == third
    finally:
        store.close()


def test_nothing_to_restore_when_no_policy_was_ever_set(redis_url, redis_prefix, raw):
    store = ControllerStore(redis_url, redis_prefix, retry_after_s=0.0)
    try:
        assert store.get_policy() is None and store.kept_policy is None
        snapshot = store.read_step("w", "p", "k", policy_stamp="")
        assert snapshot.policy is None
        assert not raw.exists(redis_prefix + "policy")
    finally:
        store.close()
    assert PolicyRecord("fixed", {}, 0).version == 0

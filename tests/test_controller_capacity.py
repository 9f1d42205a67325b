"""The controller's fast path keeps its behaviour: columns, stored tables, reply-then-persist, cached
policy and in-process cost fit give what per-request objects and per-step reads gave."""

from __future__ import annotations

import time

import numpy as np
import pytest

from smartspec.core.acceptance import AcceptanceState
from smartspec.core.cost_model import DEFAULT_COST_MODEL
from smartspec.controller.decider import Decider
from smartspec.controller.history_table import HistoryError, HistoryTable
from smartspec.controller.metrics import ControllerMetrics
from smartspec.core.policies import BatchState, RequestState, default_registry, get, guarded_decide
from smartspec.controller.report_columns import UNKNOWN, ReportColumns
from smartspec.controller.store import ControllerStore
from smartspec.controller.stream_memory import FIT_SAVE_EVERY, StreamMemory
from smartspec.v1 import admin_pb2, admin_pb2_grpc, common_pb2, controller_pb2, controller_pb2_grpc
from wire import outcome


def hello(worker_id="w0", profile="") -> controller_pb2.WorkerHello:
    return controller_pb2.WorkerHello(worker_id=worker_id, proposer_kind=common_pb2.PROPOSER_KIND_NGRAM,
                                      max_speculation_length=6, max_batch_size=64, cost_profile_id=profile)


def report(step, outcomes) -> controller_pb2.StepReport:
    return controller_pb2.StepReport(step_index=step, requests=outcomes, draft_ms=1.0, verify_ms=40.0, total_ms=42.0)


def test_history_table_updates_like_acceptance_state_and_round_trips():
    table = HistoryTable()
    expected: dict[str, AcceptanceState] = {}
    steps = [  # (id, proposed, accepted, tested, requested)
        [("a", 0, 0, 0, 0), ("b", 3, 3, 3, 3), ("ünï:cödé", 2, 0, 1, 4)],
        [("a", 4, 2, 3, 4), ("b", 0, 0, 0, 0), ("ünï:cödé", 0, 0, 0, 2)],
        [("b", 1, 1, 1, 1)],
    ]
    for outcomes in steps:
        ids = [o[0] for o in outcomes]
        columns = np.array([o[1:] for o in outcomes], dtype=np.int64).T
        table.record(table.rows_for(ids), *columns, seen_s=100)
        for rid, proposed, accepted, tested, requested in outcomes:
            expected[rid] = expected.get(rid, AcceptanceState()).update(proposed, accepted, tested, requested)
    assert dict(table) == expected

    table.remove(["a"])
    del expected["a"]
    decoded = HistoryTable.decode(table.encode())
    assert dict(decoded) == expected and decoded.encoded_id("ünï:cödé") == "ünï:cödé".encode()
    decoded.expire(now_s=100 + 60, ttl_s=30)
    assert dict(decoded) == {}
    assert dict(HistoryTable.decode(HistoryTable().encode())) == {}
    with pytest.raises(HistoryError):
        HistoryTable.decode(b'{"accepted": 1}')


def test_report_columns_read_every_field_and_tell_unset_lookahead_from_zero():
    step = report(3, [outcome("a", 4, 2, context=50, proposable=0), outcome("b", 2, 2, requested=3),
                      outcome("c", 0, 0, context=9, finished=True, proposable=5)])
    cols = ReportColumns.from_report(step)
    assert cols.request_ids == ["a", "b", "c"]
    assert cols.proposable.tolist() == [0, UNKNOWN, 5]
    assert cols.requested.tolist() == [4, 3, 0]  # requested_tokens 0 with proposals reads as proposed
    assert cols.finished.tolist() == [False, False, True]
    assert cols.attended_context.tolist() == [50 - 2 - 1, 100 - 2 - 1, 9 - 1]
    assert len(ReportColumns.from_report(report(4, []))) == 0


@pytest.mark.parametrize("name, params", [("goodput", {}), ("heuristic", {}), ("fixed", {"k": 2}),
                                          ("table", {"batch_sizes": [1, 3], "ks": [4, 1]}), ("off", {})])
def test_a_batch_built_from_columns_decides_exactly_like_one_built_from_requests(name, params):
    rng = np.random.default_rng(7)
    requests = tuple(RequestState(f"r{i}", acceptance=float(rng.uniform(0, 1)), context_tokens=int(rng.integers(10, 900)),
                                  last_k=int(rng.integers(0, 6)), last_fully_accepted=bool(rng.integers(0, 2)),
                                  steps_since_speculation=int(rng.integers(0, 12)), evidence=float(rng.integers(0, 30)),
                                  fill=float(rng.uniform(0, 1)))
                     for i in range(40))
    fields = dict(max_k=6, queued_requests=2, step_index=16, pooled_evidence=50.0)
    from_tuple = BatchState(requests=requests, **fields)
    from_columns = BatchState.from_columns(from_tuple.columns, **fields)
    assert from_columns.requests == requests and from_columns.batch_size == 40
    policy = get(name)
    ks = guarded_decide(policy, from_tuple, DEFAULT_COST_MODEL, policy.validate(params))
    assert guarded_decide(policy, from_columns, DEFAULT_COST_MODEL, policy.validate(params)) == ks


@pytest.fixture
def decider(redis_url, redis_prefix):
    store = ControllerStore(redis_url, redis_prefix, retry_after_s=0.0)
    yield Decider(store, default_registry(), ControllerMetrics())
    store.close()


def test_a_stream_step_replies_before_it_writes_and_its_memory_carries_the_state(decider, raw, redis_prefix):
    session = decider.connect(hello())
    memory = StreamMemory()
    first = decider.plan(session, report(0, [outcome("a", context=10), outcome("b", context=20)]), memory)
    assert [r.request_id for r in first.plan.requests] == ["a", "b"]
    assert raw.exists(f"{redis_prefix}hist:w0") == 0  # planned, not yet stored
    decider.persist(session, first, memory)
    assert set(HistoryTable.decode(raw.get(f"{redis_prefix}hist:w0"))) == {"a", "b"}

    # The next step plans from memory, even if what Redis holds is older.
    raw.delete(f"{redis_prefix}hist:w0")
    second = decider.plan(session, report(1, [outcome("a", 2, 2, context=13, finished=True),
                                              outcome("b", 2, 1, context=22)]), memory)
    assert [r.request_id for r in second.plan.requests] == ["b"]
    assert memory.histories["b"].steps == 2 and "a" not in memory.histories
    decider.persist(session, second, memory)
    stored = HistoryTable.decode(raw.get(f"{redis_prefix}hist:w0"))
    assert dict(stored) == {"b": AcceptanceState(accepted=1, tested=2, proposed=2, requested=2, steps=2, last_k=2)}


def test_a_stream_stores_its_own_cost_fit_every_few_steps_and_when_it_ends(decider):
    session = decider.connect(hello(profile="solo"))
    memory = StreamMemory()
    writers = []
    for step in range(FIT_SAVE_EVERY + 1):
        planned = decider.plan(session, report(step, [outcome("a", 1, 1, context=10 + step)]), memory)
        decider.persist(session, planned, memory)
        writers.append(memory.cost_fit_writer)
    assert len(set(writers)) == 2 and memory.fit_unsaved_steps == 1  # one save after FIT_SAVE_EVERY steps
    decider.flush(session, memory)
    assert memory.fit_unsaved_steps == 0
    assert decider.store.get_cost_fit("solo")["steps"] == FIT_SAVE_EVERY + 1


def test_workers_sharing_a_cost_profile_keep_pooling_their_steps(decider):
    sessions = [decider.connect(hello(f"w{i}", profile="shared")) for i in range(2)]
    memories = [StreamMemory(), StreamMemory()]
    for step in range(2 * FIT_SAVE_EVERY + 2):
        for session, memory in zip(sessions, memories):
            planned = decider.plan(session, report(step, [outcome("a", 1, 1, context=10 + step)]), memory)
            decider.persist(session, planned, memory)
    assert all(m.fit_shared for m in memories)
    # Once they see each other, each step starts from the other's last write: the stored fit counts
    # (nearly) every step of both workers, as one read-modify-write per step did.
    steps = decider.store.get_cost_fit("shared")["steps"]
    assert 2 * (2 * FIT_SAVE_EVERY + 2) - FIT_SAVE_EVERY <= steps <= 2 * (2 * FIT_SAVE_EVERY + 2)


class Stream:
    """A live Connect stream: send a report, get its plan."""

    def __init__(self, channel, first: controller_pb2.WorkerHello) -> None:
        import queue

        self._outbox: queue.Queue = queue.Queue()
        self._outbox.put(controller_pb2.WorkerMessage(hello=first))
        self._plans = controller_pb2_grpc.ControllerStub(channel).Connect(iter(self._outbox.get, None), timeout=30)

    def send(self, step: controller_pb2.StepReport) -> controller_pb2.StepPlan:
        self._outbox.put(controller_pb2.WorkerMessage(report=step))
        return next(self._plans)

    def close(self) -> None:
        self._outbox.put(None)
        assert list(self._plans) == []


def test_a_policy_set_on_one_replica_reaches_a_stream_on_the_other_at_its_next_step(replicas, raw, redis_prefix):
    a, b = replicas
    stream = Stream(b, hello())
    assert stream.send(report(0, [outcome("x")])).policy_name == "goodput"
    admin_pb2_grpc.AdminStub(a).SetPolicy(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(
        name="fixed", parameters={"k": common_pb2.ParameterValue(int_value=5)})))
    plan = stream.send(report(1, [outcome("x", 1, 1)]))
    assert (plan.policy_name, plan.policy_version, plan.requests[0].speculation_length) == ("fixed", 1, 5)
    assert plan.basis.policy.name == "fixed" and plan.basis.policy_version == 1

    # Written to Redis by anything else (same hash, new version): the next step sees it too.
    raw.hset(f"{redis_prefix}policy", mapping={"name": "off", "parameters": "{}", "version": 2,
                                                "updated_unix_ms": int(time.time() * 1000)})
    plan = stream.send(report(2, [outcome("x", 5, 5)]))
    assert (plan.policy_name, plan.policy_version, plan.requests[0].speculation_length) == ("off", 2, 0)
    stream.close()

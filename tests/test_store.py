"""ControllerStore against a real Redis: key layout, TTLs, atomic policy versions, decayed prior."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from smartspec.core.acceptance import AcceptanceState
from smartspec.controller.history_table import HistoryTable
from smartspec.controller.store import (
    ControllerStore,
    StepWrites,
    StoreUnavailable,
    WorkerFigures,
)
from smartspec.controller.store_policy import VersionMismatch, policy_stamp


@pytest.fixture
def store(redis_url, redis_prefix):
    s = ControllerStore(redis_url, redis_prefix, request_ttl_s=120, retry_after_s=0.0)
    yield s
    s.close()


def _writes(histories=None, finished=(), prior=(0.0, 0.0, 0.0, 0.0), decay=1.0, cost_fit=None, worker_id="w0"):
    return StepWrites(
        worker_id=worker_id,
        cost_profile_id="profile-a",
        proposer_kind="PROPOSER_KIND_NGRAM",
        histories=histories if histories is not None else {},
        finished=tuple(finished),
        cost_fit=cost_fit,
        prior_accepted=prior[0],
        prior_tested=prior[1],
        prior_decay=decay,
        prior_proposed=prior[2] if len(prior) > 2 else 0.0,
        prior_requested=prior[3] if len(prior) > 3 else 0.0,
        totals={"steps": 1, "proposed": 4, "accepted": 3},
        figures=WorkerFigures(predicted_step_ms=12.5, predicted_tokens=3.25, goodput_tok_s=100.0),
    )


def test_empty_store_reads_nothing(store):
    snap = store.read_step("w0", "profile-a", "PROPOSER_KIND_NGRAM")
    assert snap.histories == {}
    assert snap.cost_fit is None and snap.prior is None and snap.policy is None
    assert snap.worker.predicted_step_ms is None


def test_step_round_trip_with_ttls_and_deletion(store, raw, redis_prefix):
    a = AcceptanceState(accepted=7, tested=9, steps=3, last_k=4, last_fully_accepted=False, steps_since_speculation=0)
    b = AcceptanceState(accepted=1, tested=1, steps=1, last_k=1, last_fully_accepted=True)
    writer = store.write_step(_writes({"a": a, "b": b}, cost_fit={"x": [1.5, 2.25]}), info={"model": "m"})
    assert writer

    snap = store.read_step("w0", "profile-a", "PROPOSER_KIND_NGRAM")
    assert dict(snap.histories) == {"a": a, "b": b}
    assert snap.cost_fit == {"x": [1.5, 2.25]} and snap.cost_fit_writer == writer
    assert snap.worker == WorkerFigures(12.5, 3.25, 100.0)

    ttl = raw.ttl(f"{redis_prefix}hist:w0")
    assert 0 < ttl <= 120
    assert raw.ttl(f"{redis_prefix}fit:profile-a") > 0
    assert raw.ttl(f"{redis_prefix}worker:w0") > 0

    # Another worker's request with the same id is a different entry.
    assert store.read_step("w1", "profile-a", "PROPOSER_KIND_NGRAM").histories == {}

    # A write stores the worker's whole table: a finished request is no longer in it.
    store.write_step(_writes({"b": b}, finished=["a"]))
    assert store.read_step("w0", "p", "k").histories == {"b": b}
    assert store.get_histories("w0") == {"b": b}


def test_read_sends_the_fit_and_the_policy_only_when_they_changed(store):
    writer = store.write_step(_writes(cost_fit={"x": [1.0]}))
    held = store.read_step("w0", "profile-a", "PROPOSER_KIND_NGRAM", cost_fit_writer=writer, policy_stamp=":")
    assert held.cost_fit_unchanged and held.cost_fit is None
    assert held.policy_unchanged and held.policy is None  # ":" = none set, and none is
    other = store.write_step(_writes(cost_fit={"x": [2.0]}), cost_fit_writer="another-replica:1")
    assert other == "another-replica:1"
    changed = store.read_step("w0", "profile-a", "PROPOSER_KIND_NGRAM", cost_fit_writer=writer, policy_stamp=":")
    assert not changed.cost_fit_unchanged and changed.cost_fit == {"x": [2.0]}

    record = store.set_policy("fixed", {"k": 3})
    stale = store.read_step("w0", "profile-a", "PROPOSER_KIND_NGRAM", policy_stamp=":")
    assert not stale.policy_unchanged and (stale.policy.name, stale.policy.version) == ("fixed", 1)
    current = store.read_step("w0", "profile-a", "PROPOSER_KIND_NGRAM", policy_stamp=policy_stamp(record))
    assert current.policy_unchanged


def test_requests_not_reported_for_the_ttl_are_dropped(store):
    table = HistoryTable.from_states({"old": AcceptanceState(steps=1), "new": AcceptanceState(steps=2)}, seen_s=0)
    table.record(table.rows_for(["new"]), *(np.zeros(1, dtype=np.int64),) * 4, seen_s=int(time.time()))
    store.write_step(_writes(table))
    assert set(store.read_step("w0", "p", "k").histories) == {"new"}


def test_prior_is_decayed_and_added_atomically(store):
    store.write_step(_writes(prior=(3.0, 4.0, 5.0, 8.0), decay=0.5))
    store.write_step(_writes(prior=(1.0, 2.0, 0.0, 4.0), decay=0.5))
    prior = store.read_step("w0", "profile-a", "PROPOSER_KIND_NGRAM").prior
    assert prior.accepted == pytest.approx(3.0 * 0.5 + 1.0)
    assert prior.tested == pytest.approx(4.0 * 0.5 + 2.0)
    assert prior.proposed == pytest.approx(5.0 * 0.5 + 0.0)
    assert prior.requested == pytest.approx(8.0 * 0.5 + 4.0)

    # Concurrent writers (workers sharing a proposer kind) never lose counts.
    threads = [threading.Thread(target=lambda: [store.write_step(_writes(prior=(1.0, 1.0))) for _ in range(10)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    prior = store.read_step("w0", "profile-a", "PROPOSER_KIND_NGRAM").prior
    assert prior.tested == pytest.approx(4.0 + 40.0)


def test_a_choice_workers_member_evidence_pools_with_that_kinds_own_workers(store):
    """A worker choosing proposers per request adds each member's evidence to that kind's prior, in
    the same atomic write: a plain prompt-lookup worker reads it as its own kind's pool."""
    import dataclasses

    store.write_step(_writes(prior=(2.0, 4.0, 4.0, 4.0), decay=0.5))       # an ngram worker's step
    choice = dataclasses.replace(
        _writes(prior=(5.0, 9.0, 9.0, 9.0), decay=0.5, worker_id="w1"), proposer_kind="PROPOSER_KIND_CHOICE",
        member_evidence={"PROPOSER_KIND_NGRAM": (4.0, 6.0, 6.0, 6.0), "PROPOSER_KIND_SUFFIX": (1.0, 3.0, 3.0, 3.0)})
    store.write_step(choice)
    ngram = store.read_step("w0", "profile-a", "PROPOSER_KIND_NGRAM").prior
    assert (ngram.accepted, ngram.tested) == pytest.approx((2.0 * 0.5 + 4.0, 4.0 * 0.5 + 6.0))
    snapshot = store.read_step("w1", "profile-a", "PROPOSER_KIND_CHOICE",
                               member_kinds=("PROPOSER_KIND_NGRAM", "PROPOSER_KIND_SUFFIX", "PROPOSER_KIND_DRAFT"))
    assert (snapshot.prior.accepted, snapshot.prior.tested) == (5.0, 9.0)
    members = snapshot.member_priors
    assert members["PROPOSER_KIND_NGRAM"].tested == pytest.approx(8.0)
    assert (members["PROPOSER_KIND_SUFFIX"].accepted, members["PROPOSER_KIND_SUFFIX"].tested) == (1.0, 3.0)
    assert members["PROPOSER_KIND_DRAFT"] is None                        # never pooled yet
    assert store.read_step("w0", "profile-a", "PROPOSER_KIND_NGRAM").member_priors == {}


def test_policy_versions_increase_and_compare_and_set(store):
    assert store.get_policy() is None
    first = store.set_policy("fixed", {"k": 3})
    assert first.version == 1
    second = store.set_policy("table", {"batch_sizes": [1, 8], "ks": [4, 0]}, expected_version=1)
    assert second.version == 2
    with pytest.raises(VersionMismatch) as info:
        store.set_policy("off", {}, expected_version=1)
    assert info.value.actual == 2
    stored = store.get_policy()
    assert (stored.name, stored.parameters, stored.version) == ("table", {"batch_sizes": [1, 8], "ks": [4, 0]}, 2)
    assert stored.updated_unix_ms == second.updated_unix_ms


def test_concurrent_policy_sets_get_distinct_versions(store):
    versions: list[int] = []
    lock = threading.Lock()

    def set_many():
        for i in range(10):
            record = store.set_policy("fixed", {"k": i})
            with lock:
                versions.append(record.version)

    threads = [threading.Thread(target=set_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 41))
    assert store.get_policy().version == 40


def test_workers_listing_and_reset(store):
    store.register_worker("w0", {"model": "m0", "cost_profile_id": "p0"}, reset_totals=True)
    store.write_step(_writes())
    store.write_step(_writes())
    (record,) = store.list_workers(seen_within_s=60)
    assert record.worker_id == "w0" and record.info["model"] == "m0"
    assert record.totals["steps"] == 2 and record.totals["proposed"] == 8 and record.totals["accepted"] == 6
    assert record.cost_profile_id == "p0"
    store.register_worker("w0", {"model": "m0"}, reset_totals=True)  # a new connection
    (record,) = store.list_workers(seen_within_s=60)
    assert record.totals["steps"] == 0


def test_unreachable_redis_raises_typed_error():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = ControllerStore(f"redis://127.0.0.1:{port}/0", "x:", timeout_s=0.2, retry_after_s=30.0)
    with pytest.raises(StoreUnavailable):
        store.read_step("w0", "p", "k")
    with pytest.raises(StoreUnavailable, match="marked down"):  # no reconnect storm during an outage
        store.get_policy()
    assert store.ping() is False
    store.close()


def test_request_ids_with_colons_stay_distinct(store):
    store.write_step(_writes({"x:y": AcceptanceState(accepted=1, tested=1)}))
    histories = store.read_step("w0", "p", "k").histories
    assert histories["x:y"].accepted == 1 and "x" not in histories


def test_closed_store_is_unavailable_not_a_crash(redis_url, redis_prefix):
    """Steps still in flight while a server stops must degrade, not fail with INTERNAL."""
    store = ControllerStore(redis_url, redis_prefix)
    store.read_step("w0", "p", "k")
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.read_step("w0", "p", "k")


def test_a_step_may_carry_the_fit_itself_and_the_store_serialises_it(store):
    """The planner hands over the live OnlineCostFit (serialising it every step cost the controller
    CPU while most steps do not store it): what is stored is its state, which restores the same model."""
    from smartspec.core.cost_fit import OnlineCostFit

    fit = OnlineCostFit.create()
    fit.observe([3, 0], [400, 300], [0, 0], 0.5, 60.0, 61.0)
    store.write_step(_writes(cost_fit=fit))
    stored = store.get_cost_fit("profile-a")
    assert stored == json.loads(json.dumps(fit.to_dict()))
    assert OnlineCostFit.from_dict(stored).model() == fit.model()

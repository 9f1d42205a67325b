"""The controller as workers and operators see it: real gRPC on loopback, real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from smartspec.controller.history_table import HistoryTable
from smartspec.controller.server import ControllerServer
from smartspec.core.processes import free_port
from smartspec.v1 import admin_pb2, admin_pb2_grpc, common_pb2, controller_pb2, controller_pb2_grpc
from wire import outcome


def hello(worker_id="w0", max_k=8, max_batch=256, **kw) -> controller_pb2.WorkerHello:
    return controller_pb2.WorkerHello(worker_id=worker_id, proposer_kind=common_pb2.PROPOSER_KIND_NGRAM,
                                      max_speculation_length=max_k, max_batch_size=max_batch, **kw)


def report(step, outcomes, draft_ms=1.0, verify_ms=90.0) -> controller_pb2.StepReport:
    return controller_pb2.StepReport(step_index=step, requests=outcomes, draft_ms=draft_ms, verify_ms=verify_ms,
                                     total_ms=draft_ms + verify_ms + 1.0)


def stream(channel, first, reports):
    messages = [controller_pb2.WorkerMessage(hello=first)]
    messages += [controller_pb2.WorkerMessage(report=r) for r in reports]
    return list(controller_pb2_grpc.ControllerStub(channel).Connect(iter(messages), timeout=30))




def stored_histories(raw, prefix: str, worker_id: str) -> HistoryTable:
    """The worker's request histories as the controller stored them."""
    return HistoryTable.decode(raw.get(f"{prefix}hist:{worker_id}"))


@pytest.fixture
def server(redis_url, redis_prefix):
    srv = ControllerServer(0, redis_url, redis_prefix, redis_retry_after_s=0.0, metrics_port=free_port())
    srv.start()
    yield srv
    srv.stop(0)


def test_stream_answers_each_report_in_order(channel, raw, redis_prefix):
    reports = [
        report(10, [outcome("a", context=50), outcome("b", context=60)]),
        report(11, [outcome("a", 4, 4, context=55), outcome("b", 4, 1, context=62), outcome("c", context=20)]),
        report(12, [outcome("c", 2, 2, context=23, finished=True), outcome("a", 4, 3, context=59)]),
    ]
    plans = stream(channel, hello(), reports)
    assert [p.step_index for p in plans] == [10, 11, 12]
    assert [[r.request_id for r in p.requests] for p in plans] == [["a", "b"], ["a", "b", "c"], ["a"]]
    for p in plans:
        assert not p.HasField("error") and not p.degraded
        assert p.policy_name == "goodput" and p.policy_version == 0
        assert all(r.speculation_length <= 8 for r in p.requests)
        assert p.predicted_step_ms > 0 and p.predicted_tokens >= len(p.requests)

    # Acceptance history: a = 0+4+3 accepted over 0+4+4 tested; c finished and was forgotten.
    histories = stored_histories(raw, redis_prefix, "w0")
    a = histories["a"]
    assert (a.accepted, a.tested, a.steps, a.last_k) == (7, 8, 3, 4)
    b = histories["b"]
    assert (b.accepted, b.tested) == (1, 2)
    assert "c" not in histories
    assert 0 < raw.ttl(f"{redis_prefix}hist:w0") <= 600


def test_decide_low_load_high_acceptance_speculates_fully_and_costly_big_batch_does_not(channel):
    stub = controller_pb2_grpc.ControllerStub(channel)
    worker = hello(max_k=6)
    # Three steps of a request whose every proposal is accepted: a -> 1, so E(k) = k + 1 grows
    # faster than the step time and the largest k wins.
    plan = None
    for step in range(3):
        plan = stub.Decide(controller_pb2.DecideRequest(
            worker=worker, report=report(step, [outcome("hot", 4, 4, context=100 + 5 * step)])))
    assert [(r.request_id, r.speculation_length) for r in plan.requests] == [("hot", 6)]

    # The same request among 128, with a cost model where every speculated token is dear and any
    # speculation costs a whole extra step: k = 0 for all is the goodput optimum.
    costly = common_pb2.CostModel(c_fixed_ms=10.0, c_spec_ms=500.0, c_tok_ms=20.0, c_kv_ms=0.0)
    batch = [outcome("hot", 4, 4, context=120)] + [outcome(f"r{i}", context=100) for i in range(127)]
    plan = stub.Decide(controller_pb2.DecideRequest(worker=worker, report=report(3, batch),
                                                    cost_model_override=costly))
    assert len(plan.requests) == 128 and plan.requests[0].request_id == "hot"
    assert all(r.speculation_length == 0 for r in plan.requests)
    # The prediction uses the override: 10 + 20 * 128 tokens (+ negligible nothing else).
    assert plan.predicted_step_ms == pytest.approx(10.0 + 20.0 * 128)


def test_admin_list_get_set_and_next_plan_uses_it(channel):
    admin = admin_pb2_grpc.AdminStub(channel)
    listed = {p.name: p for p in admin.ListPolicies(admin_pb2.ListPoliciesRequest()).policies}
    assert {"goodput", "off", "fixed"} <= set(listed)
    k_schema = {s.name: s for s in listed["fixed"].parameters}["k"]
    assert k_schema.type == admin_pb2.PARAMETER_TYPE_INT and k_schema.HasField("maximum")

    active = admin.GetPolicy(admin_pb2.GetPolicyRequest())
    assert (active.policy.name, active.version) == ("goodput", 0)

    set_to = admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(
        name="fixed", parameters={"k": common_pb2.ParameterValue(int_value=3)})))
    assert (set_to.policy.name, set_to.version, set_to.policy.parameters["k"].int_value) == ("fixed", 1, 3)
    got = admin.GetPolicy(admin_pb2.GetPolicyRequest())
    assert (got.policy.name, got.version, got.updated_unix_ms) == ("fixed", 1, set_to.updated_unix_ms)

    plan = controller_pb2_grpc.ControllerStub(channel).Decide(controller_pb2.DecideRequest(
        worker=hello(), report=report(0, [outcome("x"), outcome("y")])))
    assert (plan.policy_name, plan.policy_version) == ("fixed", 1)
    assert [r.speculation_length for r in plan.requests] == [3, 3]

    # Compare-and-set on the version.
    with pytest.raises(grpc.RpcError) as info:
        admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(name="off"), expected_version=7))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(name="off"),
                                                      expected_version=1)).version == 2


def test_status_reports_workers_totals_and_cost_model(channel):
    stream(channel, hello("w-status", model="SmolLM2", proposer="ngram", device="cpu"), [
        report(0, [outcome("a", context=10)]),
        report(1, [outcome("a", 4, 2, context=13)]),
        report(2, [outcome("a", 4, 4, context=18)]),
    ])
    status = admin_pb2_grpc.AdminStub(channel).GetStatus(admin_pb2.GetStatusRequest())
    assert status.redis_ok and status.controller_id
    (worker,) = [w for w in status.workers if w.worker_id == "w-status"]
    assert (worker.model, worker.proposer, worker.device, worker.max_speculation_length) == \
        ("SmolLM2", "ngram", "cpu", 8)
    assert (worker.steps, worker.proposed_tokens, worker.accepted_tokens) == (3, 8, 6)
    assert worker.generated_tokens == 1 + 3 + 5
    assert worker.acceptance_rate == pytest.approx(6 / 7)  # tested: 0 + 3 + 4
    assert worker.goodput_tok_s > 0 and worker.cost_model.c_tok_ms > 0


def test_health_reflection_and_metrics(server, channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "smartspec.v1.Controller", "smartspec.v1.Admin"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"smartspec.v1.Controller", "smartspec.v1.Admin", "grpc.health.v1.Health"} <= names

    stream(channel, hello(), [report(0, [outcome("a"), outcome("b")]), report(1, [outcome("a", 3, 1)])])
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.bound_metrics_port}/metrics", timeout=5).read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['smartspec_controller_steps_total{policy="goodput"}'] == 2
    assert samples["smartspec_controller_chosen_k_count"] == 3  # planned request-steps: 2 + 1
    assert samples["smartspec_controller_proposed_tokens_total"] == 3
    assert samples["smartspec_controller_accepted_tokens_total"] == 1
    assert samples["smartspec_controller_redis_ok"] == 1
    assert samples["smartspec_controller_degraded_steps_total"] == 0


def test_cli_subprocess_serves_health_and_exits_on_sigterm(redis_url, redis_prefix):
    env = {**os.environ, "SMARTSPEC_REDIS_PREFIX": redis_prefix}  # set via env: add_option wiring
    proc = subprocess.Popen(
        [sys.executable, "-m", "smartspec.cli", "controller", "--port", "0", "--host", "127.0.0.1",
         "--redis", redis_url, "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = ""
        timer = threading.Timer(30, proc.kill)
        timer.start()
        for line in proc.stdout:
            if line.startswith("controller listening on"):
                break
        timer.cancel()
        assert line.startswith("controller listening on 127.0.0.1:"), proc.stderr.read()
        address = line.split()[-1]
        with grpc.insecure_channel(address) as ch:
            check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            admin_pb2_grpc.AdminStub(ch).SetPolicy(admin_pb2.SetPolicyRequest(
                policy=common_pb2.PolicySpec(name="off")), timeout=10)
        # The prefix came from SMARTSPEC_REDIS_PREFIX.
        assert redis.Redis.from_url(redis_url).exists(f"{redis_prefix}policy") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_planner_pure_step_bookkeeping():
    """plan_step without gRPC or Redis: evidence, pooled prior, override vs fit, writes."""
    from smartspec.core.cost_fit import OnlineCostFit
    from smartspec.core.cost_model import DEFAULT_COST_MODEL, CostModel
    from smartspec.controller.planner import PlannerSettings, plan_step
    from smartspec.core.policies import get
    from smartspec.controller.store import StepSnapshot

    step = report(3, [outcome("old", 4, 4, context=40), outcome("new", context=10),
                      outcome("done", 2, 0, context=70, finished=True)])
    fit = OnlineCostFit.create(DEFAULT_COST_MODEL)
    flat = CostModel(c_fixed_ms=5.0, c_tok_ms=1.0)
    policy = get("fixed")
    decision = plan_step(hello(max_k=3), step, StepSnapshot(histories={}, cost_fit=None, prior=None, policy=None),
                         cost_fit=fit, policy=policy, params=policy.validate({"k": 3}),
                         settings=PlannerSettings(prior_strength=8.0, prior_decay=1.0),
                         cost_override=flat, proposer_kind="PROPOSER_KIND_NGRAM", cost_profile_id="p")
    assert decision.request_ids == ("old", "new") and decision.speculation_lengths == (3, 3)
    # Pooled evidence of this step: 4 + 0 accepted over 4 + 1 tested, so the new request starts at 0.8
    # and the old one is its own 4/4 shrunk toward 0.8 with weight 8.
    assert decision.acceptances[1] == pytest.approx(4 / 5)
    assert decision.acceptances[0] == pytest.approx((4 + 0.8 * 8) / (4 + 8))
    # Prediction from the override (k = 3 each: 5 + 1 * 2 * (3 + 1)), the fit still learned the step.
    assert decision.predicted_step_ms == pytest.approx(5.0 + 8.0)
    assert fit.steps == 1 and decision.writes.cost_fit.to_dict()["steps"] == 1
    writes = decision.writes
    assert set(writes.histories) == {"old", "new"} and writes.finished == ("done",)
    assert (writes.prior_accepted, writes.prior_tested) == (4.0, 5.0)
    assert writes.totals["generated"] == 5 + 1 + 1 and writes.totals["planned_k"] == 6


def test_planner_learns_fill_apart_from_acceptance():
    """2 proposals offered of 3 requested, both accepted: acceptance counts 2 of 2 tested, fill 2 of 3,
    in the request's history and in the pooled prior; the plan uses both estimates."""
    from smartspec.core.cost_fit import OnlineCostFit
    from smartspec.core.cost_model import CostModel
    from smartspec.controller.planner import PlannerSettings, plan_step
    from smartspec.core.policies import get
    from smartspec.controller.store import StepSnapshot

    policy = get("fixed")
    common = dict(cost_fit=OnlineCostFit.create(), policy=policy, params=policy.validate({"k": 3}),
                  settings=PlannerSettings(prior_decay=1.0, prior_strength=8.0),
                  cost_override=CostModel(c_fixed_ms=5.0, c_tok_ms=1.0),
                  proposer_kind="PROPOSER_KIND_NGRAM", cost_profile_id="p")
    empty = StepSnapshot(histories={}, cost_fit=None, prior=None, policy=None)
    decision = plan_step(hello(max_k=3), report(1, [outcome("a", 2, 2, context=13, requested=3)]), empty, **common)
    history = decision.writes.histories["a"]
    assert (history.accepted, history.tested, history.proposed, history.requested) == (2, 2, 2, 3)
    writes = decision.writes
    assert (writes.prior_accepted, writes.prior_tested, writes.prior_proposed, writes.prior_requested) == (2, 2, 2, 3)
    # own 2/3 blended with the pooled 2/3 (this very step's evidence): 2/3
    assert decision.fills == (pytest.approx(2 / 3),)
    assert decision.acceptances == (pytest.approx(1.0),)
    # an older worker that does not report requested_tokens: everything offered counts as asked
    old = plan_step(hello(max_k=3), report(1, [outcome("b", 2, 1, context=13)]), empty, **common)
    assert old.writes.histories["b"].requested == 2 and old.fills == (pytest.approx(1.0),)


def test_planner_plans_on_what_the_proposer_can_offer_next_step():
    """A worker that looks ahead (prompt lookup) says what each request's proposer has for the next
    step: nothing -> k 0 and fill 0; fewer than k -> only that many; unset (a draft model) -> the
    average fill and the policy's k; more than k -> the policy's k."""
    from smartspec.core.cost_fit import OnlineCostFit
    from smartspec.core.cost_model import CostModel
    from smartspec.controller.planner import PlannerSettings, plan_step
    from smartspec.core.policies import get
    from smartspec.controller.store import StepSnapshot

    policy = get("fixed")
    empty = StepSnapshot(histories={}, cost_fit=None, prior=None, policy=None)
    step = report(1, [outcome("dry", 0, 0, requested=3, proposable=0),
                      outcome("short", 3, 3, requested=3, proposable=2),
                      outcome("draft", 3, 3, requested=3),
                      outcome("long", 3, 3, requested=3, proposable=8)])
    decision = plan_step(hello(max_k=8), step, empty, cost_fit=OnlineCostFit.create(), policy=policy,
                         params=policy.validate({"k": 3}), settings=PlannerSettings(prior_decay=1.0),
                         cost_override=CostModel(c_fixed_ms=5.0, c_tok_ms=1.0),
                         proposer_kind="PROPOSER_KIND_NGRAM", cost_profile_id="p")
    assert decision.speculation_lengths == (0, 2, 3, 3)
    assert decision.fills[0] == 0.0 and decision.fills[1] == 1.0 and decision.fills[3] == 1.0
    # 9 offered of 12 asked this step pool to 0.75; the draft request's own 3 of 3 blended with it
    assert decision.fills[2] == pytest.approx((3 + 0.75 * 8) / (3 + 8))


def test_goodput_asks_a_rarely_matching_request_exactly_when_it_has_a_match():
    """A request whose lookup matched 1 step in 10 (but is right when it matches): planning on the
    average fill does not pay for c_spec, so it would never be asked; told that a match is there now,
    goodput asks for it, and told there is none, it does not."""
    from smartspec.core.acceptance import AcceptanceState, PooledPrior
    from smartspec.core.cost_fit import OnlineCostFit
    from smartspec.core.cost_model import CostModel
    from smartspec.controller.planner import PlannerSettings, plan_step
    from smartspec.core.policies import get
    from smartspec.controller.store import StepSnapshot

    policy = get("goodput")
    history = AcceptanceState(accepted=45, tested=50, proposed=50, requested=500, steps=100)
    pooled = PooledPrior(accepted=90, tested=100, proposed=100, requested=1000)  # warm: no cold probing
    snapshot = StepSnapshot(histories={"r": history}, cost_fit=None, prior=pooled, policy=None)
    common = dict(cost_fit=OnlineCostFit.create(), policy=policy, params=policy.validate({}),
                  settings=PlannerSettings(prior_decay=1.0),
                  cost_override=CostModel(c_fixed_ms=10.0, c_spec_ms=5.0, c_tok_ms=1.0),
                  proposer_kind="PROPOSER_KIND_NGRAM", cost_profile_id="p")

    def plan(proposable):
        step = report(7, [outcome("r", 0, 0, context=50, proposable=proposable)])
        return plan_step(hello(max_k=8), step, snapshot, **common)

    assert plan(None).speculation_lengths == (0,)  # average fill ~0.1: not worth c_spec
    assert plan(8).speculation_lengths[0] >= 4  # a match is there: worth several tokens
    assert plan(0).speculation_lengths == (0,)


def test_bearer_token_guards_services_but_not_health(redis_url, redis_prefix):
    from smartspec.core.security import ServerSecurity

    srv = ControllerServer(0, redis_url, redis_prefix, security=ServerSecurity(auth_token="s3cret"))
    srv.start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                admin.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                list(controller_pb2_grpc.ControllerStub(ch).Connect(
                    iter([controller_pb2.WorkerMessage(hello=hello())]), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            got = admin.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=10,
                                  metadata=[("authorization", "Bearer s3cret")])
            assert got.policy.name == "goodput"
    finally:
        srv.stop(0)


def choice_hello(worker_id="choice-0", members=(common_pb2.PROPOSER_KIND_NGRAM, common_pb2.PROPOSER_KIND_SUFFIX)):
    return controller_pb2.WorkerHello(worker_id=worker_id, proposer_kind=common_pb2.PROPOSER_KIND_CHOICE,
                                      max_speculation_length=8, max_batch_size=64, member_kinds=list(members))


def named(message: controller_pb2.RequestOutcome, kind: int) -> controller_pb2.RequestOutcome:
    message.proposer_kind = kind
    return message


def test_a_choice_workers_member_evidence_is_pooled_with_that_kinds_workers_and_sent_back(channel):
    """A worker choosing between prompt lookup and suffix decoding names the member of each row's
    proposals: prompt lookup's rows land in the pool every prompt-lookup worker plans with (its
    basis prior), suffix's in suffix's, and the choice worker's own bases carry both pools."""
    ngram, suffix = common_pb2.PROPOSER_KIND_NGRAM, common_pb2.PROPOSER_KIND_SUFFIX
    reports = [report(0, [outcome("a", context=40), outcome("b", context=40)])]
    reports += [report(step, [named(outcome("a", 4, 4, context=40 + 5 * step), ngram),
                              named(outcome("b", 4, 0, context=40 + step), suffix)]) for step in range(1, 6)]
    plans = stream(channel, choice_hello(), reports)
    assert all(not p.HasField("error") for p in plans)
    members = {m.kind: m for m in plans[-1].basis.member_priors}
    assert set(members) == {ngram, suffix}
    assert members[ngram].accepted == pytest.approx(members[ngram].tested)      # every ngram position accepted
    assert members[suffix].accepted == 0 and members[suffix].tested > 0        # suffix: a first-token miss each step
    assert members[ngram].tested == pytest.approx(20.0, rel=0.05)              # 5 steps x 4, barely decayed
    # A plain prompt-lookup worker's first plan starts from the pool the choice worker's ngram rows filled.
    (plain,) = stream(channel, hello("plain-ngram"), [report(0, [outcome("z", context=40)])])
    assert plain.basis.prior_tested == pytest.approx(members[ngram].tested, rel=0.05)
    assert plain.basis.prior_accepted == pytest.approx(members[ngram].accepted, rel=0.05)
    assert not plain.basis.member_priors


def test_member_kinds_and_named_members_are_checked(channel):
    ngram = common_pb2.PROPOSER_KIND_NGRAM
    bad_hellos = {
        "hello.member_kinds": hello("not-a-choice", member_kinds=[ngram]),
        "hello.member_kinds[1]": choice_hello(members=(ngram, common_pb2.PROPOSER_KIND_CHOICE)),
    }
    for field, bad in bad_hellos.items():   # a bad hello ends the stream with the status naming the field
        with pytest.raises(grpc.RpcError) as caught:
            stream(channel, bad, [report(0, [outcome("a")])])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(field + ":")
    plans = stream(channel, choice_hello(), [
        report(0, [outcome("a", context=40)]),
        report(1, [named(outcome("a", 2, 1, context=42), common_pb2.PROPOSER_KIND_DRAFT)]),   # not a member
        report(2, [named(outcome("a", 2, 2, context=45), ngram)]),
    ])
    assert plans[1].error.field == "requests[0].proposer_kind"
    assert plans[1].error.grpc_status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not plans[2].HasField("error")                                     # the stream goes on
    # A worker without members may not name one either.
    plans = stream(channel, hello("plain"), [report(0, [named(outcome("a", 2, 1, context=42), ngram)])])
    assert plans[0].error.field == "requests[0].proposer_kind"

"""One decision pipeline (core/decision.py): the controller, the worker and the simulator plan alike.

The same facts (a few steps of a batch with mixed acceptance, look-ahead or not, requests joining and
finishing) are fed to the controller's `plan_step`, the worker's local planner, the worker's re-plan
of the controller's basis and the simulator's planner, each through its own bookkeeping. Every step,
all four must show the policy the same batch (estimates, evidence, pooled prior, step index) and
make the same plan. A copy that pooled or decayed the prior differently breaks it (checked below).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest

from smartspec.bench.sim_planner import SimPlanner
from smartspec.controller.codec import plan_basis_proto
from smartspec.controller.planner import PlannerSettings, plan_step
from smartspec.controller.report_columns import UNKNOWN
from smartspec.controller.store import StepSnapshot
from smartspec.core.acceptance import (
    AcceptanceState,
    cap_to_proposable,
    estimate,
    next_step_fill,
    positions_tested,
    pooled_rate,
)
from smartspec.core.cost_fit import OnlineCostFit
from smartspec.core.cost_model import CostModel
from smartspec.core.decision import (
    UNKNOWN_PROPOSABLE,
    AcceptanceBook,
    Evidence,
    blend,
    cap_columns,
    planning_fill,
)
from smartspec.core.policies import get
from smartspec.v1 import common_pb2, controller_pb2
from smartspec.worker.controller_link import report_to_proto
from smartspec.worker.local_policy import LocalPolicyPlanner, PolicyChoice
from smartspec.worker.replan import decode_basis, replan
from smartspec.worker.steps import SpeculationQuery, RequestFacts, StepFacts

MAX_K = 6
COST = CostModel(c_fixed_ms=6.94, c_spec_ms=1.5, c_tok_ms=0.0184, c_kv_ms=4.86e-5, c_spec_row_ms=0.4)
SETTINGS = PlannerSettings()  # the default prior strength and per-step decay (0.995)


# --- the pieces, element by element ------------------------------------------------------------

def test_vectorised_estimate_is_the_scalar_estimate():
    rng = np.random.default_rng(2)
    tested = rng.integers(0, 40, 30)
    accepted = (tested * rng.random(30)).astype(int)
    for prior_accepted, prior_tested in ((13.0, 20.0), (0.0, 0.0)):
        ours = blend(accepted, tested, pooled_rate(prior_accepted, prior_tested, 0.5), 8.0)
        theirs = [estimate(a, t, prior_accepted, prior_tested, 8.0, 0.5) for a, t in zip(accepted, tested)]
        assert ours.tolist() == theirs  # the same arithmetic: equal, not only close


def test_vectorised_fill_and_cap_are_the_scalar_rules():
    proposable = np.array([UNKNOWN_PROPOSABLE, 0, 2, 9, UNKNOWN_PROPOSABLE])
    known = [None if p == UNKNOWN_PROPOSABLE else p for p in proposable.tolist()]
    assert planning_fill(np.full(5, 0.4), proposable).tolist() == [next_step_fill(0.4, p) for p in known]
    ks = np.array([3, 3, 3, 3, 0])
    assert cap_columns(ks, proposable).tolist() == cap_to_proposable(ks.tolist(), known) == [3, 0, 2, 3, 0]
    assert UNKNOWN == UNKNOWN_PROPOSABLE  # the controller's report columns mark "no look-ahead" alike


def test_evidence_records_a_step_as_acceptance_state_does():
    rng = np.random.default_rng(5)
    states = [AcceptanceState(steps_since_speculation=int(s)) for s in rng.integers(0, 4, 8)]
    evidence = Evidence.from_states(states)
    for _ in range(6):
        requested = rng.integers(0, 5, 8) * (rng.random(8) < 0.7)
        proposed = np.minimum(requested, rng.integers(0, 5, 8))
        accepted = (proposed * rng.random(8)).astype(np.int64)
        tested = positions_tested(proposed, accepted)
        evidence.record(np.arange(8), proposed, accepted, tested, requested)
        states = [s.update(int(p), int(a), int(t), int(r))
                  for s, p, a, t, r in zip(states, proposed, accepted, tested, requested)]
        expected = Evidence.from_states(states)
        for name in (f.name for f in dataclasses.fields(Evidence)):
            assert getattr(evidence, name).tolist() == getattr(expected, name).tolist(), name


# --- the same facts, four planners ---------------------------------------------------------------

@dataclass
class RecordingPolicy:
    """Delegates to a registered policy and keeps every batch it was shown."""

    inner: object
    batches: list = field(default_factory=list)

    @property
    def name(self):
        return self.inner.name

    @property
    def description(self):
        return self.inner.description

    @property
    def parameters(self):
        return self.inner.parameters

    def validate(self, raw):
        return self.inner.validate(raw)

    def decide(self, batch, cost, params):
        self.batches.append(batch)
        return self.inner.decide(batch, cost, params)


@dataclass
class Request:
    request_id: str
    rate: float        # per-position acceptance of its proposals
    prompt: int
    output: int
    joins: int | None  # the step that prefills its prompt (one chunk); None: the first step nothing else runs
    generated: int = 0
    offer: int | None = None  # what its proposer can offer next step (None: no look-ahead)


def workload() -> list[Request]:
    """Mixed acceptance (0.9 to 0.05), different lengths; two requests join while others run, and one
    when all have finished (a step of prefill only: the prior decays with no evidence to add)."""
    return [Request("fast", 0.9, 120, 40, 0), Request("slow", 0.05, 300, 14, 0), Request("mid", 0.55, 80, 26, 0),
            Request("chat", 0.3, 500, 36, 0), Request("late", 0.8, 200, 22, 3), Request("later", 0.2, 150, 30, 7),
            Request("after", 0.7, 90, 16, None)]


class Controller:
    """The controller's side: plan_step on the report, its memory carried from step to step."""

    def __init__(self, policy, params):
        self.policy, self.params = policy, params
        self.snapshot = StepSnapshot(histories={}, cost_fit=None, prior=None, policy=None)
        self.decision = None

    def plan(self, facts: StepFacts, queries) -> dict[str, int]:
        hello = controller_pb2.WorkerHello(worker_id="w0", proposer_kind=common_pb2.PROPOSER_KIND_NGRAM,
                                           max_speculation_length=MAX_K)
        self.decision = plan_step(hello, report_to_proto(facts), self.snapshot, cost_fit=OnlineCostFit.create(),
                                  policy=self.policy, params=self.params, settings=SETTINGS, cost_override=COST,
                                  proposer_kind="ngram", cost_profile_id="p", now_s=0)
        self.snapshot = StepSnapshot(histories=self.decision.writes.histories, cost_fit=None,
                                     prior=self.decision.prior, policy=None)
        return dict(zip(self.decision.request_ids, self.decision.speculation_lengths))


class Simulated:
    """The simulator's planner, told the same outcomes (request i of the workload is its row i)."""

    def __init__(self, policy, params, rows: dict[str, int]):
        self.planner = SimPlanner(policy, params, COST, SETTINGS, MAX_K, len(rows))
        self.rows = rows

    def plan(self, facts: StepFacts, queries, queued: int, lookahead: bool) -> dict[str, int]:
        def column(outcomes, name):
            return np.array([getattr(o, name) for o in outcomes], dtype=np.int64)

        decode = [o for o in facts.requests if o.prefill_tokens == 0]
        prefill = [o for o in facts.requests if o.prefill_tokens > 0]
        self.planner.record_step(np.array([self.rows[o.request_id] for o in decode], dtype=np.int64),
                                 column(decode, "requested_tokens"), column(decode, "proposed_tokens"),
                                 column(decode, "accepted_tokens"), column(decode, "tested_positions"),
                                 np.array([self.rows[o.request_id] for o in prefill], dtype=np.int64))
        proposable = {o.request_id: o.proposable_tokens for o in facts.requests}
        dec = np.array([self.rows[q.request_id] for q in queries], dtype=np.int64)
        context = np.array([q.context_tokens for q in queries], dtype=np.int64)
        offer = np.array([proposable[q.request_id] for q in queries], dtype=np.int64) if lookahead else None
        ks = self.planner.plan(dec, context, offer, prior=self.planner.prior, queued=queued,
                               step_index=facts.step_index + 1)
        return dict(zip((q.request_id for q in queries), ks.tolist()))


def step_outcomes(requests: list[Request], plan: dict[str, int], step: int, rng: np.random.Generator,
                  lookahead: bool) -> list[RequestFacts]:
    """What the engine reports for step `step`: prefill rows for joining requests, decode rows (k from
    the plan, offered as far as the look-ahead allows, a run of acceptances) for the others."""
    for r in requests:  # one waits for all the others to finish
        if r.joins is None and all(o.joins is not None and o.joins < step and o.generated >= o.output
                                   for o in requests if o is not r):
            r.joins = step
    rows = []
    for r in requests:
        if r.joins is None or r.joins > step or (r.joins < step and r.generated >= r.output):
            continue
        k = proposed = accepted = 0
        if r.joins == step:
            r.generated, prefill = 1, r.prompt
        else:
            k = plan[r.request_id]
            proposed = k if r.offer is None else min(k, r.offer)
            while accepted < proposed and rng.random() < r.rate:
                accepted += 1
            r.generated += accepted + 1
            prefill = 0
        finished = r.generated >= r.output
        r.offer = int(rng.choice([0, 0, 1, 3, MAX_K])) if lookahead and not finished else None
        rows.append(RequestFacts(r.request_id, proposed, accepted, positions_tested(proposed, accepted),
                                 context_tokens=r.prompt + r.generated, prefill_tokens=prefill, finished=finished,
                                 requested_tokens=k, proposable_tokens=r.offer))
    return rows


def same_batch(a, b, *, ids: bool = True) -> bool:
    """The batches a policy was shown agree field by field (ids aside for the simulator's row numbers)."""
    ca, cb = a.columns, b.columns
    scalars = [(a.max_k, a.queued_requests, a.step_index, a.pooled_evidence),
               (b.max_k, b.queued_requests, b.step_index, b.pooled_evidence)]
    columns = [np.array_equal(getattr(ca, f), getattr(cb, f)) for f in
               ("acceptance", "context_tokens", "prefill_tokens", "last_k", "last_fully_accepted",
                "steps_since_speculation", "evidence", "fill")]
    return scalars[0] == scalars[1] and all(columns) and (not ids or list(ca.request_ids) == list(cb.request_ids))


def run_scenario(policy_name: str, lookahead: bool, *, steps: int = 60, book_factory=AcceptanceBook,
                 seed: int = 0) -> list[dict]:
    """Every step's plans (and the batches behind them) from the four planners."""
    requests = workload()
    params = get(policy_name).validate({})
    recorders = {name: RecordingPolicy(get(policy_name)) for name in ("controller", "local", "replan", "simulator")}
    controller = Controller(recorders["controller"], params)
    local = LocalPolicyPlanner(PolicyChoice(recorders["local"], params), max_k=MAX_K, cost=COST)
    local.book = book_factory()
    replan_book = book_factory()
    simulated = Simulated(recorders["simulator"], params, {r.request_id: i for i, r in enumerate(requests)})
    rng = np.random.default_rng(seed)
    trace, plan = [], {}
    for step in range(steps):
        queued = sum(r.joins is None or r.joins > step for r in requests)
        # The goodput guard caps only from measured step times: none are given, so it stays out of this.
        facts = StepFacts(step, tuple(step_outcomes(requests, plan, step, rng, lookahead)), draft_ms=0.0,
                          verify_ms=0.0, total_ms=0.0, batched_tokens=0, queued_requests=queued)
        if not facts.requests:
            break
        queries = [SpeculationQuery(o.request_id, o.context_tokens) for o in facts.requests if not o.finished]
        plans = {"controller": controller.plan(facts, queries)}
        local.observe(facts)
        plans["local"] = local.plan(step + 1, queries, queued)
        replan_book.observe(facts)
        basis = decode_basis(plan_basis_proto(common_pb2.PolicySpec(name=policy_name), 1, COST,
                                              controller.decision.prior, SETTINGS, max_k=MAX_K, goodput_per_ms=0.0))
        basis = dataclasses.replace(basis, policy=recorders["replan"], params=params)
        plans["replan"] = replan(basis, replan_book, queries, step_index=step + 1, queued_requests=queued,
                                 max_k=MAX_K, guard=None)
        plans["simulator"] = simulated.plan(facts, queries, queued, lookahead)
        shown = {name: recorder.batches[-1] if queries else None for name, recorder in recorders.items()}
        trace.append({"step": step, "facts": facts, "plans": plans, "batches": shown,
                      "queries": [q.request_id for q in queries]})
        plan = plans["controller"]
    return trace


def differences(trace: list[dict]) -> list[str]:
    found = []
    for entry in trace:
        plans, batches, step = entry["plans"], entry["batches"], entry["step"]
        for name in ("local", "replan", "simulator"):
            if plans[name] != plans["controller"]:
                found.append(f"step {step}: {name} planned {plans[name]}, the controller {plans['controller']}")
            if entry["queries"] and not same_batch(batches[name], batches["controller"], ids=name != "simulator"):
                found.append(f"step {step}: {name} showed the policy another batch than the controller")
    return found


@pytest.mark.parametrize("lookahead", [True, False], ids=["prompt-lookup", "draft-model"])
@pytest.mark.parametrize("policy_name", ["goodput", "heuristic"])
def test_controller_worker_and_simulator_make_the_same_plan_from_the_same_facts(policy_name, lookahead):
    trace = run_scenario(policy_name, lookahead)
    assert differences(trace) == []
    # The scenario is not trivial: plans vary across requests and steps, requests join and finish,
    # and (but for the heuristic on a draft model) some request runs k = 0 while others speculate:
    # goodput holds the poor ones back, the look-ahead finds nothing to offer.
    ks = [k for entry in trace for k in entry["plans"]["controller"].values()]
    assert len(trace) >= 20 and len(set(ks)) >= 3
    assert 0 in ks or (policy_name, lookahead) == ("heuristic", False)
    planned = [set(entry["plans"]["controller"]) for entry in trace]
    assert {"late", "later", "after"} <= set().union(*planned) and "after" not in planned[0]
    assert any(all(o.prefill_tokens for o in entry["facts"].requests) for entry in trace[1:])  # prefill only
    shown = [entry["batches"]["controller"] for entry in trace if entry["queries"]]
    assert all(batch.pooled_evidence > 0 for batch in shown[1:])
    assert any(len(set(batch.columns.acceptance.tolist())) > 2 for batch in shown)


class FinishedOnlyBook(AcceptanceBook):
    """The worker's book as it was: a request pooled only when it finished, whole, one decay per request."""

    def observe(self, step) -> None:
        before = dict(self.requests)
        prior = self.prior
        super().observe(step)
        self.prior = prior
        for o in step.requests:
            if o.finished and o.request_id in before:
                state = before[o.request_id].update(o.proposed_tokens, o.accepted_tokens, o.tested_positions,
                                                    o.requested_tokens or o.proposed_tokens)
                self.prior = self.prior.update(state.accepted, state.tested, proposed=state.proposed,
                                               requested=state.requested)


@pytest.mark.parametrize("policy_name", ["goodput", "heuristic"])
def test_a_copy_that_pools_the_prior_differently_makes_other_plans(policy_name):
    """The comparison above can fail: give the worker the old prior rule and it no longer agrees,
    both in the estimates it shows the policy and (for goodput) in the plan itself."""
    found = differences(run_scenario(policy_name, lookahead=True, book_factory=FinishedOnlyBook))
    assert any("showed the policy another batch" in line for line in found)
    if policy_name == "goodput":
        assert any("planned" in line for line in found)


def test_the_plan_is_for_the_step_that_runs_it():
    """RequestState/BatchState describe the NEXT step: the controller plans report r's successor."""
    trace = run_scenario("goodput", lookahead=True, steps=4)
    assert [e["batches"]["controller"].step_index for e in trace] == [e["step"] + 1 for e in trace]


# --- proposal classes: the worker's per-class prior -------------------------------------------------

def _decoded(rid: str, *, requested: int, proposed: int, accepted: int, proposal_class: int | None,
             finished: bool = False) -> RequestFacts:
    return RequestFacts.decoded(rid, requested=requested, proposed=proposed, accepted=accepted,
                                tested=positions_tested(proposed, accepted), context_tokens=100,
                                finished=finished, proposable=MAX_K, proposal_class=proposal_class)


def _step(index: int, *facts: RequestFacts) -> StepFacts:
    return StepFacts(step_index=index, requests=tuple(facts), draft_ms=0.0, verify_ms=10.0, total_ms=10.0,
                     batched_tokens=len(facts), queued_requests=0)


def test_a_verified_proposal_counts_for_the_class_reported_with_the_look_ahead_before_it():
    book = AcceptanceBook()
    book.observe(_step(0, _decoded("a", requested=0, proposed=0, accepted=0, proposal_class=4)))
    # This step verifies the class-4 proposal; its own look-ahead reports class 0 for the next one.
    book.observe(_step(1, _decoded("a", requested=6, proposed=6, accepted=6, proposal_class=0)))
    book.observe(_step(2, _decoded("a", requested=6, proposed=6, accepted=0, proposal_class=0)))
    assert (book.class_priors[4].accepted, book.class_priors[4].tested) == pytest.approx((6 * 0.995, 6 * 0.995))
    assert (book.class_priors[0].accepted, book.class_priors[0].tested) == pytest.approx((0.0, 1.0))
    assert book.proposal_class == {"a": 0}
    book.observe(_step(3, _decoded("a", requested=6, proposed=6, accepted=1, proposal_class=3, finished=True)))
    assert book.proposal_class == {} and book.class_priors[0].accepted == pytest.approx(1.0)


def test_a_new_request_starts_from_its_next_proposals_class_once_the_class_has_evidence():
    book = AcceptanceBook()
    # Long matches (class 5) are right every time, short ones (class 0) fail at once: 3 steps each
    # of two earlier requests, 18 tested positions for class 5 and 3 for class 0.
    for index in range(4):
        book.observe(_step(index,
                           _decoded("long", requested=6 * (index > 0), proposed=6 * (index > 0),
                                    accepted=6 * (index > 0), proposal_class=5),
                           _decoded("short", requested=6 * (index > 0), proposed=6 * (index > 0), accepted=0,
                                    proposal_class=0)))
    book.observe(_step(4, _decoded("new-long", requested=0, proposed=0, accepted=0, proposal_class=5),
                       _decoded("new-short", requested=0, proposed=0, accepted=0, proposal_class=0)))
    queries = [SpeculationQuery("new-long", 100), SpeculationQuery("new-short", 100)]
    rates = book.prior_rates(queries, book.prior, book.estimator)
    assert rates[0] == pytest.approx(book.class_priors[5].rate()) == pytest.approx(1.0)
    # Class 0 has fewer tested positions than MIN_CLASS_EVIDENCE: the kind's pooled rate stands.
    assert book.class_priors[0].tested < 16 and rates[1] == pytest.approx(book.prior.rate())
    batch = book.batch_state(queries, max_k=MAX_K)
    assert batch.requests[0].acceptance == pytest.approx(1.0)
    assert batch.requests[1].acceptance == pytest.approx(book.prior.rate())


def test_a_short_match_after_a_burst_of_long_ones_is_planned_from_its_own_class():
    """The chat-after-code-edit case: the kind's pool says ~0.9, the short-match class says ~0.1;
    goodput must not speculate for the new short-match request, and does for a long-match one."""
    book = AcceptanceBook()
    for index in range(20):
        facts = [_decoded(f"long{i}", requested=6, proposed=6, accepted=6, proposal_class=5) for i in range(6)]
        facts.append(_decoded("short", requested=6, proposed=6, accepted=int(index % 9 == 8), proposal_class=0))
        book.observe(_step(index, *facts))
    assert book.prior.rate() > 0.8 and book.class_priors[0].rate() < 0.2
    book.observe(_step(20, _decoded("chat", requested=0, proposed=0, accepted=0, proposal_class=0),
                       _decoded("edit", requested=0, proposed=0, accepted=0, proposal_class=5)))
    goodput = get("goodput")
    params = goodput.validate({})
    ks = book.plan(goodput, params, COST, [SpeculationQuery("chat", 100), SpeculationQuery("edit", 100)],
                   max_k=MAX_K, queued_requests=0, step_index=21)
    assert ks["chat"] == 0 and ks["edit"] > 0
    # Without classes the same evidence plans the chat request like the code edits.
    unclassed = AcceptanceBook(prior=book.prior)
    assert unclassed.plan(goodput, params, COST, [SpeculationQuery("chat", 100)], max_k=MAX_K,
                          queued_requests=0, step_index=21)["chat"] > 0


def test_an_unmeasured_class_starts_no_lower_than_the_cold_guess():
    """A fresh worker's first probes (first tokens of answers, short matches) fail: the kind's rate
    drops to ~0.3, but a graded proposal in a class with no evidence yet is planned at >= 0.5."""
    book = AcceptanceBook()
    for index in range(12):
        book.observe(_step(index, _decoded("probe", requested=1, proposed=1, accepted=int(index % 3 == 0),
                                           proposal_class=0)))
    book.observe(_step(12, _decoded("long", requested=0, proposed=0, accepted=0, proposal_class=5),
                       _decoded("ungraded", requested=0, proposed=0, accepted=0, proposal_class=None)))
    kind_rate = book.prior.rate()
    assert kind_rate < 0.4 and book.class_priors[0].tested < 16
    rates = book.prior_rates([SpeculationQuery("long", 100), SpeculationQuery("ungraded", 100),
                              SpeculationQuery("probe", 100)], book.prior, book.estimator)
    assert rates[0] == pytest.approx(book.estimator.cold_rate)
    assert rates[1] == pytest.approx(kind_rate)
    assert rates[2] == pytest.approx(book.estimator.cold_rate)  # class 0 is graded but under-measured too

"""Planning with `--controller none`: policy specs, in-process acceptance estimates (no model)."""

from __future__ import annotations

import pytest

from smartspec.core.acceptance import DEFAULT_PRIOR_DECAY, OutcomeError, PooledPrior, positions_tested
from smartspec.core.decision import AcceptanceBook
from smartspec.core.policies.base import PolicyError
from smartspec.worker.local_policy import LocalPolicyPlanner, local_policy_choice
from smartspec.worker.steps import SpeculationQuery, RequestFacts, StepFacts


def step(index: int, *outcomes: RequestFacts) -> StepFacts:
    return StepFacts(index, outcomes, draft_ms=1.0, verify_ms=90.0, total_ms=91.0, batched_tokens=10,
                     queued_requests=0)


def decode(request_id: str, proposed: int, accepted: int, finished: bool = False,
           requested: int | None = None) -> RequestFacts:
    tested = positions_tested(proposed, accepted)
    return RequestFacts(request_id, proposed, accepted, tested, context_tokens=100, finished=finished,
                        requested_tokens=proposed if requested is None else requested)


def test_shorthand_sets_the_first_parameter():
    choice = local_policy_choice("fixed:3")
    assert choice.name == "fixed" and choice.params["k"] == 3


def test_key_value_parameters_are_typed_by_the_schema():
    choice = local_policy_choice("fixed", ["k=5"])
    assert choice.params["k"] == 5


@pytest.mark.parametrize(
    "spec, extra, field",
    [
        ("no-such-policy", [], "local_policy"),
        ("fixed:lots", [], "local_policy.k"),
        ("fixed", ["nope=1"], "local_policy.nope"),
        ("fixed", ["k"], "local_policy"),
        ("fixed:999", [], "local_policy.k"),     # out of the parameter's bounds
    ],
)
def test_bad_specs_name_the_culprit(spec, extra, field):
    with pytest.raises(PolicyError) as caught:
        local_policy_choice(spec, extra)
    assert caught.value.field == field


def test_fixed_policy_plans_every_request_and_clamps_to_max_k():
    planner = LocalPolicyPlanner(local_policy_choice("fixed:6"), max_k=4)
    plan = planner.plan(0, [SpeculationQuery("a", 10), SpeculationQuery("b", 20)], queued_requests=0)
    assert plan == {"a": 4, "b": 4}


def test_acceptance_is_counted_over_tested_positions_and_pooled_every_step():
    """The controller's rules: every outcome is a step of its request's history (a prefill chunk one at
    k = 0), and once per step the prior decays and takes the step's evidence, running requests' too."""
    d = DEFAULT_PRIOR_DECAY
    book = AcceptanceBook()
    book.observe(step(0, RequestFacts("a", 0, 0, 0, context_tokens=50, prefill_tokens=50),
                      RequestFacts("b", 0, 0, 0, context_tokens=50, prefill_tokens=50)))
    assert book.requests["a"].tested == 0                       # a prefill step is no evidence ...
    assert book.requests["a"].steps_since_speculation == 1      # ... but a step that asked for nothing
    assert book.prior == PooledPrior()
    book.observe(step(1, decode("a", 4, 1), decode("b", 4, 0)))  # tested 2 (one accept, one reject) and 1
    assert book.prior == PooledPrior(1, 3, 8, 8)                # pooled while both still run
    book.observe(step(2, decode("a", 4, 4), decode("b", 4, 0)))  # tested 4 and 1
    state = book.requests["a"]
    assert (state.accepted, state.tested) == (5, 6)
    assert book.prior == PooledPrior(d * 1 + 4, d * 3 + 5, d * 8 + 8, d * 8 + 8)
    high = book.request_state(SpeculationQuery("a", 110)).acceptance
    low = book.request_state(SpeculationQuery("b", 110)).acceptance
    fresh = book.request_state(SpeculationQuery("new", 10)).acceptance
    assert fresh == pytest.approx(book.prior.rate())            # no evidence of its own: the pooled rate
    assert high > fresh > low                                   # own history pulls each away from it
    before = book.prior
    book.observe(step(3, decode("a", 2, 2, finished=True)))
    assert "a" not in book.requests and "b" in book.requests
    assert book.prior == before.update(2, 2, d, 2, 2)           # the finished request's last step, no more


def test_cancellation_record_is_not_evidence():
    book = AcceptanceBook()
    book.observe(step(0, decode("a", 2, 0)))
    assert book.prior == PooledPrior(0, 1, 2, 2)
    book.observe(step(1, RequestFacts("a", 0, 0, 0, context_tokens=60, finished=True)))
    assert "a" not in book.requests
    d = DEFAULT_PRIOR_DECAY
    assert book.prior == PooledPrior(0, d * 1, d * 2, d * 2)    # nothing added; the step still decays it


def test_an_impossible_outcome_records_nothing_of_its_step():
    book = AcceptanceBook()
    book.observe(step(0, decode("a", 2, 1)))
    before = (dict(book.requests), book.prior)
    with pytest.raises(OutcomeError) as caught:
        book.observe(step(1, decode("a", 2, 2), RequestFacts("b", 2, 3, 3, context_tokens=10, requested_tokens=2)))
    assert caught.value.field == "accepted_tokens"
    assert (dict(book.requests), book.prior) == before


def test_goodput_policy_speculates_less_for_a_request_that_is_always_rejected():
    planner = LocalPolicyPlanner(local_policy_choice("goodput"), max_k=8)
    for index in range(3):   # plain steps first, so the goodput guard has measured both kinds
        planner.observe(step(index, decode("good", 0, 0), decode("bad", 0, 0)))
    for index in range(3, 30):
        planner.observe(step(index, decode("good", 4, 4), decode("bad", 4, 0)))
    plan = planner.plan(30, [SpeculationQuery("good", 200), SpeculationQuery("bad", 200)], queued_requests=0)
    assert plan["good"] > plan["bad"]


def test_local_policy_asks_only_for_what_the_proposer_can_offer():
    """Facts carry proposable_tokens (prompt lookup looked ahead): fixed k=3 asks 0 where there is no
    match and 2 where only 2 can be offered; a request without the figure (draft model) gets 3."""
    planner = LocalPolicyPlanner(local_policy_choice("fixed:3"), max_k=8)
    planner.observe(step(0, RequestFacts("dry", 3, 0, 0, 100, requested_tokens=3, proposable_tokens=0),
                         RequestFacts("short", 3, 3, 3, 100, requested_tokens=3, proposable_tokens=2),
                         RequestFacts("draft", 3, 3, 3, 100, requested_tokens=3)))
    ks = planner.plan(1, [SpeculationQuery("dry", 100), SpeculationQuery("short", 100), SpeculationQuery("draft", 100)], 0)
    assert ks == {"dry": 0, "short": 2, "draft": 3}
    assert planner.book.request_state(SpeculationQuery("dry", 100)).fill == 0.0

"""The per-request proposer choice (worker/proposers/choice.py): which member proposes, and why.

Members here are real prompt lookup and suffix decoding where the point is how they combine, and a
scripted member where a test needs to set exactly what a member offers and how it grades it.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import pytest

from smartspec.worker.cli import proposer_spec
from smartspec.worker.proposers import Proposal, ProposalRequest, Proposer, SamplingParams, make_proposer
from smartspec.worker.proposers.choice import CLASS_STRIDE, ProposerChoice, expected_accepted


class Scripted(Proposer):
    """Offers `offer` copies of `token` for every request, graded `grade`; records what it is told."""

    kind = 0
    reports_lookahead = True

    def __init__(self, token: int, offer: int, grade: int | None) -> None:
        self.token, self.offer, self.grade = token, offer, grade
        self.released: list[str] = []
        self.verified: list[tuple[str, int, int, int]] = []

    def propose(self, requests: Sequence[ProposalRequest]) -> list[Proposal]:
        return [Proposal([self.token] * min(self.offer, r.k)) for r in requests]

    def lookahead(self, seq_id: str, token_ids: list[int], max_k: int) -> int | None:
        return min(self.offer, max_k)

    def proposal_class(self, seq_id: str) -> int | None:
        return self.grade

    def observe_verification(self, seq_id: str, proposed: int, accepted: int, tested: int) -> None:
        self.verified.append((seq_id, proposed, accepted, tested))

    def release(self, seq_id: str) -> None:
        self.released.append(seq_id)


def ask(seq_id: str, context: list[int], k: int = 8) -> ProposalRequest:
    return ProposalRequest(seq_id, context, k, SamplingParams())


def run_verified(choice: ProposerChoice, seq_id: str, steps: int, accepted_of: dict[int, int]) -> None:
    """`steps` rounds of look-ahead, propose and verification; the member proposing token t keeps
    accepted_of[t] of its tokens (then a rejection)."""
    context = [1, 2, 3]
    for _ in range(steps):
        choice.lookahead(seq_id, context, 8)
        (proposal,) = choice.propose([ask(seq_id, context)])
        kept = min(accepted_of[proposal.tokens[0]], len(proposal.tokens))
        choice.observe_verification(seq_id, len(proposal.tokens), kept, kept + (kept < len(proposal.tokens)))
        context = context + [9]


def test_expected_accepted_is_the_geometric_sum():
    assert expected_accepted(0.5, 3) == pytest.approx(0.5 + 0.25 + 0.125)
    assert expected_accepted(1.0, 4) == 4.0 and expected_accepted(0.9, 0) == 0.0


def test_before_any_evidence_the_member_offering_more_proposes():
    short, long = Scripted(token=7, offer=2, grade=0), Scripted(token=8, offer=6, grade=0)
    choice = ProposerChoice([short, long])
    assert choice.lookahead("r", [1, 2, 3], 8) == 6
    assert choice.propose([ask("r", [1, 2, 3])])[0].tokens == [8] * 6
    assert choice.proposal_class("r") == 1 * CLASS_STRIDE + 0


def test_a_member_whose_offers_fail_loses_the_request_to_one_whose_offers_hold():
    failing, holding = Scripted(token=7, offer=6, grade=2), Scripted(token=8, offer=3, grade=1)
    choice = ProposerChoice([failing, holding], ["failing", "holding"])
    run_verified(choice, "r", steps=12, accepted_of={7: 0, 8: 3})
    rates = choice.rates()
    # One failure (a first-token rejection: 1 tested position) is enough for the other member's
    # untried offer to look better; from then on the holding member proposes and its rate climbs.
    assert rates[("failing", 2)] == pytest.approx(2.0 / 5.0) and rates[("holding", 1)] > 0.8
    assert len(failing.verified) == 1 and len(holding.verified) == 11
    assert choice.lookahead("new", [4, 5], 8) == 3 and choice.proposal_class("new") == CLASS_STRIDE + 1
    # Verifications reach the member that proposed, with the outcome's own numbers.
    assert failing.verified and all(v[2] == 0 for v in failing.verified)
    assert all(v[2] == 3 for v in holding.verified)


def test_rates_are_kept_per_member_class():
    graded_low, graded_high = Scripted(token=7, offer=4, grade=0), Scripted(token=8, offer=4, grade=5)
    choice = ProposerChoice([graded_low, graded_high], ["low", "high"])
    run_verified(choice, "a", steps=3, accepted_of={7: 4, 8: 0})
    assert set(choice.rates()) <= {("low", 0), ("high", 5)}


def test_each_request_gets_its_own_members_proposal_in_order():
    ngram, suffix = make_proposer("ngram"), make_proposer("suffix")
    choice = ProposerChoice([ngram, suffix], ["ngram", "suffix"])
    repeated = [5, 6, 7, 8, 9, 5, 6, 7]  # prompt lookup and suffix decoding both copy "8 9 5 ..."
    other = [1, 2, 3, 4]  # nothing to copy
    for seq_id, context in (("a", repeated), ("b", other)):
        choice.lookahead(seq_id, context, 4)
    got = choice.propose([ask("a", repeated, 4), ask("b", other, 4)])
    assert got[0].tokens[:2] == [8, 9] and got[1].tokens == []
    choice.release("a")
    assert ngram.proposal_class("a") is None and "a" not in choice._picks


def test_release_reaches_every_member():
    members = [Scripted(7, 2, 0), Scripted(8, 2, 0)]
    choice = ProposerChoice(members)
    choice.lookahead("r", [1], 8)
    choice.release("r")
    assert all(m.released == ["r"] for m in members)


class Costly(Scripted):
    """A member with a cost of its own (like a draft model): offers whatever it is asked, no look-ahead."""

    reports_lookahead = False

    def __init__(self, token: int, ms_per_depth: float = 0.0) -> None:
        super().__init__(token, 99, None)
        self.ms_per_depth = ms_per_depth

    def propose(self, requests: Sequence[ProposalRequest]) -> list[Proposal]:
        import time
        time.sleep(self.ms_per_depth * max((r.k for r in requests), default=0) / 1000.0)
        return [Proposal([self.token] * r.k) for r in requests]

    def lookahead(self, seq_id: str, token_ids: list[int], max_k: int) -> int | None:
        raise AssertionError("a member without look-ahead is never asked to look ahead")


def test_members_with_a_cost_of_their_own_are_limited_and_a_choice_needs_two():
    with pytest.raises(ValueError, match="at most 3 members with a cost"):
        ProposerChoice([Scripted(7, 1, 0)] + [Costly(8 + i) for i in range(4)])
    with pytest.raises(ValueError, match="at least two"):
        ProposerChoice([Scripted(7, 1, 0)])
    choice = ProposerChoice([Scripted(7, 1, 0), Costly(8)])
    assert choice.costly == [False, True] and choice.has_costly_member


def test_the_cli_accepts_lists_of_distinct_proposers_with_a_model_free_one():
    assert proposer_spec("ngram, suffix") == "ngram,suffix" and proposer_spec("draft") == "draft"
    assert proposer_spec("ngram,suffix,draft") == "ngram,suffix,draft"
    for bad in ("ngram,ngram", "bogus", "ngram,", "draft,draft", "ngram,bogus"):
        with pytest.raises(argparse.ArgumentTypeError):
            proposer_spec(bad)


def test_with_a_costly_member_a_k_only_plan_uses_it_only_where_no_free_member_offers():
    """Under a planner that gives k alone (fixed:k, a controller plan as sent), a row goes to the
    free member when it offers anything, else to the draft model, which can always offer."""
    dry, costly = Scripted(7, 0, 0), Costly(9)
    choice = ProposerChoice([Scripted(8, 3, 1), costly], ["lookup", "draft"])
    assert choice.lookahead("r", [1, 2], 6) == 3            # the free member's offer ...
    assert choice.propose([ask("r", [1, 2], 4)])[0].tokens == [8] * 3
    dry_choice = ProposerChoice([dry, Costly(9)])
    assert dry_choice.lookahead("r", [1, 2], 6) == 6        # ... else the draft model's: anything asked
    assert dry_choice.propose([ask("r", [1, 2], 4)])[0].tokens == [9] * 4
    assert dry_choice.proposals_by_member == [0, 1]


def test_an_assignment_overrides_the_k_only_pick_for_one_step_and_the_costly_member_is_timed():
    choice = ProposerChoice([Scripted(8, 3, 1), Costly(9, ms_per_depth=2.0)], ["lookup", "draft"])
    for step in range(6):
        context = [1, 2] + [3] * step
        choice.lookahead("r", context, 4)
        choice.assign({"r": 1})
        assert choice.propose([ask("r", context, 4)])[0].tokens == [9] * 4
        choice.observe_verification("r", 4, 0, 1)
    choice.lookahead("r", [1, 2, 9], 4)
    assert choice.propose([ask("r", [1, 2, 9], 4)])[0].tokens == [8] * 3   # the assignment was for one step
    # Six timed calls at ~8 ms (4 depths x 2 ms): the fitted cost of a k = 4 row is in that range.
    cost = choice.member_costs()[1]
    assert 4.0 < cost.draft_ms([4], [3]) < 40.0
    assert choice.member_costs()[0].draft_ms([4], [3]) == 0.0       # model-free: no cost of its own
    options = choice.options(["r", "unseen"], 5)
    assert options.caps.tolist() == [[3, 5], [0, 5]]
    assert options.acceptance[0, 1] < options.acceptance[1, 1]      # r's own draft record: all rejected


def test_a_members_record_with_one_request_overrides_its_class_rate_for_that_request():
    first, second = Scripted(token=7, offer=4, grade=0), Scripted(token=8, offer=3, grade=0)
    choice = ProposerChoice([first, second], ["first", "second"])
    contexts = {"good": [1, 2], "bad": [3, 4]}
    for _ in range(30):
        for seq_id, context in contexts.items():
            choice.lookahead(seq_id, context, 8)
            (proposal,) = choice.propose([ask(seq_id, context)])
            member_first = proposal.tokens[0] == 7
            # "first" is always right for "good" and always wrong for "bad"; "second" is right on 2 of 3.
            kept = (4 if seq_id == "good" else 0) if member_first else 2
            choice.observe_verification(seq_id, len(proposal.tokens), kept, kept + (kept < len(proposal.tokens)))
    # Pooled over both requests, "first" at class 0 looks good (mostly "good"'s full accepts) ...
    assert choice.rates()[("first", 0)] > 0.6
    # ... yet "bad" has moved to "second", while "good" stays with "first".
    choice.lookahead("good", contexts["good"], 8)
    choice.lookahead("bad", contexts["bad"], 8)
    assert choice.proposal_class("good") == 0 and choice.proposal_class("bad") == CLASS_STRIDE


def test_the_batch_options_are_each_rows_own_rate_and_offer():
    """options() computes every row at once; it must equal the per-row rule the k-only pick uses
    (own record shrunk toward the (member, class) rate), for requests with records, a request
    with none and a request never looked ahead."""
    first, second = Scripted(token=7, offer=4, grade=0), Scripted(token=8, offer=3, grade=2)
    choice = ProposerChoice([first, second], ["first", "second"])
    contexts = {"a": [1, 2], "b": [3, 4], "c": [5, 6]}
    kept_by = {"a": 4, "b": 1, "c": 0}
    for _ in range(6):
        for seq_id in ("a", "b"):
            choice.lookahead(seq_id, contexts[seq_id], 8)
            (proposal,) = choice.propose([ask(seq_id, contexts[seq_id])])
            kept = min(kept_by[seq_id], len(proposal.tokens))
            choice.observe_verification(seq_id, len(proposal.tokens), kept, kept + (kept < len(proposal.tokens)))
    choice.lookahead("c", contexts["c"], 8)   # looked ahead, no record of its own
    options = choice.options(["a", "b", "c", "never"], 8)
    for row, seq_id in enumerate(["a", "b", "c"]):
        for member, (offer, grade) in enumerate([(4, 0), (3, 2)]):
            assert options.acceptance[row, member] == choice._rate(seq_id, member, grade)
            assert options.caps[row, member] == offer
    assert options.acceptance[0, 0] != options.acceptance[1, 0]   # the records differ, so must the rates
    assert options.caps[3].tolist() == [0, 0]   # never looked ahead: nothing offered
    assert options.acceptance[3].tolist() == [choice._class_rate(0, CLASS_STRIDE - 1),
                                              choice._class_rate(1, CLASS_STRIDE - 1)]
    # a released request's row is reused, and whoever gets it starts with no record and no offer
    choice.release("a")
    for index in range(40):   # more requests than the tables first hold
        choice.lookahead(f"new-{index}", [9, 9], 8)
    fresh = choice.options([f"new-{index}" for index in range(40)], 8)
    assert fresh.acceptance.tolist() == [[choice._class_rate(0, 0), choice._class_rate(1, 2)]] * 40
    assert choice.options(["a"], 8).caps.tolist() == [[0, 0]]


def test_member_rates_start_from_the_pools_every_worker_of_that_kind_filled():
    """The controller pools each member kind's acceptance over all workers (Redis) and sends it in
    the plan basis: a fresh choice worker starts prompt lookup where the fleet's prompt lookup is,
    not at COLD_RATE, and a member kind with no pool stays at COLD_RATE."""
    from smartspec.core.acceptance import PooledPrior
    from smartspec.v1 import common_pb2

    lookup, suffix = Scripted(7, 3, 0), Scripted(8, 3, 0)
    lookup.kind, suffix.kind = common_pb2.PROPOSER_KIND_NGRAM, common_pb2.PROPOSER_KIND_SUFFIX
    choice = ProposerChoice([lookup, suffix], ["ngram", "suffix"])
    assert choice.member_kinds == [common_pb2.PROPOSER_KIND_NGRAM, common_pb2.PROPOSER_KIND_SUFFIX]
    choice.lookahead("r", [1, 2], 8)
    assert choice.proposal_class("r") == 0                        # a tie at COLD_RATE: the first member
    choice.use_member_priors({common_pb2.PROPOSER_KIND_SUFFIX: PooledPrior(accepted=90.0, tested=100.0)})
    choice.lookahead("r", [1, 2], 8)
    assert choice.proposal_class("r") == CLASS_STRIDE             # suffix's pool says 0.9: it gets the row
    rates = choice.options(["r"], 8).acceptance[0]
    assert rates[0] == pytest.approx(0.5) and rates[1] == pytest.approx(0.9)
    (proposal,) = choice.propose([ask("r", [1, 2])])
    assert proposal.tokens == [8] * 3 and choice.member_kind("r") == common_pb2.PROPOSER_KIND_SUFFIX

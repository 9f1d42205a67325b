"""Prompt lookup: right continuation, longer matches first, nothing without a match, k bounded,
and an incremental index that stays correct as the context grows or is replaced."""

from __future__ import annotations

import random

import pytest

from smartspec.v1 import common_pb2
from smartspec.worker.proposers import ProposalRequest, SamplingParams, make_proposer
from smartspec.worker.proposers.ngram import NgramProposer


def _ask(proposer, tokens, k, seq_id="r"):
    (proposal,) = proposer.propose([ProposalRequest(seq_id, list(tokens), k, SamplingParams())])
    assert proposal.probs is None  # deterministic: rejection sampling treats it as one-hot
    return proposal.tokens


def _brute_force(tokens: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The definition, written the slow obvious way: longest n first, latest earlier match."""
    length = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if n >= length:
            continue
        suffix = tokens[length - n :]
        for start in range(length - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                out, end = [], start + n
                for i in range(k):
                    source = end + i
                    out.append(tokens[source] if source < length else out[source - length])
                return out
    return []


def test_copies_what_followed_the_match():
    proposer = NgramProposer(max_ngram=3, min_ngram=1)
    #         0  1  2  3  4  5  6  7  8
    tokens = [5, 6, 7, 8, 9, 1, 2, 6, 7]
    assert _ask(proposer, tokens, 3) == [8, 9, 1]


def test_prefers_the_longer_ngram_over_a_more_recent_shorter_one():
    proposer = NgramProposer(max_ngram=3, min_ngram=1)
    # "1 2 3" is followed by 40 early on; "2 3" alone (more recent) is followed by 50
    tokens = [1, 2, 3, 40, 9, 2, 3, 50, 9, 1, 2, 3]
    assert _ask(proposer, tokens, 1) == [40]
    # with n capped at 2 the most recent "2 3" wins
    assert _ask(NgramProposer(max_ngram=2, min_ngram=1), tokens, 1) == [50]


def test_most_recent_occurrence_wins_among_equal_lengths():
    proposer = NgramProposer(max_ngram=2, min_ngram=2)
    tokens = [1, 2, 10, 1, 2, 20, 1, 2]
    assert _ask(proposer, tokens, 1) == [20]


def test_no_match_proposes_nothing():
    proposer = NgramProposer(max_ngram=4, min_ngram=2)
    assert _ask(proposer, [1, 2, 3, 4, 5, 6], 4) == []
    assert _ask(proposer, [7], 4, seq_id="one-token") == []
    # a unigram match alone is below min_ngram = 2
    assert _ask(proposer, [1, 2, 3, 9, 1], 4, seq_id="unigram") == []


def test_k_bounds_the_proposal_and_periodic_text_continues_past_the_end():
    proposer = NgramProposer(max_ngram=3, min_ngram=1)
    tokens = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]
    assert _ask(proposer, tokens, 2) == [3, 4]
    assert _ask(proposer, tokens, 0) == []
    # "a b a b": the match ends two tokens before the end, the copy keeps going with period 2
    loop = [9, 4, 7, 4, 7]
    assert _ask(proposer, loop, 5, seq_id="loop") == [4, 7, 4, 7, 4]


def test_incremental_index_matches_the_definition_as_context_grows():
    rng = random.Random(7)
    proposer = NgramProposer(max_ngram=4, min_ngram=1)
    tokens = [rng.randrange(6) for _ in range(5)]
    for _ in range(150):
        k = rng.randint(1, 6)
        assert _ask(proposer, tokens, k) == _brute_force(tokens, k, 4, 1), tokens
        tokens += [rng.randrange(6) for _ in range(rng.randint(1, 4))]  # accepted run + bonus


def test_replaced_context_rebuilds_the_index_and_release_forgets():
    proposer = NgramProposer(max_ngram=2, min_ngram=1)
    assert _ask(proposer, [1, 2, 3, 1, 2], 1) == [3]
    # same seq_id, different history (e.g. re-prefilled after preemption): no stale matches
    assert _ask(proposer, [1, 2, 4, 1, 2], 1) == [4]
    assert _ask(proposer, [3, 3, 1, 2], 1) == []
    proposer.release("r")
    assert "r" not in proposer._indexes
    proposer.release("never-seen")  # releasing twice or an unknown id is harmless


def test_batch_keeps_requests_apart():
    proposer = NgramProposer(max_ngram=2, min_ngram=1)
    a = ProposalRequest("a", [1, 2, 3, 1, 2], 2, SamplingParams())
    b = ProposalRequest("b", [1, 2, 9, 1, 2], 2, SamplingParams(temperature=0.8))
    assert [p.tokens for p in proposer.propose([a, b])] == [[3, 1], [9, 1]]


def test_long_context_lookup_is_incremental():
    # 20k-token context: the first call indexes it, later calls only the appended tokens
    rng = random.Random(3)
    tokens = [rng.randrange(50_000) for _ in range(20_000)]
    proposer = NgramProposer()
    _ask(proposer, tokens, 4)
    table_sizes = {n: len(t) for n, t in proposer._indexes["r"].latest_end.items()}
    tokens += tokens[100:103]  # the tail now repeats an early 3-gram
    assert _ask(proposer, tokens, 4) == tokens[103:107]
    grown = {n: len(t) for n, t in proposer._indexes["r"].latest_end.items()}
    assert all(grown[n] - table_sizes[n] <= 3 for n in grown)


def test_registry_and_kind():
    proposer = make_proposer("ngram", max_ngram=5, min_ngram=3)
    assert isinstance(proposer, NgramProposer) and (proposer.max_ngram, proposer.min_ngram) == (5, 3)
    assert proposer.kind == common_pb2.PROPOSER_KIND_NGRAM
    with pytest.raises(ValueError, match="unknown proposer 'nope'"):
        make_proposer("nope")
    with pytest.raises(ValueError, match="max_gram"):
        make_proposer("ngram", max_gram=3)
    with pytest.raises(ValueError, match="min_ngram"):
        NgramProposer(min_ngram=0)
    with pytest.raises(ValueError, match="max_ngram"):
        NgramProposer(max_ngram=1, min_ngram=2)


def test_lookahead_is_exactly_what_the_next_proposal_offers():
    """The engine reports lookahead(context) as proposable_tokens before the planner decides; it must
    equal what propose() then offers for that context, and must not disturb the incremental index."""
    rng = random.Random(11)
    tokens = [rng.randrange(5) for _ in range(60)]
    ahead, fresh = NgramProposer(), NgramProposer()
    seen = set()
    for end in range(1, len(tokens)):
        context = tokens[:end]
        offered = ahead.lookahead("r", context, 8)
        want = _brute_force(context, 8, 4, 2)
        assert offered == len(want)
        assert _ask(ahead, context, 8) == want  # the same index answers the step's own proposal
        assert _ask(fresh, context, 3) == want[:3]
        seen.add(offered)
    assert seen == {0, 8}  # both cases happened: no match, and a match (copies always fill k)


def test_proposal_class_grades_the_match_by_how_far_back_it_agrees():
    from smartspec.worker.proposers.ngram import MATCH_CLASS_BOUNDS

    proposer = NgramProposer()
    span = list(range(1, 21))
    context = span + [99] + span[:19]
    for tail, expected_length in ((2, 2), (3, 3), (5, 5), (8, 8), (14, 14), (19, 16)):
        assert proposer.lookahead("r", context[:21 + tail], 8) == 8
        assert proposer.proposal_class("r") == sum(expected_length >= b for b in MATCH_CLASS_BOUNDS)
    assert proposer.lookahead("r", [5, 6, 7, 8], 8) == 0 and proposer.proposal_class("r") is None
    proposer.lookahead("r", context, 8)
    proposer.release("r")
    assert proposer.proposal_class("r") is None

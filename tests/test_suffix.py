"""Suffix decoding: continuations from the request's own text and from earlier requests' outputs,
frequency scoring, the match-length cap, FIFO eviction that leaves exactly what a fresh index over
the kept requests holds, and incremental indexing that equals the definition as contexts grow."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import pytest

from smartspec.v1 import common_pb2
from smartspec.worker.proposers import ProposalRequest, SamplingParams, make_proposer
from smartspec.worker.proposers.suffix import SuffixProposer, _Branch, _SuffixIndex


def _ask(proposer, tokens, k, seq_id="r"):
    (proposal,) = _proposals(proposer, tokens, k, seq_id)
    return proposal.tokens


def _proposals(proposer, tokens, k, seq_id="r"):
    proposals = proposer.propose([ProposalRequest(seq_id, list(tokens), k, SamplingParams())])
    assert all(p.probs is None for p in proposals)  # deterministic: verified as one-hot
    return proposals


def _serve(proposer, seq_id, prompt, output):
    """A request as the engine drives it: asked once per generated token, then released."""
    context = list(prompt)
    for token in output:
        proposer.lookahead(seq_id, context, 4)
        context.append(token)
    proposer.lookahead(seq_id, context, 4)
    proposer.release(seq_id)


def _snapshot(index: _SuffixIndex) -> dict[tuple[int, ...], dict[int, int]]:
    """Every stored context with the counts of its next tokens (a leaf is one occurrence)."""
    snapshot = {}
    for context, entry in index.entries.items():
        if isinstance(entry, _Branch):
            assert entry.total == sum(entry.counts.values()) >= 2
            snapshot[context] = dict(entry.counts)
        else:
            snapshot[context] = {index._next_token(entry): 1}
    return snapshot


def _all_counts(sequences, max_depth):
    """The definition, written the slow obvious way: next-token counts after every context, and the
    token after each context's newest occurrence."""
    counts, newest_next = defaultdict(Counter), {}
    for sequence in sequences:
        for position in range(1, len(sequence)):
            for depth in range(1, min(max_depth, position) + 1):
                context = tuple(sequence[position - depth : position])
                counts[context][sequence[position]] += 1
                newest_next[context] = sequence[position]
    return counts, newest_next


def _expected_entries(sequences, max_depth):
    counts, _ = _all_counts(sequences, max_depth)
    return {context: dict(next_counts) for context, next_counts in counts.items()
            if len(context) == 1 or sum(counts[context[1:]].values()) >= 2}


def _brute_chain(sequences, context, k, max_depth=24, alpha=1.0, min_score=0.1):
    """(tokens, expected accepted, confidence) by the proposer's rules over an uncompressed table."""
    counts, newest_next = _all_counts(sequences, max_depth)

    def longest(walk):
        return next((d for d in range(min(max_depth, len(walk)), 0, -1) if tuple(walk[-d:]) in counts), 0)

    match = longest(context)
    if not match:
        return [], 0.0, None
    cap = min(k, max(1, math.ceil(alpha * match)))
    walk, tokens, product, expected, confidence = list(context), [], 1.0, 0.0, None
    depth = match
    while len(tokens) < cap and depth:
        next_counts = counts[tuple(walk[len(walk) - depth :])]
        newest = newest_next[tuple(walk[len(walk) - depth :])]
        token = max(next_counts, key=lambda t: (next_counts[t], t == newest))
        share = next_counts[token] / sum(next_counts.values())
        product *= share
        if product < min_score:
            break
        tokens.append(token)
        expected += product
        confidence = share if confidence is None else confidence
        walk.append(token)
        depth = longest(walk)
    return tokens, expected, confidence


def test_copies_what_followed_a_repeated_span():
    proposer = SuffixProposer()
    #         0   1   2   3   4   5   6   7   8   9
    tokens = [10, 11, 12, 13, 14, 15, 99, 10, 11, 12]
    assert _ask(proposer, tokens, 8) == [13, 14, 15]  # a 3-token match proposes up to 3 (alpha = 1)
    assert _ask(proposer, tokens, 2) == [13, 14]
    # "a b a b": the chain reads its own proposals back, so a loop is continued as far as the cap allows
    assert _ask(proposer, [9, 4, 7, 4, 7], 8, seq_id="loop") == [4, 7]
    assert _ask(SuffixProposer(alpha=2.0), [9, 4, 7, 4, 7], 8, seq_id="loop") == [4, 7, 4, 7]


def test_nothing_without_a_match_and_k_zero_gives_nothing():
    proposer = SuffixProposer()
    (proposal,) = _proposals(proposer, [1, 2, 3, 4, 5], 4)
    assert proposal.tokens == [] and proposal.confidence is None
    assert _ask(proposer, [7], 4, seq_id="one-token") == []
    assert _ask(proposer, [1, 2, 3, 1, 2], 0, seq_id="k0") == []
    assert proposer.lookahead("k0", [1, 2, 3, 1, 2], 0) == 0
    with pytest.raises(ValueError, match="k must be >= 0"):
        _ask(proposer, [1, 2], -1)


def test_an_earlier_requests_output_is_proposed_to_a_later_request():
    proposer = SuffixProposer(alpha=2.0)
    prompt, output = [900 + i for i in range(20)], [100 + i for i in range(30)]
    _serve(proposer, "a", prompt, output)
    assert proposer.stats()["global_tokens"] == len(output)  # the output only, not the prompt
    # b has its own prompt and happens to produce the start of a's output: a's continuation follows
    later = [7, 8, 9] + output[:5]
    (proposal,) = _proposals(proposer, later, 8, seq_id="b")
    assert proposal.tokens == output[5:13] and proposal.confidence == 1.0
    # a's prompt was not kept: its text is not proposed to anyone
    assert _ask(proposer, [7, 8] + prompt[:5], 8, seq_id="c") == []
    with_prompts = SuffixProposer(alpha=2.0, index_prompts=True)
    _serve(with_prompts, "a", prompt, output)
    assert _ask(with_prompts, [7, 8] + prompt[:5], 8, seq_id="c") == prompt[5:13]


def test_the_more_frequent_continuation_wins_and_low_shares_stop_the_chain():
    proposer = SuffixProposer(alpha=2.0)
    stem = [50, 51, 52, 53]
    for index, ending in enumerate([[60, 61, 62], [70, 71, 72], [60, 61, 62]]):
        _serve(proposer, f"a{index}", [1000 + index], stem + ending)
    (proposal,) = _proposals(proposer, [5] + stem, 8, seq_id="b")
    assert proposal.tokens == [60, 61, 62] and proposal.confidence == pytest.approx(2 / 3)
    # the newer of equally frequent continuations wins
    _serve(proposer, "a3", [1003], stem + [70, 71, 72])
    assert _ask(proposer, [5] + stem, 8, seq_id="c")[:1] == [70]
    # a share below min_score proposes nothing: here each continuation follows half the time
    strict = SuffixProposer(alpha=2.0, min_score=0.6)
    for index, ending in enumerate([[60, 61, 62], [70, 71, 72]]):
        _serve(strict, f"a{index}", [1000 + index], stem + ending)
    assert _ask(strict, [5] + stem, 8, seq_id="b") == []


def test_the_length_cap_follows_the_match_length():
    output = [100 + i for i in range(60)]
    for alpha in (1.0, 1.5):
        proposer = SuffixProposer(alpha=alpha)
        _serve(proposer, "a", [1], output)
        for match in range(1, 12):
            context = [7] + output[20 - match : 20]  # 7 never precedes it: the match is exactly `match`
            got = _ask(proposer, context, 8, seq_id=f"b{match}")
            assert got == output[20 : 20 + min(8, math.ceil(alpha * match))], (alpha, match)


def test_the_own_request_wins_over_memory_on_a_tie_and_the_better_chain_otherwise():
    proposer = SuffixProposer(alpha=2.0)
    _serve(proposer, "a", [1], [30, 31, 32, 33, 34, 35, 36, 37])
    # "30 31" once in the request's own text and once in memory: equal chains, its own wins
    unique = [30, 31, 40, 9, 30, 31]
    assert _ask(proposer, unique, 4, seq_id="b") == [40, 9, 30, 31]
    assert _ask(proposer, unique, 1, seq_id="b") == [40]
    # its own text followed "30 31" with 40 once and 41 once (share 1/2): memory expects more
    ambiguous = [30, 31, 40, 30, 31, 41, 9, 30, 31]
    assert _ask(proposer, ambiguous, 4, seq_id="c") == [32, 33, 34, 35]
    assert _ask(proposer, ambiguous, 1, seq_id="c") == [32]


def test_eviction_forgets_the_oldest_and_leaves_what_a_fresh_index_holds():
    rng = random.Random(5)
    outputs = [[rng.randrange(12) for _ in range(rng.randint(20, 60))] for _ in range(12)]
    proposer = SuffixProposer(max_depth=6, global_tokens=150)
    for number, output in enumerate(outputs):
        _serve(proposer, f"r{number}", [500 + number], output)
        assert proposer._global.tokens <= 150
        kept = list(proposer._global.sequences.values())
        assert kept == outputs[number + 1 - len(kept) : number + 1]  # the newest ones, in order
        fresh = _SuffixIndex(max_depth=6)
        for fresh_number, sequence in enumerate(kept):
            fresh.extend(fresh_number, sequence)
        assert _snapshot(proposer._global) == _snapshot(fresh) == _expected_entries(kept, 6)
    assert len(kept) < len(outputs)  # eviction happened


def test_an_evicted_requests_text_stops_being_proposed():
    proposer = SuffixProposer(global_tokens=60)
    first, second = [100 + i for i in range(40)], [200 + i for i in range(40)]
    _serve(proposer, "a", [1], first)
    assert _ask(proposer, [7] + first[:10], 4, seq_id="b") == first[10:14]
    _serve(proposer, "c", [1], second)  # 40 + 40 > 60: the first request's output makes room
    assert _ask(proposer, [7] + first[:10], 4, seq_id="d") == []
    assert _ask(proposer, [7] + second[:10], 4, seq_id="e") == second[10:14]
    assert proposer.stats()["global_requests"] == 1 and proposer.memory_tokens() >= 40
    proposer.release("b")
    small = SuffixProposer(global_tokens=10)
    _serve(small, "a", [1], first)  # longer than the whole memory: its last 10 tokens are kept
    assert list(small._global.sequences.values()) == [first[-10:]]
    proposer.release("never-seen")  # an unknown id (or releasing twice) is harmless
    proposer.release("b")


def test_incremental_index_equals_the_definition_as_contexts_grow():
    rng = random.Random(7)
    proposer = SuffixProposer(max_depth=5, alpha=1.5, global_tokens=400)
    for request in range(30):
        seq_id = f"r{request}"
        tokens = [rng.randrange(5) for _ in range(rng.randint(1, 8))]
        for _ in range(rng.randint(5, 25)):
            k = rng.randint(1, 6)
            kept = list(proposer._global.sequences.values())
            own = _brute_chain([tokens], tokens, k, max_depth=5, alpha=1.5)
            shared = _brute_chain(kept, tokens, k, max_depth=5, alpha=1.5)
            want = own if own[1] >= shared[1] else shared
            assert proposer.lookahead(seq_id, tokens, k) == len(want[0])
            (proposal,) = _proposals(proposer, tokens, k, seq_id)
            assert (proposal.tokens, proposal.confidence) == (want[0], want[2]), (tokens, kept)
            assert _snapshot(proposer._requests[seq_id].index) == _expected_entries([tokens], 5)
            tokens += [rng.randrange(5) for _ in range(rng.randint(1, 4))]  # accepted run + bonus
        proposer.release(seq_id)
        kept = list(proposer._global.sequences.values())
        assert _snapshot(proposer._global) == _expected_entries(kept, 5)


def test_lookahead_is_exactly_what_the_next_proposal_offers():
    rng = random.Random(11)
    proposer = SuffixProposer(alpha=2.0)
    for request in range(4):
        _serve(proposer, f"old{request}", [rng.randrange(40)], [rng.randrange(40) for _ in range(80)])
    tokens = [rng.randrange(40) for _ in range(120)]
    seen = set()
    for end in range(1, len(tokens)):
        offered = proposer.lookahead("r", tokens[:end], 8)
        assert offered == len(_ask(proposer, tokens[:end], 8))
        seen.add(offered)
    assert 0 in seen and len(seen) >= 3


def test_replaced_context_rebuilds_the_index():
    proposer = SuffixProposer()
    assert _ask(proposer, [1, 2, 3, 1, 2], 1) == [3]
    # same seq_id, different history (e.g. re-prefilled after preemption): no stale matches
    assert _ask(proposer, [1, 2, 4, 1, 2], 1) == [4]
    assert _ask(proposer, [3, 3, 1, 2], 1) == []
    assert proposer._requests["r"].prompt_length == 5  # recorded at the first call, kept
    proposer.release("r")
    assert "r" not in proposer._requests


def test_registry_kind_and_options():
    proposer = make_proposer("suffix", max_depth=8, alpha=1.5, min_score=0.2, global_tokens=1000)
    assert isinstance(proposer, SuffixProposer) and proposer.reports_lookahead
    assert (proposer.max_depth, proposer.alpha, proposer.min_score, proposer.global_tokens) == (8, 1.5, 0.2, 1000)
    assert proposer.kind == common_pb2.PROPOSER_KIND_SUFFIX == 5
    with pytest.raises(ValueError, match="max_depth"):
        SuffixProposer(max_depth=0)
    with pytest.raises(ValueError, match="alpha"):
        SuffixProposer(alpha=0)
    with pytest.raises(ValueError, match="min_score"):
        SuffixProposer(min_score=1.5)
    with pytest.raises(ValueError, match="global_tokens"):
        SuffixProposer(global_tokens=-1)
    off = SuffixProposer(global_tokens=0)
    _serve(off, "a", [1], [2, 3, 4, 5])
    assert off.memory_tokens() == 0 and off.stats()["global_contexts"] == 0


def test_proposal_class_grades_the_chosen_chains_match_and_its_source():
    from smartspec.worker.proposers.suffix import MATCH_CLASS_BOUNDS, SHARED_CLASS_OFFSET

    proposer = SuffixProposer()
    own = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5]  # the tail "1 2 3 4 5" occurred before: 5 tokens
    assert proposer.lookahead("own", own, 4) > 0
    assert proposer.proposal_class("own") == sum(5 >= b for b in MATCH_CLASS_BOUNDS)
    # A request released earlier supplies the chain: graded as shared memory.
    proposer.lookahead("done", [50, 51], 4)
    proposer.propose([ProposalRequest("done", [50, 51, 60, 61, 62, 63, 64, 65], 4, SamplingParams())])
    proposer.release("done")
    assert proposer.lookahead("next", [70, 60, 61, 62], 4) > 0
    assert proposer.proposal_class("next") == sum(3 >= b for b in MATCH_CLASS_BOUNDS) + SHARED_CLASS_OFFSET
    assert proposer.lookahead("none", [99, 98], 4) == 0 and proposer.proposal_class("none") is None
    proposer.release("own")
    assert proposer.proposal_class("own") is None

"""Suffix decoding: propose what followed the context's longest matching suffix, in this request or in
the outputs of recent earlier ones (SuffixDecoding, arXiv 2411.04975).

Prompt lookup only sees the request's own text; serving traffic also repeats itself *across* requests
(templated answers, multi-turn edits that resend a file, agent loops), so a worker-wide index over
recent outputs proposes those too. Each proposal is sized by its evidence: the chain follows the most
frequent continuation while the product of its frequency shares stays >= min_score, and is never
longer than alpha * (match length) tokens, so a long unambiguous match proposes many tokens and a
short or ambiguous one few or none.

Pure Python because arctic-inference (the authors' C++ suffix tree) ships as an sdist whose build
needs cmake, nanobind, a torch of its own and the Python headers, and fails to build here.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Sequence

from smartspec.v1 import common_pb2

from .base import Proposal, ProposalRequest, Proposer

# Match lengths that start a new proposal class ([1], [2], [3], [4], [5-7], [8-15], [16+]); a chain
# from the worker-wide index is graded apart (class + SHARED_CLASS_OFFSET): text remembered from
# other requests is right at other rates than the request's own.
MATCH_CLASS_BOUNDS = (2, 3, 4, 5, 8, 16)
SHARED_CLASS_OFFSET = len(MATCH_CLASS_BOUNDS) + 1

# An occurrence is one int, (sequence number << 32) | position: leaves are most of an index's entries.
_POSITION_BITS = 32
_POSITION_MASK = (1 << _POSITION_BITS) - 1
_OWN = 0  # the sequence number of a request's own text in its per-request index


class _Branch:
    """A context that occurred at least twice: how often each token followed it, and where it last did."""

    __slots__ = ("counts", "total", "newest")

    def __init__(self, counts: dict[int, int], total: int, newest: int) -> None:
        self.counts = counts
        self.total = total
        self.newest = newest


class _SuffixIndex:
    """Next-token counts after every context of 1..max_depth tokens in a FIFO of token sequences.

    An occurrence of context c at position p of a sequence means sequence[p - len(c) : p] == c; the
    token at p followed it (a sequence's end, with nothing after it yet, is no occurrence). Entries:

    * a context that occurred once is a leaf: the int naming that occurrence; longer contexts ending
      there are implied by it and not stored (one entry per token of unique text, not max_depth);
    * a context that occurred twice or more is a _Branch, and the one-token-longer contexts of its
      occurrences are stored in turn.

    So a context is stored iff it occurs and is one token long or its one-shorter suffix occurs at
    least twice. Which contexts are stored, and their counts, depend only on the sequences held, not
    on the order of adds and removes: removing the oldest sequence leaves what indexing the rest anew
    would. Adding or removing one occurrence touches at most max_depth contexts.
    """

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.sequences: dict[int, list[int]] = {}  # by number; insertion order is age, oldest first
        self.entries: dict[tuple[int, ...], int | _Branch] = {}
        self.tokens = 0

    def extend(self, number: int, new_tokens: list[int]) -> None:
        """Append to sequence `number` (new when unknown) and index the occurrences this completes."""
        sequence = self.sequences.setdefault(number, [])
        start = len(sequence)
        sequence.extend(new_tokens)
        self.tokens += len(new_tokens)
        for position in range(max(start, 1), len(sequence)):
            self._add(sequence, number << _POSITION_BITS | position)

    def remove_oldest(self) -> None:
        number, sequence = next(iter(self.sequences.items()))
        # Oldest occurrence first, as they were added: a branch's newest occurrence is then never the
        # one removed while others remain, so it names the survivor when a branch falls back to a leaf.
        for position in range(1, len(sequence)):
            self._remove(sequence, number << _POSITION_BITS | position)
        del self.sequences[number]
        self.tokens -= len(sequence)

    def longest_match(self, context: list[int]) -> tuple[int, int | _Branch | None]:
        """(length, entry) of the longest stored suffix of `context`; (0, None) when none is.

        Bisection is exact: every stored context's one-shorter suffix is stored too."""
        low, high, found = 0, min(self.max_depth, len(context)), None
        end = len(context)
        while low < high:
            middle = (low + high + 1) // 2
            entry = self.entries.get(tuple(context[end - middle :]))
            if entry is None:
                high = middle - 1
            else:
                low, found = middle, entry
        return low, found

    def match_length(self, context: list[int], length: int, entry: int | _Branch) -> int:
        """The true match length (<= max_depth) of a stored suffix: a leaf's occurrence may go on
        matching further back than the contexts stored for it."""
        if isinstance(entry, _Branch):
            return length
        sequence, position = self._locate(entry)
        limit = min(self.max_depth, len(context), position)
        while length < limit and context[-length - 1] == sequence[position - length - 1]:
            length += 1
        return length

    def most_frequent_next(self, entry: int | _Branch) -> tuple[int, float]:
        """The token that most often followed a context, and the share of its occurrences it followed;
        among equally frequent tokens, the one that followed the newest occurrence."""
        if isinstance(entry, int):
            return self._next_token(entry), 1.0
        newest = self._next_token(entry.newest)
        counts = entry.counts
        token = max(counts, key=lambda candidate: (counts[candidate], candidate == newest))
        return token, counts[token] / entry.total

    def _add(self, sequence: list[int], occurrence: int) -> None:
        position = occurrence & _POSITION_MASK
        token = sequence[position]
        for depth in range(1, min(self.max_depth, position) + 1):
            context = tuple(sequence[position - depth : position])
            entry = self.entries.get(context)
            if entry is None:
                self.entries[context] = occurrence  # a new context: longer ones are implied by this leaf
                return
            if isinstance(entry, int):
                # A second occurrence: the first one's longer context is no longer implied.
                longer = self._context(entry, depth + 1)
                if longer is not None:
                    self.entries[longer] = entry
                entry = self.entries[context] = _Branch({self._next_token(entry): 1}, 1, entry)
            entry.counts[token] = entry.counts.get(token, 0) + 1
            entry.total += 1
            entry.newest = occurrence

    def _remove(self, sequence: list[int], occurrence: int) -> None:
        position = occurrence & _POSITION_MASK
        token = sequence[position]
        for depth in range(1, min(self.max_depth, position) + 1):
            context = tuple(sequence[position - depth : position])
            entry = self.entries[context]
            if isinstance(entry, int):
                del self.entries[context]  # its only occurrence; nothing longer was stored for it
                return
            left = entry.counts[token] - 1
            if left:
                entry.counts[token] = left
            else:
                del entry.counts[token]
            entry.total -= 1
            if entry.total == 1:
                self.entries[context] = entry.newest
                self._drop_longer(occurrence, entry.newest, depth)
                return

    def _drop_longer(self, removed: int, kept: int, depth: int) -> None:
        """A context of `depth` tokens fell back from two occurrences to one (a leaf at `kept`): the
        longer contexts of both occurrences were stored only because there were two; drop them."""
        for longer in range(depth + 1, self.max_depth + 1):
            removed_context, kept_context = self._context(removed, longer), self._context(kept, longer)
            for context in {removed_context, kept_context} - {None}:
                del self.entries[context]
            if removed_context is None or removed_context != kept_context:
                return  # two leaves (or one): nothing longer was stored under them

    def _locate(self, occurrence: int) -> tuple[list[int], int]:
        return self.sequences[occurrence >> _POSITION_BITS], occurrence & _POSITION_MASK

    def _next_token(self, occurrence: int) -> int:
        sequence, position = self._locate(occurrence)
        return sequence[position]

    def _context(self, occurrence: int, depth: int) -> tuple[int, ...] | None:
        """The context of `depth` tokens ending at the occurrence; None past max_depth or the start."""
        sequence, position = self._locate(occurrence)
        if depth > self.max_depth or depth > position:
            return None
        return tuple(sequence[position - depth : position])


@dataclass
class _Chain:
    """One index's proposal for a context."""

    tokens: list[int] = field(default_factory=list)
    expected_accepted: float = 0.0  # sum of the running share products: SuffixDecoding's draft score
    confidence: float | None = None  # the first token's share
    match_length: int = 0  # tokens of the context's tail the index matched


@dataclass
class _RequestState:
    prompt_length: int  # the context's length at the first call: what release() leaves out
    index: _SuffixIndex

    @property
    def text(self) -> list[int]:
        return self.index.sequences.get(_OWN, [])


class SuffixProposer(Proposer):
    """Proposes the most frequent continuation of the context's longest suffix found in the request's
    own text or in recent earlier requests' outputs, whichever chain expects more accepted tokens.

    Match: the longest suffix of the context (<= max_depth tokens) that occurred in the index.
    Chain: from there, repeatedly the token that most often followed the (growing) context's longest
    matched suffix, while the product of those tokens' frequency shares stays >= min_score, and at most
    max(1, ceil(alpha * match length)) tokens (and k). Choice: the chain with the larger expected
    number of accepted tokens (the sum of the running products), the request's own on a tie.

    Memory: the worker-wide index holds at most `global_tokens` tokens of released requests' outputs
    (prompts too with index_prompts), dropping the oldest request first; `release` adds a request's
    output and frees its own index. Each step costs O(new tokens * max_depth) dictionary updates plus
    O(k log max_depth) lookups: ~0.02 ms per lookahead or propose on 350-token requests, and ~250 bytes
    per held token (scripts/bench_suffix_cost.py).
    """

    kind = common_pb2.PROPOSER_KIND_SUFFIX
    reports_lookahead = True

    def __init__(self, max_depth: int = 24, alpha: float = 1.0, min_score: float = 0.1,
                 global_tokens: int = 200_000, index_prompts: bool = False) -> None:
        if not isinstance(max_depth, int) or max_depth < 1:
            raise ValueError(f"max_depth must be an integer >= 1, got {max_depth!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if not 0 <= min_score <= 1:
            raise ValueError(f"min_score must be in [0, 1], got {min_score!r}")
        if not isinstance(global_tokens, int) or global_tokens < 0:
            raise ValueError(f"global_tokens must be an integer >= 0, got {global_tokens!r}")
        self.max_depth = max_depth
        self.alpha = alpha
        self.min_score = min_score
        self.global_tokens = global_tokens
        self.index_prompts = index_prompts
        self._requests: dict[str, _RequestState] = {}
        self._global = _SuffixIndex(max_depth)
        self._released = 0  # numbers the global index's sequences
        self._classes: dict[str, int | None] = {}  # class of each request's last lookup

    def propose(self, requests: Sequence[ProposalRequest]) -> list[Proposal]:
        chains = [self._lookup(request.seq_id, request.token_ids, request.k) for request in requests]
        return [Proposal(chain.tokens, confidence=chain.confidence) for chain in chains]

    def lookahead(self, seq_id: str, token_ids: list[int], max_k: int) -> int | None:
        """Exact for an unchanged index: the lookup `propose` will make. In the engine a request
        released in between (its output joins the worker-wide index at once) can change it."""
        return len(self._lookup(seq_id, token_ids, max_k).tokens)

    def proposal_class(self, seq_id: str) -> int | None:
        """The last lookup's match-length class (MATCH_CLASS_BOUNDS), offset by SHARED_CLASS_OFFSET
        when the chain came from the worker-wide index; None when nothing matched."""
        return self._classes.get(seq_id)

    def release(self, seq_id: str) -> None:
        """The request's output (its text after the prompt, as of the last call) joins the worker-wide
        index, oldest requests making room; the request's own index is freed."""
        self._classes.pop(seq_id, None)
        state = self._requests.pop(seq_id, None)
        if state is None or self.global_tokens < 2:
            return
        kept = state.text if self.index_prompts else state.text[state.prompt_length :]
        kept = kept[-self.global_tokens :]
        if len(kept) < 2:  # no context with a token after it
            return
        while self._global.tokens + len(kept) > self.global_tokens:
            self._global.remove_oldest()
        self._released += 1
        self._global.extend(self._released, kept)

    def memory_tokens(self) -> int:
        """Tokens of text held: the worker-wide index's and every live request's."""
        return self._global.tokens + sum(state.index.tokens for state in self._requests.values())

    def stats(self) -> dict[str, int]:
        entries = self._global.entries.values()
        return {
            "global_requests": len(self._global.sequences),
            "global_tokens": self._global.tokens,
            "global_contexts": len(self._global.entries),
            "global_branches": sum(isinstance(entry, _Branch) for entry in entries),
            "live_requests": len(self._requests),
            "live_tokens": sum(state.index.tokens for state in self._requests.values()),
            "live_contexts": sum(len(state.index.entries) for state in self._requests.values()),
        }

    def _lookup(self, seq_id: str, context: list[int], k: int) -> _Chain:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        own = self._chain(self._updated_state(seq_id, context).index, context, k)
        shared = self._chain(self._global, context, k)
        chain, offset = (own, 0) if own.expected_accepted >= shared.expected_accepted else (shared, SHARED_CLASS_OFFSET)
        self._classes[seq_id] = (bisect_right(MATCH_CLASS_BOUNDS, chain.match_length) + offset
                                 if chain.tokens else None)
        return chain

    def _updated_state(self, seq_id: str, context: list[int]) -> _RequestState:
        """The request's index of `context`, extending the stored one when `context` only appended
        tokens and rebuilding it when the history changed (the prompt length recorded first stays)."""
        state = self._requests.get(seq_id)
        if state is None:
            state = self._requests[seq_id] = _RequestState(len(context), _SuffixIndex(self.max_depth))
        else:
            known = state.text
            if len(context) < len(known) or context[: len(known)] != known:
                state.index = _SuffixIndex(self.max_depth)
        state.index.extend(_OWN, context[len(state.text) :])
        return state

    def _chain(self, index: _SuffixIndex, context: list[int], k: int) -> _Chain:
        length, entry = index.longest_match(context)
        if entry is None:
            return _Chain()
        matched = index.match_length(context, length, entry)
        cap = min(k, max(1, math.ceil(self.alpha * matched)))
        chain, walk, product = _Chain(match_length=matched), context[-self.max_depth :], 1.0
        while len(chain.tokens) < cap and entry is not None:
            token, share = index.most_frequent_next(entry)
            product *= share
            if product < self.min_score:
                break
            chain.tokens.append(token)
            chain.expected_accepted += product
            if chain.confidence is None:
                chain.confidence = share
            walk.append(token)
            _, entry = index.longest_match(walk)
        return chain

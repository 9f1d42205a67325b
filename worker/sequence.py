"""One request's life inside the engine: what was asked, what was generated, what to stream.

Everything here is plain Python (no torch, no gRPC) so the text and stop logic can be tested
without a model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Sequence

from smartspec.core.acceptance import positions_tested

INCOMPLETE_CHAR = "\ufffd"  # what a byte-level decoder yields for a cut UTF-8 sequence


class FinishReason(enum.Enum):
    STOP = "stop"          # end-of-sequence token or a stop string
    LENGTH = "length"      # max_tokens or the context window
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationRequest:
    """A validated, tokenized request (the server builds it from the proto)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SpeculationCounters:
    """Raw per-request counters; rates are derived, never stored."""

    proposed: int = 0
    requested: int = 0       # proposals asked for (a proposer may offer fewer: proposed <= requested)
    accepted: int = 0
    tested: int = 0          # positions_tested: accepted + (1 if a rejection ended the run)
    decode_steps: int = 0
    emitted: int = 0         # tokens produced by decode steps (accepted + the target's own)
    ks: list[int] = field(default_factory=list)

    def observe(self, k: int, proposed: int, accepted: int) -> None:
        self.ks.append(k)
        self.requested += k
        self.proposed += proposed
        self.accepted += accepted
        self.tested += positions_tested(proposed, accepted)
        self.decode_steps += 1
        self.emitted += accepted + 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.tested if self.tested else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.emitted / self.decode_steps if self.decode_steps else 0.0

    @property
    def mean_k(self) -> float:
        return sum(self.ks) / len(self.ks) if self.ks else 0.0


@dataclass(frozen=True)
class TokenDelta:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class GenerationOutcome:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    speculation: SpeculationCounters
    time_to_first_token_ms: float
    total_ms: float
    queue_ms: float

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class GenerationFailed:
    """The engine could not finish the request (a bug or a device error, not the user's fault)."""

    request_id: str
    message: str


def longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string.

    That tail must be held back: the next token may complete the stop string, and text past
    (and including) a stop string is never returned.
    """
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:length]):
                best = length
                break
    return best


def first_stop(text: str, stops: Sequence[str], start: int) -> int:
    """Index of the earliest stop string occurrence at or after `start`, or -1."""
    found = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(found) if found else -1


class OutputText:
    """Incremental detokenization with stop strings.

    Decodes the whole generated id list each time (correct for merged and multi-byte tokens)
    and emits only the new, settled suffix: a trailing incomplete UTF-8 character and any tail
    that could still grow into a stop string are held back until the next tokens settle them.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""          # decoded text of `ids`, cut at a stop string once one is seen
        self.emitted_chars = 0
        self.emitted_ids = 0
        self.stopped = False

    def extend(self, new_ids: Sequence[int]) -> TokenDelta:
        """Add tokens; returns what may be streamed now. Sets `stopped` on a stop string."""
        if self.stopped:
            raise RuntimeError("output already ended at a stop string")
        self.ids.extend(new_ids)
        text = self._decode(self.ids)
        # A stop string cannot start inside emitted text: its prefix would have been held back.
        stop_at = first_stop(text, self._stops, self.emitted_chars) if self._stops else -1
        if stop_at >= 0:
            self.stopped = True
            self.text = text[:stop_at]
            self.ids = self.ids[: self._tokens_covering(stop_at)]
            return self._emit(len(self.text), len(self.ids))
        self.text = text
        settled = len(text.rstrip(INCOMPLETE_CHAR))
        settled -= longest_stop_prefix_suffix(text[:settled], self._stops)
        settled = max(settled, self.emitted_chars)
        return self._emit(settled, self._tokens_within(settled, len(text)))

    def flush(self) -> TokenDelta:
        """The request ended without a stop string: release everything held back."""
        return self._emit(len(self.text), len(self.ids))

    def _emit(self, upto_chars: int, upto_ids: int) -> TokenDelta:
        delta = TokenDelta(self.text[self.emitted_chars:upto_chars], tuple(self.ids[self.emitted_ids:upto_ids]))
        self.emitted_chars = max(self.emitted_chars, upto_chars)
        self.emitted_ids = max(self.emitted_ids, upto_ids)
        return delta

    def _tokens_covering(self, chars: int) -> int:
        """Fewest ids whose text reaches `chars` characters (ids after a stop are dropped)."""
        for n in range(self.emitted_ids, len(self.ids) + 1):
            if len(self._decode(self.ids[:n])) >= chars:
                return n
        return len(self.ids)

    def _tokens_within(self, chars: int, full_len: int) -> int:
        """Most ids whose whole text lies within the first `chars` characters.

        Token ids are streamed with their text: ids whose text is held back wait with it.
        """
        if full_len <= chars:
            return len(self.ids)
        for n in range(len(self.ids) - 1, self.emitted_ids, -1):
            if len(self._decode(self.ids[:n])) <= chars:
                return n
        return self.emitted_ids


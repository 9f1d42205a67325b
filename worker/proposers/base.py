"""The proposer contract: what the engine asks for and what a proposer gives back.

Kept apart from any implementation so the engine depends on this page only; the engine verifies
whatever a proposer returns, so a proposer can be wrong (lower acceptance) but never unsafe.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from .sampling import SamplingParams


@dataclass
class ProposalRequest:
    """One request's ask for the next step."""

    seq_id: str
    token_ids: list[int]  # whole committed context so far (prompt + generated)
    k: int  # proposals wanted (>= 1)
    sampling: SamplingParams  # temperature (0 = greedy), top_p, top_k
    generator: torch.Generator | None = None  # the request's own RNG (seeded requests repeat)


@dataclass
class Proposal:
    """Up to k guessed next tokens, and the distribution they were drawn from when sampled."""

    tokens: list[int]  # 0..k proposed tokens
    probs: torch.Tensor | None = None  # [len(tokens), V] draft distribution; None = deterministic
    confidence: float | None = None  # estimated P(first token accepted); None = unknown

    def __post_init__(self) -> None:
        if self.probs is not None and self.probs.shape[0] != len(self.tokens):
            raise ValueError(
                f"probs has {self.probs.shape[0]} rows for {len(self.tokens)} proposed tokens"
            )


class Proposer(ABC):
    """Guesses continuations for a batch of requests; the target verifies them."""

    kind: int  # a smartspec.v1 ProposerKind value
    reports_lookahead: bool = False  # True where `lookahead` answers (not None) before every step

    @abstractmethod
    def propose(self, requests: Sequence[ProposalRequest]) -> list[Proposal]:
        """One Proposal per request, in order, each with at most request.k tokens."""

    def release(self, seq_id: str) -> None:
        """The request finished or was cancelled: free whatever state it holds (default: none)."""

    def lookahead(self, seq_id: str, token_ids: list[int], max_k: int) -> int | None:
        """How many tokens `propose` would offer for this context if asked for max_k, when the
        proposer can tell cheaply before the step; None when it cannot (the default: a draft
        model offers whatever it is asked). The engine reports it so the planner knows which
        requests would run dry next step instead of guessing from their average fill rate."""
        return None

    def observe_verification(self, seq_id: str, proposed: int, accepted: int, tested: int) -> None:
        """The target verified this request's last proposal: `accepted` of `proposed` kept over
        `tested` judged positions (default: ignored). Called for every row that asked for k > 0."""

    def proposal_class(self, seq_id: str) -> int | None:
        """A small integer grading the proposal the last `lookahead` for this request found (for
        prompt lookup: how long a match it copies from), or None (the default: ungraded). The
        worker pools acceptance per class and starts each request's estimate from its next
        proposal's class (core/decision.py, AcceptanceBook), so a short, shaky match is not planned
        with the confidence that long copied spans earned."""
        return None

    def member_kind(self, seq_id: str) -> int | None:
        """The kind (a smartspec.v1 ProposerKind value) of the proposer that made this request's
        last proposal, where that is not this proposer's own `kind` (a per-request choice among
        members); None (the default) otherwise. Reported with the step, so the controller pools
        the evidence per member kind."""
        return None

"""What a step tells its planner, and what a planner must answer.

The engine asks a `Planner` for every decoding request's k before a step and hands it the
step's facts afterwards. The controller link, the local policy and the static rule all
implement this one protocol, so the engine never knows where a k came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class RequestFacts:
    """One request in one step (mirrors smartspec.v1.RequestOutcome)."""

    request_id: str
    proposed_tokens: int
    accepted_tokens: int
    tested_positions: int
    context_tokens: int
    prefill_tokens: int = 0
    finished: bool = False
    requested_tokens: int = 0   # k asked of the proposer after clamping (proposed may be fewer)
    proposable_tokens: int | None = None  # what the proposer can offer next step; None = not known
    proposal_class: int | None = None  # how that offer looks (Proposer.proposal_class); worker-local
    proposer_kind: int | None = None   # the member that proposed this step (a choice worker); None: the worker's own

    @classmethod
    def decoded(cls, request_id: str, *, requested: int, proposed: int, accepted: int, tested: int,
                context_tokens: int, finished: bool, proposable: int | None,
                proposal_class: int | None = None, proposer_kind: int | None = None) -> "RequestFacts":
        """A decode step: k asked, proposals made, accepted and tested by verification."""
        return cls(request_id=request_id, proposed_tokens=proposed, accepted_tokens=accepted,
                   tested_positions=tested, context_tokens=context_tokens, finished=finished,
                   requested_tokens=requested, proposable_tokens=proposable, proposal_class=proposal_class,
                   proposer_kind=proposer_kind)

    @classmethod
    def prefilled(cls, request_id: str, *, chunk: int, context_tokens: int, finished: bool,
                  proposable: int | None, proposal_class: int | None = None) -> "RequestFacts":
        """A prefill step: `chunk` prompt tokens went in (and the first token, when it was the last chunk)."""
        return cls(request_id=request_id, proposed_tokens=0, accepted_tokens=0, tested_positions=0,
                   context_tokens=context_tokens, prefill_tokens=chunk, finished=finished,
                   proposable_tokens=proposable, proposal_class=proposal_class)

    @classmethod
    def ended(cls, request_id: str, *, context_tokens: int) -> "RequestFacts":
        """A request cancelled or failed between steps: it ran nothing, it only ended."""
        return cls(request_id=request_id, proposed_tokens=0, accepted_tokens=0, tested_positions=0,
                   context_tokens=context_tokens, finished=True)


@dataclass(frozen=True)
class StepFacts:
    """One engine step (mirrors smartspec.v1.StepReport)."""

    step_index: int
    requests: tuple[RequestFacts, ...]
    draft_ms: float
    verify_ms: float
    total_ms: float
    batched_tokens: int
    queued_requests: int


@dataclass(frozen=True)
class SpeculationQuery:
    """A request that decodes in the coming step and needs a k."""

    request_id: str
    context_tokens: int


class Planner(Protocol):
    def plan(self, step_index: int, queries: Sequence[SpeculationQuery], queued_requests: int) -> dict[str, int]:
        """k for each query (missing ids get the engine's fallback k). Must not block long."""

    def observe(self, facts: StepFacts) -> None:
        """The step just run; a remote planner sends it and waits (bounded) for the next plan."""

    def close(self) -> None:
        ...


class StaticPlanner:
    """Every request speculates `k` tokens (k = 0: plain decoding). The baseline of baselines."""

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError("k must be >= 0")
        self.k = k

    def plan(self, step_index: int, queries: Sequence[SpeculationQuery], queued_requests: int) -> dict[str, int]:
        return {q.request_id: self.k for q in queries}

    def observe(self, facts: StepFacts) -> None:
        pass

    def close(self) -> None:
        pass

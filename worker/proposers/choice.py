"""Several model-free proposers in one worker; per request and step, the one expected to pay most.

`--proposer ngram,suffix`: each step every member looks ahead for every decoding request (how many
tokens it would offer, and the class of that offer: prompt lookup's match length, suffix decoding's
frequency share) and the request is given the member whose offer is expected to yield the most
accepted tokens,

    E_p = r + r^2 + ... + r^n      (n offered by member p, r its acceptance rate for this request)

where r is the request's own record with member p (accepted / tested positions, as every
acceptance estimate here counts them) shrunk toward the rate member p has shown at that class over
all requests (decayed pooled counts, started at COLD_RATE), with OWN_STRENGTH pseudo-trials: a
member that keeps failing one request loses it even if its class does well elsewhere. Why this choice is the goodput-optimal one for model-free members: their proposals cost
nothing to make and the same to verify per token, so for any k the planner picks, the step's cost
does not depend on which member filled the row; only the expected accepted tokens do, and those
grow with r and with n. (Members with a cost of their own, a draft model, need the (proposer, k)
optimiser of core/policies/choice_optimizer.py in the planner instead; they are refused here.)

Every member sees every request's context each step (look-ahead on all), so a member's per-request
index stays current whichever member proposes; release() reaches all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from smartspec.v1 import common_pb2

from .base import Proposal, ProposalRequest, Proposer

COLD_RATE = 0.5  # a (member, class) never verified yet
PRIOR_TRIALS = 4.0  # pseudo-trials of COLD_RATE behind every learned rate
OWN_STRENGTH = 8.0  # pseudo-trials of the class rate behind a request's own record with a member
RATE_DECAY = 0.999  # per verified outcome: the rates follow the last ~1,000 verifications
CLASS_STRIDE = 16  # reported class = member index * CLASS_STRIDE + the member's own class
UNGRADED = CLASS_STRIDE - 1  # the member's own class when it grades nothing


@dataclass
class _Rate:
    """Decayed accepted / tested counts of one (member, class)."""

    accepted: float = 0.0
    tested: float = 0.0

    def value(self) -> float:
        return self.shrunk_toward(COLD_RATE, PRIOR_TRIALS)

    def shrunk_toward(self, prior_rate: float, strength: float) -> float:
        """Beta-posterior mean: these counts with `strength` pseudo-trials at `prior_rate`."""
        return (self.accepted + prior_rate * strength) / (self.tested + strength)

    def add(self, accepted: int, tested: int) -> None:
        self.accepted = self.accepted * RATE_DECAY + accepted
        self.tested = self.tested * RATE_DECAY + tested


@dataclass(frozen=True)
class _Pick:
    """The member chosen for a request's next proposal, for the context it was chosen on."""

    member: int
    member_class: int
    context_length: int
    offered: int


def expected_accepted(rate: float, offered: int) -> float:
    """r + r^2 + ... + r^n: accepted tokens expected from n offered at per-position rate r."""
    total, term = 0.0, 1.0
    for _ in range(offered):
        term *= rate
        total += term
    return total


class ProposerChoice(Proposer):
    """Proposes for each request with the member whose next offer is worth most (module docstring)."""

    kind = common_pb2.PROPOSER_KIND_CHOICE
    reports_lookahead = True

    def __init__(self, members: Sequence[Proposer], names: Sequence[str] | None = None) -> None:
        if len(members) < 2:
            raise ValueError(f"a proposer choice needs at least two members, got {len(members)}")
        if len(members) > CLASS_STRIDE:
            raise ValueError(f"at most {CLASS_STRIDE} members, got {len(members)}")
        for member in members:
            if not member.reports_lookahead:
                raise ValueError(f"{type(member).__name__} cannot look ahead (a draft model has a cost of "
                                 "its own): only model-free proposers can be chosen per request here")
        self.members = list(members)
        self.names = list(names) if names is not None else [type(m).__name__ for m in members]
        self._rates: dict[tuple[int, int], _Rate] = {}
        self._picks: dict[str, _Pick] = {}  # by request: the member its next proposal comes from
        self._proposed_by: dict[str, tuple[int, int]] = {}  # by request: (member, class) of its last proposal
        self._own: dict[tuple[str, int], _Rate] = {}  # by (request, member): that request's own record

    # ---- the Proposer contract ----

    def lookahead(self, seq_id: str, token_ids: list[int], max_k: int) -> int | None:
        return self._pick(seq_id, token_ids, max_k).offered

    def proposal_class(self, seq_id: str) -> int | None:
        pick = self._picks.get(seq_id)
        return None if pick is None else pick.member * CLASS_STRIDE + pick.member_class

    def propose(self, requests: Sequence[ProposalRequest]) -> list[Proposal]:
        by_member: dict[int, list[int]] = {}
        for position, request in enumerate(requests):
            pick = self._picks.get(request.seq_id)
            if pick is None or pick.context_length != len(request.token_ids):
                pick = self._pick(request.seq_id, request.token_ids, request.k)
            by_member.setdefault(pick.member, []).append(position)
            self._proposed_by[request.seq_id] = (pick.member, pick.member_class)
        proposals: list[Proposal | None] = [None] * len(requests)
        for member, positions in by_member.items():
            made = self.members[member].propose([requests[p] for p in positions])
            for position, proposal in zip(positions, made):
                proposals[position] = proposal
        return proposals  # type: ignore[return-value]

    def observe_verification(self, seq_id: str, proposed: int, accepted: int, tested: int) -> None:
        where = self._proposed_by.pop(seq_id, None)
        if where is not None and proposed > 0:
            self._rates.setdefault(where, _Rate()).add(accepted, tested)
            own = self._own.setdefault((seq_id, where[0]), _Rate())
            own.accepted += accepted
            own.tested += tested
        member = None if where is None else self.members[where[0]]
        if member is not None:
            member.observe_verification(seq_id, proposed, accepted, tested)

    def release(self, seq_id: str) -> None:
        self._picks.pop(seq_id, None)
        self._proposed_by.pop(seq_id, None)
        for index, member in enumerate(self.members):
            self._own.pop((seq_id, index), None)
            member.release(seq_id)

    # ---- inspection ----

    def rates(self) -> dict[tuple[str, int], float]:
        """The learned acceptance rate per (member name, member class)."""
        return {(self.names[m], c): rate.value() for (m, c), rate in sorted(self._rates.items())}

    # ---- the choice ----

    def _pick(self, seq_id: str, token_ids: list[int], max_k: int) -> _Pick:
        best: _Pick | None = None
        best_value = -1.0
        for member_index, member in enumerate(self.members):
            offered = member.lookahead(seq_id, token_ids, max_k) or 0
            member_class = member.proposal_class(seq_id)
            member_class = UNGRADED if member_class is None else min(int(member_class), UNGRADED - 1)
            class_rate = self._rates.get((member_index, member_class), _COLD).value()
            rate = self._own.get((seq_id, member_index), _COLD).shrunk_toward(class_rate, OWN_STRENGTH)
            value = expected_accepted(rate, offered)
            if value > best_value:  # ties: the earlier member
                best, best_value = _Pick(member_index, member_class, len(token_ids), offered), value
        assert best is not None
        self._picks[seq_id] = best
        return best


_COLD = _Rate()

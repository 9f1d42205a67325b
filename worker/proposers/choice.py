"""Several proposers in one worker; per request and step, the one expected to pay most.

`--proposer ngram,suffix[,draft]`: each step every model-free member looks ahead for every decoding
request (how many tokens it would offer, and the class of that offer: prompt lookup's match length,
suffix decoding's match length) and a request's next proposal comes from one member. Acceptance is
kept per (request, member): a request's own record with member p (accepted / tested positions, as
every acceptance estimate here counts them) shrunk toward the rate member p has shown at that class
over all requests (decayed pooled counts, started at the rate every worker's proposals of that
kind have shown, pooled by the controller in Redis, or COLD_RATE), with OWN_STRENGTH pseudo-trials: a
member that keeps failing one request loses it even if its class does well elsewhere.

Who decides. Model-free members cost nothing to ask and the same to verify per token, so among them
the best is the one whose offer is expected to yield the most accepted tokens,

    E_p = r + r^2 + ... + r^n      (n offered by member p, r its acceptance rate for this request)

and that is what `lookahead` picks for any planner that only gives a k (a fixed k, a controller
plan applied as sent). A costly member (a draft model: it offers whatever it is asked, at a price
per depth and per token) changes the step's cost with every row it takes, so with one in the list
the goodput planner decides (member, k) per row with the exact optimiser of
core/policies/choice_optimizer.py (worker/choice_plan.py) from `options` and `member_costs`, and
hands the members to `assign` before the step. Each costly member's cost terms are fitted from its
own timed `propose` calls (core/cost_fit.py DraftCostFit), seeded from the startup profile, so its
price is what it measured here, not a blend with rows prompt lookup filled for free. Under a k-only
plan a row goes to its best model-free member when that offers anything, else to the first costly
member.

Every model-free member looks ahead on every request each step, so a member's per-request index
stays current whichever member proposes; a draft model catches up on the tokens it has not seen
when it is next asked (worker/proposers/draft.py). release() reaches all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from smartspec.core.acceptance import PooledPrior
from smartspec.core.cost_fit import DraftCostFit
from smartspec.core.cost_model import DEFAULT_COST_MODEL, CostModel
from smartspec.core.policies.choice_optimizer import MAX_DEPTH_PROPOSERS
from smartspec.v1 import common_pb2

from .base import Proposal, ProposalRequest, Proposer

COLD_RATE = 0.5  # a (member, class) never verified yet
PRIOR_TRIALS = 4.0  # pseudo-trials of COLD_RATE behind every learned rate
OWN_STRENGTH = 8.0  # pseudo-trials of the class rate behind a request's own record with a member
RATE_DECAY = 0.999  # per verified outcome: the rates follow the last ~1,000 verifications
CLASS_STRIDE = 16  # reported class = member index * CLASS_STRIDE + the member's own class
UNGRADED = CLASS_STRIDE - 1  # the member's own class when it grades nothing (every costly member)


@dataclass
class _Rate:
    """Decayed accepted / tested counts of one (member, class)."""

    accepted: float = 0.0
    tested: float = 0.0

    def shrunk_toward(self, prior_rate: float, strength: float) -> float:
        """Beta-posterior mean: these counts with `strength` pseudo-trials at `prior_rate`."""
        return (self.accepted + prior_rate * strength) / (self.tested + strength)

    def add(self, accepted: int, tested: int) -> None:
        self.accepted = self.accepted * RATE_DECAY + accepted
        self.tested = self.tested * RATE_DECAY + tested


@dataclass(frozen=True)
class _Offer:
    """What one member can give a request next step: tokens (max_k for a costly member) and class."""

    offered: int
    member_class: int


@dataclass(frozen=True)
class _Pick:
    """The member chosen for a request's next proposal under a k-only plan, for the context it was
    chosen on."""

    member: int
    context_length: int
    offered: int


@dataclass(frozen=True)
class ChoiceOptions:
    """Each row's options for the coming step, as core/policies/choice_optimizer.py takes them."""

    acceptance: np.ndarray  # [B, P] float64: the row's acceptance rate with each member
    caps: np.ndarray  # [B, P] int64: the most tokens each member can offer the row


def expected_accepted(rate: float, offered: int) -> float:
    """r + r^2 + ... + r^n: accepted tokens expected from n offered at per-position rate r."""
    total, term = 0.0, 1.0
    for _ in range(offered):
        term *= rate
        total += term
    return total


class ProposerChoice(Proposer):
    """Proposes for each request with the member chosen for it (module docstring)."""

    kind = common_pb2.PROPOSER_KIND_CHOICE
    reports_lookahead = True  # the k-only pick's offer: max_k where it is a costly member

    def __init__(self, members: Sequence[Proposer], names: Sequence[str] | None = None,
                 cost_prior: CostModel = DEFAULT_COST_MODEL) -> None:
        if len(members) < 2:
            raise ValueError(f"a proposer choice needs at least two members, got {len(members)}")
        if len(members) > CLASS_STRIDE:
            raise ValueError(f"at most {CLASS_STRIDE} members, got {len(members)}")
        self.members = list(members)
        self.names = list(names) if names is not None else [type(m).__name__ for m in members]
        # A member that cannot look ahead offers whatever it is asked and has a cost of its own.
        self.costly = [not member.reports_lookahead for member in self.members]
        if sum(self.costly) > MAX_DEPTH_PROPOSERS:
            raise ValueError(f"at most {MAX_DEPTH_PROPOSERS} members with a cost of their own (draft models), "
                             f"got {sum(self.costly)}")
        self.cost_fits = {index: DraftCostFit.create(cost_prior) for index in self.costly_members}
        self.proposals_by_member = [0] * len(self.members)  # rows each member proposed for
        self._rates: dict[tuple[int, int], _Rate] = {}
        self._picks: dict[str, _Pick] = {}  # by request: the member a k-only plan's proposal comes from
        self._assigned: dict[str, int] = {}  # by request: the member the planner chose for the coming step
        self.planned_goodput: float | None = None  # the last plan's optimum: where the next search starts
        self._proposed_by: dict[str, tuple[int, int]] = {}  # by request: (member, class) of its last proposal
        # What the (member, k) planner reads for a whole batch at once, one row per request (its slot;
        # slot 0 is never given out: a request never looked ahead reads its defaults there).
        self._slots: dict[str, int] = {}
        self._free_slots: list[int] = []
        self._offer_table = np.zeros((0, 2, len(self.members)), dtype=np.int64)  # [slots, 2, P]: offered, class
        self._own_table = np.zeros((0, 2, len(self.members)))  # [slots, 2, P]: its own accepted, tested
        self._grow_tables(16)
        self._cold = [COLD_RATE] * len(self.members)  # each member's rate before it has evidence here

    @property
    def costly_members(self) -> list[int]:
        return [index for index, costly in enumerate(self.costly) if costly]

    @property
    def has_costly_member(self) -> bool:
        return any(self.costly)

    # ---- the Proposer contract ----

    def lookahead(self, seq_id: str, token_ids: list[int], max_k: int) -> int | None:
        self._look(seq_id, token_ids, max_k)
        return self._picks[seq_id].offered  # what a k-only plan's proposal will hold

    def proposal_class(self, seq_id: str) -> int | None:
        pick = self._picks.get(seq_id)
        if pick is None:
            return None
        return pick.member * CLASS_STRIDE + self._offered_class(seq_id, pick.member)

    def propose(self, requests: Sequence[ProposalRequest]) -> list[Proposal]:
        by_member: dict[int, list[int]] = {}
        for position, request in enumerate(requests):
            member = self._assigned.pop(request.seq_id, None)
            if member is None:
                pick = self._picks.get(request.seq_id)
                if pick is None or pick.context_length != len(request.token_ids):
                    self._look(request.seq_id, request.token_ids, request.k)
                    pick = self._picks[request.seq_id]
                member = pick.member
            member_class = self._offered_class(request.seq_id, member)
            by_member.setdefault(member, []).append(position)
            self._proposed_by[request.seq_id] = (member, member_class)
        proposals: list[Proposal | None] = [None] * len(requests)
        for member, positions in by_member.items():
            asks = [requests[p] for p in positions]
            began = time.perf_counter()
            made = self.members[member].propose(asks)
            if self.costly[member]:
                self.cost_fits[member].observe([a.k for a in asks], [len(a.token_ids) for a in asks],
                                               (time.perf_counter() - began) * 1000.0)
            self.proposals_by_member[member] += len(asks)
            for position, proposal in zip(positions, made):
                proposals[position] = proposal
        return proposals  # type: ignore[return-value]

    def observe_verification(self, seq_id: str, proposed: int, accepted: int, tested: int) -> None:
        where = self._proposed_by.pop(seq_id, None)
        if where is not None and proposed > 0:
            self._rates.setdefault(where, _Rate()).add(accepted, tested)
            slot = self._slot(seq_id)  # first: it may grow the tables
            own = self._own_table[slot]  # [2, P]
            own[0, where[0]] += accepted
            own[1, where[0]] += tested
        member = None if where is None else self.members[where[0]]
        if member is not None:
            member.observe_verification(seq_id, proposed, accepted, tested)

    def member_kind(self, seq_id: str) -> int | None:
        where = self._proposed_by.get(seq_id)
        return None if where is None else self.members[where[0]].kind

    def release(self, seq_id: str) -> None:
        for table in (self._picks, self._assigned, self._proposed_by):
            table.pop(seq_id, None)
        slot = self._slots.pop(seq_id, None)
        if slot is not None:
            self._clear_slot(slot)
            self._free_slots.append(slot)
        for member in self.members:
            member.release(seq_id)

    # ---- for the (member, k) planner (worker/choice_plan.py) ----

    def options(self, seq_ids: Sequence[str], max_k: int) -> ChoiceOptions:
        """Every row's acceptance rate and offer with every member, from the last look-ahead (a
        request not looked ahead yet: model-free members offer nothing, costly ones max_k). The
        rate is the row's own record shrunk toward its (member, class) rate, as `_rate`, for the
        whole batch at once."""
        count = len(self.members)
        slots = np.array([self._slots.get(s, 0) for s in seq_ids], dtype=np.int64)  # [B]
        offer_rows, own = self._offer_table[slots], self._own_table[slots]  # [B, 2, P] each
        class_rate = self._class_rate_table()[np.arange(count), offer_rows[:, 1]]  # [B, P]
        # (accepted + rate * s) / (tested + s): exactly the class rate for a row with no record (s = 8)
        acceptance = (own[:, 0] + class_rate * OWN_STRENGTH) / (own[:, 1] + OWN_STRENGTH)  # [B, P]
        caps = np.where(self.costly, max_k, np.minimum(offer_rows[:, 0], max_k))  # [B, P]
        return ChoiceOptions(acceptance, caps)

    def k_only_members(self, seq_ids: Sequence[str]) -> np.ndarray:
        """The member each row's proposal comes from under a plan that gives k alone (a probe, say):
        its best model-free member when that offers anything, else the first costly one. [B] ints."""
        fallback = (self.costly_members or [0])[0]
        picks = self._picks
        return np.array([pick.member if (pick := picks.get(seq_id)) is not None else fallback
                         for seq_id in seq_ids], dtype=np.int64)

    def pooled_tested(self) -> float:
        """Tested positions in this worker's (member, class) pools, decayed: how much it has seen."""
        return sum(rate.tested for rate in self._rates.values())

    def member_costs(self) -> list[CostModel]:
        """Each member's own cost terms (d_*): fitted for costly members, none for model-free ones."""
        return [self.cost_fits[index].model() if costly else CostModel() for index, costly in enumerate(self.costly)]

    def seed_costs(self, prior: CostModel) -> None:
        """Restart every costly member's cost fit from `prior` (the startup profile's fit)."""
        self.cost_fits = {index: DraftCostFit.create(prior) for index in self.costly_members}

    @property
    def member_kinds(self) -> list[int]:
        """Each member's ProposerKind value (the hello's member_kinds)."""
        return [member.kind for member in self.members]

    def use_member_priors(self, priors: Mapping[int, PooledPrior]) -> None:
        """Start every member's rates from the acceptance pooled over all workers for its kind (the
        controller's, by ProposerKind value) instead of COLD_RATE; a kind without pooled evidence
        keeps COLD_RATE."""
        for member, proposer in enumerate(self.members):
            prior = priors.get(proposer.kind)
            self._cold[member] = COLD_RATE if prior is None else prior.rate(COLD_RATE)

    def assign(self, members: Mapping[str, int], goodput: float | None = None) -> None:
        """The member each request's proposal comes from in the coming step (rows not named: the
        k-only rule). Replaces the previous step's assignment. `goodput`: the plan's predicted
        optimum, kept as the next plan's start (consecutive batches differ by a few rows)."""
        self._assigned = dict(members)
        self.planned_goodput = goodput

    def _slot(self, seq_id: str) -> int:
        """The request's row in the planner's tables, given out on first sight."""
        slot = self._slots.get(seq_id)
        if slot is None:
            if not self._free_slots:
                self._grow_tables(2 * len(self._offer_table))
            slot = self._slots[seq_id] = self._free_slots.pop()
        return slot

    def _grow_tables(self, size: int) -> None:
        old = len(self._offer_table)
        self._offer_table = np.concatenate([self._offer_table, np.zeros((size - old,) + self._offer_table.shape[1:],
                                                                        dtype=np.int64)])
        self._own_table = np.concatenate([self._own_table, np.zeros((size - old,) + self._own_table.shape[1:])])
        for slot in range(old, size):
            self._clear_slot(slot)
        self._free_slots.extend(range(size - 1, max(old, 1) - 1, -1))  # slot 0 stays the defaults' row

    def _offered_class(self, seq_id: str, member: int) -> int:
        """The class of the member's last offer for the request (UNGRADED: never looked ahead)."""
        return int(self._offer_table[self._slots.get(seq_id, 0), 1, member])

    def _clear_slot(self, slot: int) -> None:
        """A request's defaults: nothing offered, ungraded, no record of its own."""
        self._offer_table[slot, 0] = 0
        self._offer_table[slot, 1] = UNGRADED
        self._own_table[slot] = 0.0

    # ---- inspection ----

    def rates(self) -> dict[tuple[str, int], float]:
        """The learned acceptance rate per (member name, member class)."""
        return {(self.names[m], c): rate.shrunk_toward(self._cold[m], PRIOR_TRIALS)
                for (m, c), rate in sorted(self._rates.items())}

    # ---- the k-only choice ----

    def _class_rate(self, member: int, member_class: int) -> float:
        return self._rates.get((member, member_class), _COLD).shrunk_toward(self._cold[member], PRIOR_TRIALS)

    def _class_rate_table(self) -> np.ndarray:
        """Every (member, class)'s rate: [P, CLASS_STRIDE] (a class never verified: the cold rate)."""
        table = np.repeat(np.array(self._cold, dtype=np.float64)[:, None], CLASS_STRIDE, axis=1)  # [P, 16]
        for (member, member_class), rate in self._rates.items():
            table[member, member_class] = rate.shrunk_toward(self._cold[member], PRIOR_TRIALS)
        return table

    def _rate(self, seq_id: str, member: int, member_class: int) -> float:
        """The request's own record with the member, shrunk toward the (member, class) rate."""
        slot = self._slots.get(seq_id, 0)
        accepted, tested = float(self._own_table[slot, 0, member]), float(self._own_table[slot, 1, member])
        return _Rate(accepted, tested).shrunk_toward(self._class_rate(member, member_class), OWN_STRENGTH)

    def _look(self, seq_id: str, token_ids: list[int], max_k: int) -> list[_Offer]:
        """Every member's offer for this context, and the k-only pick among them."""
        offers = []
        for member, proposer in enumerate(self.members):
            if self.costly[member]:
                offers.append(_Offer(max_k, UNGRADED))
                continue
            offered = proposer.lookahead(seq_id, token_ids, max_k) or 0
            member_class = proposer.proposal_class(seq_id)
            offers.append(_Offer(offered, UNGRADED if member_class is None else min(int(member_class), UNGRADED - 1)))
        best, best_value = -1, -1.0
        for member, offer in enumerate(offers):
            if self.costly[member]:
                continue
            value = expected_accepted(self._rate(seq_id, member, offer.member_class), offer.offered)
            if value > best_value:  # ties: the earlier member
                best, best_value = member, value
        if (best < 0 or offers[best].offered == 0) and self.has_costly_member:
            best = self.costly_members[0]
        slot = self._slot(seq_id)  # first: it may grow the tables
        self._offer_table[slot] = [[offer.offered for offer in offers], [offer.member_class for offer in offers]]
        self._picks[seq_id] = _Pick(best, len(token_ids), offers[best].offered)
        return offers


_COLD = _Rate()

"""The decision pipeline, written once: how a step's plan follows from what is known of its requests.

    per-request evidence (accepted / tested / proposed / requested, last k, ...)
      -> acceptance and fill estimates, each blended with the pooled prior
      -> BatchColumns -> BatchState
      -> guarded_decide(policy, batch, cost, params, prior_acceptance=...)
      -> each k capped to what the request's proposer can offer next step (the look-ahead)

Three planners run it, on three stores of the same facts: the controller (`controller/planner.py`,
columns of its Redis history table, batch 256 in about a millisecond), the worker (its local policy,
`--controller none`, and its re-plan of the controller's basis, `worker/replan.py`, both from an
`AcceptanceBook`) and the simulator (`bench/sim_planner.py`, arrays over its requests). Each only
gathers `Evidence` for the requests to plan and calls `decide_batch`, so the same facts give the same
plan in all three (tests/test_decision_pipeline.py).

The rules, one of each:

* A request's evidence: every reported outcome is one step of its history (`AcceptanceState.update`,
  `Evidence.record`, the controller's `HistoryTable.record`). A prefill chunk is a step at k = 0: it
  counts toward `steps_since_speculation` (goodput's probes) like any step that asked for nothing.
* The pooled prior: once per reported step, `prior = prior * decay + that step's evidence`, summed
  over every outcome of the report, prefill and finished rows included (`pool_step`); a step without
  evidence still decays it. This is the controller's rule (its store script applies exactly this in
  Redis, atomically, for every worker sharing a proposer kind) and the rule for all three, because:
  the worker re-plans with the controller's prior (the plan basis), so its local planner must mean
  the same thing by "prior" for `--controller none` to plan as a controller would, and the
  simulator models the controller; evidence reaches the pool as it is measured, so a request joining
  now sees what the running requests have shown so far, not only requests that already finished (a
  long request would be invisible for its whole life); and memory is counted in steps
  (~1/(1 - decay)), the same whatever the requests' lengths. (The worker's book used to fold a
  request in only when it finished, all its counts at once, decaying once per finished request.)
* The step a plan is for: `step_index` is the index of the step that will run it (the controller
  plans step r + 1 from report r), as RequestState and BatchState describe the NEXT step.
* The fill to plan with: where the proposer looked ahead (`proposable`), 1 if it can offer anything
  next step and 0 if not (`next_step_fill`); else the blended average. No k exceeds what is offered
  (`cap_to_proposable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from smartspec.core.acceptance import (
    DEFAULT_PRIOR_DECAY,
    DEFAULT_PRIOR_FILL,
    DEFAULT_PRIOR_RATE,
    DEFAULT_PRIOR_STRENGTH,
    AcceptanceState,
    PooledPrior,
    cap_to_proposable,
    check_outcome,
    requested_or_proposed,
)
from smartspec.core.cost_model import CostModel
from smartspec.core.policies.base import BatchColumns, BatchState, Policy, RequestState
from smartspec.core.policies.guard import guarded_decide

UNKNOWN_PROPOSABLE = -1  # in a `proposable` column: the proposer cannot look ahead for this request
# Tested positions a proposal class's pool needs before its rate stands in for the proposer kind's
# prior (two full steps at the largest k): fewer would swap one guess for a noisier one.
MIN_CLASS_EVIDENCE = 16.0


@dataclass(frozen=True)
class Estimator:
    """How estimates blend a request's own evidence with the pooled prior, and how the prior decays."""

    # Weight of the pooled prior in tested positions: a new request's estimate moves halfway to its
    # own rate after this many tested positions.
    prior_strength: float = DEFAULT_PRIOR_STRENGTH
    # Per-step decay of the pooled prior's counts: ~1/(1 - decay) steps of memory.
    prior_decay: float = DEFAULT_PRIOR_DECAY
    # Acceptance assumed before any request of a proposer kind was ever verified.
    cold_rate: float = DEFAULT_PRIOR_RATE
    # Fill rate (proposals offered per proposal asked for) assumed before any was asked for.
    cold_fill: float = DEFAULT_PRIOR_FILL


# ---- evidence ---------------------------------------------------------------------------------

_INT = np.int64


@dataclass
class Evidence:
    """`AcceptanceState`'s counters that planning reads, one array per counter ([N], row order)."""

    accepted: np.ndarray                  # int64: accepted proposals so far
    tested: np.ndarray                    # int64: tested positions so far
    proposed: np.ndarray                  # int64: proposals offered so far
    requested: np.ndarray                 # int64: proposals asked for so far
    last_k: np.ndarray                    # int64: proposals asked for in the last step
    last_fully_accepted: np.ndarray       # bool
    steps_since_speculation: np.ndarray   # int64: consecutive steps that asked for none

    @classmethod
    def zeros(cls, n: int) -> "Evidence":
        """n empty histories (a request never reported)."""
        return cls(*(np.zeros(n, _INT) for _ in range(5)), np.zeros(n, bool), np.zeros(n, _INT))

    @classmethod
    def from_states(cls, states: Sequence[AcceptanceState]) -> "Evidence":
        if not states:
            return cls.zeros(0)
        table = np.array([(s.accepted, s.tested, s.proposed, s.requested, s.last_k, s.last_fully_accepted,
                           s.steps_since_speculation) for s in states], dtype=_INT)  # [B, 7]
        accepted, tested, proposed, requested, last_k, full, since = table.T
        return cls(accepted, tested, proposed, requested, last_k, full.astype(bool), since)

    def take(self, rows: np.ndarray) -> "Evidence":
        """The histories of `rows` (copies)."""
        return Evidence(self.accepted[rows], self.tested[rows], self.proposed[rows], self.requested[rows],
                        self.last_k[rows], self.last_fully_accepted[rows], self.steps_since_speculation[rows])

    def record(self, rows: np.ndarray, proposed: np.ndarray, accepted: np.ndarray, tested: np.ndarray,
               requested: np.ndarray) -> None:
        """`AcceptanceState.update` for every row at once (one outcome per row, already checked)."""
        self.accepted[rows] += accepted
        self.tested[rows] += tested
        self.proposed[rows] += proposed
        self.requested[rows] += requested
        self.last_k[rows] = requested
        self.last_fully_accepted[rows] = (proposed > 0) & (accepted == proposed)
        # A step asked for proposals counts as speculating even if the proposer ran dry.
        self.steps_since_speculation[rows] = np.where(requested > 0, 0, self.steps_since_speculation[rows] + 1)


def pool_step(prior: PooledPrior, accepted: float, tested: float, proposed: float, requested: float,
              decay: float) -> PooledPrior:
    """The pooled prior after one reported step whose outcomes sum to these counts (the one rule:
    decay once per step, then add the step's evidence; see the module docstring)."""
    return prior.update(accepted, tested, decay, proposed, requested)


# ---- estimates --------------------------------------------------------------------------------

def blend(own_hits: np.ndarray, own_trials: np.ndarray, pooled_rate: float, strength: float) -> np.ndarray:
    """`acceptance.estimate` for many requests at once (the same arithmetic, element by element)."""
    weight = own_trials + strength
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(weight <= 0, pooled_rate, (own_hits + pooled_rate * strength) / weight)


def planning_fill(fill_estimate: np.ndarray, proposable: np.ndarray) -> np.ndarray:
    """`acceptance.next_step_fill` for many: 1 or 0 where the look-ahead is known, else the estimate."""
    return np.where(proposable == UNKNOWN_PROPOSABLE, fill_estimate, (proposable > 0).astype(np.float64))


def cap_columns(ks: np.ndarray, proposable: np.ndarray) -> np.ndarray:
    """`acceptance.cap_to_proposable` for many: no k above what the proposer can offer next step."""
    return np.where(proposable == UNKNOWN_PROPOSABLE, ks, np.minimum(ks, proposable))


def estimate_columns(request_ids: Sequence[str], evidence: Evidence, context: np.ndarray, proposable: np.ndarray,
                     prior: PooledPrior, estimator: Estimator,
                     prior_rates: np.ndarray | None = None) -> BatchColumns:
    """The batch as a policy sees it: own evidence shrunk toward `prior`, fill from the look-ahead.
    `prior_rates` ([N] float64), where given, replaces the pooled acceptance rate row by row (the
    rate of each row's next proposal class, `AcceptanceBook.prior_rates`)."""
    strength = estimator.prior_strength
    fill = blend(evidence.proposed, evidence.requested, prior.fill(estimator.cold_fill), strength)
    pooled = prior.rate(estimator.cold_rate) if prior_rates is None else prior_rates
    return BatchColumns(
        request_ids=request_ids,
        acceptance=blend(evidence.accepted, evidence.tested, pooled, strength),
        context_tokens=context,
        prefill_tokens=np.zeros(len(request_ids), dtype=_INT),
        last_k=evidence.last_k,
        last_fully_accepted=evidence.last_fully_accepted,
        steps_since_speculation=evidence.steps_since_speculation,
        evidence=evidence.tested.astype(np.float64),
        fill=planning_fill(fill, proposable),
    )


# ---- the decision -----------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchDecision:
    """k per request (int64 [B], batch order) and the columns the policy decided on."""

    columns: BatchColumns
    ks: np.ndarray


def decide_batch(policy: Policy, params: Mapping[str, Any], cost: CostModel, *, request_ids: Sequence[str],
               evidence: Evidence, context: np.ndarray, proposable: np.ndarray, prior: PooledPrior,
               estimator: Estimator, max_k: int, queued_requests: int, step_index: int,
               prior_rates: np.ndarray | None = None) -> BatchDecision:
    """The plan for the step `step_index` of these requests. `proposable` is UNKNOWN_PROPOSABLE where
    the proposer cannot look ahead; `prior_rates` as in `estimate_columns`. Never raises for a
    policy's fault (guarded_decide: k = 0); an empty batch asks no policy."""
    columns = estimate_columns(request_ids, evidence, context, proposable, prior, estimator, prior_rates)
    if not len(columns):
        return BatchDecision(columns, np.zeros(0, dtype=_INT))
    batch = BatchState.from_columns(columns, max_k=max_k, queued_requests=queued_requests, step_index=step_index,
                                    pooled_evidence=prior.tested)
    ks = guarded_decide(policy, batch, cost, params, prior_acceptance=prior.rate(estimator.cold_rate))
    return BatchDecision(columns, cap_columns(np.array(ks, dtype=_INT), proposable))


# ---- a worker's book: the same rules on per-request objects -----------------------------------

class Outcome(Protocol):
    """One request in one reported step (the worker's RequestFacts, mirroring smartspec.v1.RequestOutcome)."""

    request_id: str
    proposed_tokens: int
    accepted_tokens: int
    tested_positions: int
    requested_tokens: int          # 0 alongside proposals: not reported (requested_or_proposed)
    finished: bool
    proposable_tokens: int | None  # None: the proposer cannot look ahead
    proposal_class: int | None     # class of that next proposal (Proposer.proposal_class); None: unclassified


class Step(Protocol):
    requests: Sequence[Outcome]


class Query(Protocol):
    """A request that decodes in the step to plan (the worker's SpeculationQuery)."""

    request_id: str
    context_tokens: int


_NO_HISTORY = AcceptanceState()


@dataclass
class AcceptanceBook:
    """Per-request evidence of the unfinished requests and the pooled prior, kept by the module's rules
    from each reported step (what the controller keeps in Redis, held by a worker for itself).

    Proposal classes (a worker's own refinement of the prior; the controller does not see them): a
    proposer that can tell how good its next proposal looks (prompt lookup: how long the match it
    copies from is) reports a class with the look-ahead. The book pools acceptance per class by the
    same rule as the prior and, once a class has MIN_CLASS_EVIDENCE tested positions, starts a row
    whose next proposal is in that class from the class's rate instead of the kind's. Why: the kind's
    pool is the average of whatever ran lately; after a burst of code edits copying 16-token spans
    (~0.98 first-token acceptance) it says 0.85+, and a chat request whose 2-token match is right
    about half the time would be planned as if it were a code edit until its own failures outweigh
    the prior (tests/test_decision_pipeline.py; BENCHMARKS.md section 7).
    """

    estimator: Estimator = field(default_factory=Estimator)
    prior: PooledPrior = field(default_factory=PooledPrior)
    requests: dict[str, AcceptanceState] = field(default_factory=dict)
    proposable: dict[str, int | None] = field(default_factory=dict)  # what each can be offered next step
    proposal_class: dict[str, int] = field(default_factory=dict)  # class of each one's next proposal
    class_priors: dict[int, PooledPrior] = field(default_factory=dict)  # pooled evidence per proposal class

    def observe(self, step: Step) -> None:
        """Record one step's outcomes. Raises OutcomeError (recording nothing) if one is impossible."""
        outcomes = [(o, requested_or_proposed(o.requested_tokens, o.proposed_tokens)) for o in step.requests]
        for o, requested in outcomes:
            check_outcome(o.proposed_tokens, o.accepted_tokens, o.tested_positions, requested)
        sums = [0, 0, 0, 0]
        class_sums: dict[int, list[int]] = {}
        for o, requested in outcomes:
            state = self.requests.get(o.request_id, _NO_HISTORY)
            state = state.update(o.proposed_tokens, o.accepted_tokens, o.tested_positions, requested)
            counts = (o.accepted_tokens, o.tested_positions, o.proposed_tokens, requested)
            sums = [total + count for total, count in zip(sums, counts)]
            verified_class = self.proposal_class.pop(o.request_id, None)  # reported with the last look-ahead
            if verified_class is not None and o.proposed_tokens > 0:
                class_sums[verified_class] = [total + count for total, count in
                                              zip(class_sums.get(verified_class, [0, 0, 0, 0]), counts)]
            if o.finished:
                self.requests.pop(o.request_id, None)
                self.proposable.pop(o.request_id, None)
            else:
                self.requests[o.request_id] = state
                self.proposable[o.request_id] = o.proposable_tokens
                if o.proposal_class is not None:
                    self.proposal_class[o.request_id] = o.proposal_class
        decay = self.estimator.prior_decay
        self.prior = pool_step(self.prior, *sums, decay=decay)
        for cls in set(self.class_priors) | set(class_sums):
            self.class_priors[cls] = pool_step(self.class_priors.get(cls, PooledPrior()),
                                               *class_sums.get(cls, (0, 0, 0, 0)), decay=decay)

    def prior_rates(self, queries: Sequence[Query], prior: PooledPrior, estimator: Estimator) -> np.ndarray:
        """[N] float64: the acceptance rate each query's estimate starts from: its next proposal's
        class rate where that class has MIN_CLASS_EVIDENCE; for a graded proposal whose class has
        less, the kind's pooled rate but no lower than the cold guess; ungraded, the kind's rate.

        Why the floor: the first tokens of an answer rarely copy anything, so a fresh worker's
        first probes fail in the short-match classes and pull the kind's rate down (0.33 in a
        burst of summaries); planned from that, a 16-token match would not be tried until its
        class had evidence, which only speculating on it can give."""
        kind_rate = prior.rate(estimator.cold_rate)
        rates = np.full(len(queries), kind_rate, dtype=np.float64)
        for row, query in enumerate(queries):
            cls = self.proposal_class.get(query.request_id)
            if cls is None:
                continue
            pool = self.class_priors.get(cls)
            if pool is not None and pool.tested >= MIN_CLASS_EVIDENCE:
                rates[row] = pool.rate(kind_rate)
            else:
                rates[row] = max(kind_rate, estimator.cold_rate)
        return rates

    def evidence(self, queries: Sequence[Query]) -> Evidence:
        return Evidence.from_states([self.requests.get(q.request_id, _NO_HISTORY) for q in queries])

    def proposable_column(self, queries: Sequence[Query]) -> np.ndarray:
        values = [self.proposable.get(q.request_id) for q in queries]
        return np.array([UNKNOWN_PROPOSABLE if p is None else p for p in values], dtype=_INT)

    def plan(self, policy: Policy, params: Mapping[str, Any], cost: CostModel, queries: Sequence[Query], *,
             max_k: int, queued_requests: int, step_index: int, prior: PooledPrior | None = None,
             estimator: Estimator | None = None) -> dict[str, int]:
        """k per query by `decide_batch`, with `prior` and `estimator` defaulting to the book's own."""
        ids = [q.request_id for q in queries]
        prior = self.prior if prior is None else prior
        estimator = estimator or self.estimator
        plan = decide_batch(
            policy, params, cost, request_ids=ids, evidence=self.evidence(queries),
            context=np.array([q.context_tokens for q in queries], dtype=_INT),
            proposable=self.proposable_column(queries), prior=prior, estimator=estimator, max_k=max_k,
            queued_requests=queued_requests, step_index=step_index,
            prior_rates=self.prior_rates(queries, prior, estimator),
        )
        return dict(zip(ids, plan.ks.tolist()))

    def batch_state(self, queries: Sequence[Query], *, max_k: int, queued_requests: int = 0, step_index: int = 0,
                    prior: PooledPrior | None = None, estimator: Estimator | None = None) -> BatchState:
        """The batch a policy would be shown for these queries (for inspection; `plan` decides)."""
        prior = self.prior if prior is None else prior
        estimator = estimator or self.estimator
        columns = estimate_columns([q.request_id for q in queries], self.evidence(queries),
                                   np.array([q.context_tokens for q in queries], dtype=_INT),
                                   self.proposable_column(queries), prior, estimator,
                                   self.prior_rates(queries, prior, estimator))
        return BatchState.from_columns(columns, max_k=max_k, queued_requests=queued_requests,
                                       step_index=step_index, pooled_evidence=prior.tested)

    def request_state(self, query: Query, prior: PooledPrior | None = None,
                      estimator: Estimator | None = None) -> RequestState:
        """One request as a policy would see it in the next step."""
        return self.batch_state([query], max_k=0, prior=prior, estimator=estimator).requests[0]

    def cap(self, queries: Sequence[Query], ks: Sequence[int]) -> dict[str, int]:
        """k per request, never more than its proposer can offer next step."""
        capped = cap_to_proposable(ks, [self.proposable.get(q.request_id) for q in queries])
        return {q.request_id: k for q, k in zip(queries, capped)}

"""One step's bookkeeping and decision, as pure functions of (report, what Redis held).

No gRPC and no Redis here: `plan_step` takes the validated report and the `StepSnapshot` read for it
and returns the speculation lengths plus the `StepWrites` to store. The servicer does the I/O around
it, so the same code plans a stream step, a unary Decide and a degraded step (empty snapshot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from smartspec.controller.acceptance import (
    DEFAULT_PRIOR_DECAY,
    DEFAULT_PRIOR_FILL,
    DEFAULT_PRIOR_RATE,
    DEFAULT_PRIOR_STRENGTH,
    AcceptanceState,
    PooledPrior,
    cap_to_proposable,
    next_step_fill,
    requested_or_proposed,
)
from smartspec.controller.cost_model import CostModel, OnlineCostFit
from smartspec.controller.policies import guarded_decide
from smartspec.controller.policies.base import BatchState, Policy, RequestState
from smartspec.controller.policies.optimizer import predict_plan
from smartspec.controller.store import StepSnapshot, StepWrites, WorkerFigures
from smartspec.v1 import controller_pb2


@dataclass(frozen=True)
class PlannerSettings:
    """Knobs of the controller's estimates (not of a policy)."""

    # Weight of the pooled prior in tested positions: a new request's estimate moves halfway to its
    # own rate after this many tested positions.
    prior_strength: float = DEFAULT_PRIOR_STRENGTH
    # Per-step decay of the pooled prior's counts: ~1/(1 - decay) steps of memory.
    prior_decay: float = DEFAULT_PRIOR_DECAY
    # Acceptance assumed before any request of a proposer kind was ever verified.
    cold_rate: float = DEFAULT_PRIOR_RATE
    # Fill rate (proposals offered per proposal asked for) assumed before any was asked for.
    cold_fill: float = DEFAULT_PRIOR_FILL
    # Weight of the newest step in the worker's goodput average.
    goodput_smoothing: float = 0.2


@dataclass(frozen=True)
class StepDecision:
    """The plan for the next step, the writes that record this one, and figures for metrics."""

    request_ids: tuple[str, ...]                  # unfinished requests, report order
    speculation_lengths: tuple[int, ...]          # k_i, same order
    acceptances: tuple[float, ...]                # a_i used to plan
    fills: tuple[float, ...]                      # f_i used to plan
    predicted_step_ms: float
    predicted_tokens: float
    measured_step_ms: float
    generated_tokens: int
    writes: StepWrites
    cost: CostModel                               # the model the plan used (sent in the plan's basis)
    prior: PooledPrior                            # the pooled prior, this report's evidence included


def attended_context(outcome: controller_pb2.RequestOutcome) -> int:
    """Context the reported step attended over: the context after it, less what the step added."""
    return max(0, outcome.context_tokens - outcome.accepted_tokens - 1 - outcome.prefill_tokens)


def smoothed(previous: float | None, value: float | None, weight: float) -> float | None:
    if value is None:
        return previous
    if previous is None:
        return value
    return (1.0 - weight) * previous + weight * value


def plan_step(
    hello: controller_pb2.WorkerHello,
    report: controller_pb2.StepReport,
    snapshot: StepSnapshot,
    *,
    cost_fit: OnlineCostFit,
    policy: Policy,
    params: Mapping[str, Any],
    settings: PlannerSettings,
    cost_override: CostModel | None = None,
    proposer_kind: str,
    cost_profile_id: str,
) -> StepDecision:
    """Record the reported step and choose k for every unfinished request of the next one.

    `cost_fit` is updated in place with the step's measured times (the caller built it from the
    snapshot or from the seed); the decision uses `cost_override` when given, else the fit.
    """
    outcomes: Sequence[controller_pb2.RequestOutcome] = report.requests

    # Acceptance and fill evidence: per request, and pooled for the prior.
    histories = {
        o.request_id: snapshot.histories.get(o.request_id, AcceptanceState()).update(
            o.proposed_tokens, o.accepted_tokens, o.tested_positions,
            requested_or_proposed(o.requested_tokens, o.proposed_tokens))
        for o in outcomes
    }
    step_accepted = float(sum(o.accepted_tokens for o in outcomes))
    step_tested = float(sum(o.tested_positions for o in outcomes))
    step_proposed = float(sum(o.proposed_tokens for o in outcomes))
    step_requested = float(sum(requested_or_proposed(o.requested_tokens, o.proposed_tokens) for o in outcomes))
    # The same decay-and-add the store's script applies in Redis, so new requests in this very
    # step already see this step's evidence.
    prior = (snapshot.prior or PooledPrior()).update(step_accepted, step_tested, settings.prior_decay,
                                                     step_proposed, step_requested)

    # Cost model: learn from the measured step (if it ran anything), then plan with it.
    measured_ms = report.total_ms if report.total_ms > 0 else report.draft_ms + report.verify_ms
    if outcomes and report.draft_ms + report.verify_ms > 0:
        cost_fit.observe(
            [o.proposed_tokens for o in outcomes],
            [attended_context(o) for o in outcomes],
            [o.prefill_tokens for o in outcomes],
            report.draft_ms,
            report.verify_ms,
            report.total_ms if report.total_ms > 0 else None,
        )
    cost = cost_override if cost_override is not None else cost_fit.model()

    # The next step: every unfinished request, in report order.
    pending = [o for o in outcomes if not o.finished]
    proposable = [o.proposable_tokens if o.HasField("proposable_tokens") else None for o in pending]
    states = []
    for o, offer in zip(pending, proposable):
        h = histories[o.request_id]
        states.append(RequestState(
            request_id=o.request_id,
            acceptance=h.estimate(prior, settings.prior_strength, settings.cold_rate),
            fill=next_step_fill(h.fill_estimate(prior, settings.prior_strength, settings.cold_fill), offer),
            context_tokens=o.context_tokens,
            prefill_tokens=0,
            last_k=h.last_k,
            last_fully_accepted=h.last_fully_accepted,
            steps_since_speculation=h.steps_since_speculation,
            evidence=float(h.tested),
        ))
    batch = BatchState(
        requests=tuple(states),
        max_k=hello.max_speculation_length,
        queued_requests=report.queued_requests,
        step_index=report.step_index,
        pooled_evidence=prior.tested,
    )
    ks: list[int] = []
    if states:
        ks = cap_to_proposable(
            guarded_decide(policy, batch, cost, params, prior_acceptance=prior.rate(settings.cold_rate)), proposable)

    predicted_tokens, predicted_ms = 0.0, 0.0
    if states:
        predicted_tokens, predicted_ms = predict_plan(
            [s.acceptance for s in states], [s.context_tokens for s in states], [0] * len(states), cost, ks,
            fill=[s.fill for s in states],
        )

    # Figures the status page and the next step's metrics read back.
    generated = sum(o.accepted_tokens + 1 for o in outcomes)
    goodput = generated * 1000.0 / measured_ms if measured_ms > 0 and outcomes else None
    figures = WorkerFigures(
        predicted_step_ms=predicted_ms,
        predicted_tokens=predicted_tokens,
        goodput_tok_s=smoothed(snapshot.worker.goodput_tok_s, goodput, settings.goodput_smoothing),
    )
    totals = {
        "steps": 1,
        "proposed": sum(o.proposed_tokens for o in outcomes),
        "accepted": int(step_accepted),
        "tested": int(step_tested),
        "generated": generated,
        "planned_k": sum(ks),
        "planned_requests": len(ks),
    }
    writes = StepWrites(
        worker_id=hello.worker_id,
        cost_profile_id=cost_profile_id,
        proposer_kind=proposer_kind,
        histories={o.request_id: histories[o.request_id] for o in pending},
        finished=tuple(o.request_id for o in outcomes if o.finished),
        cost_fit=cost_fit.to_dict(),
        prior_accepted=step_accepted,
        prior_tested=step_tested,
        prior_proposed=step_proposed,
        prior_requested=step_requested,
        prior_decay=settings.prior_decay,
        totals=totals,
        figures=figures,
    )
    if not math.isfinite(predicted_ms):
        predicted_ms = 0.0
    return StepDecision(
        request_ids=tuple(s.request_id for s in states),
        speculation_lengths=tuple(ks),
        acceptances=tuple(s.acceptance for s in states),
        fills=tuple(s.fill for s in states),
        predicted_step_ms=predicted_ms,
        predicted_tokens=predicted_tokens,
        measured_step_ms=measured_ms,
        generated_tokens=generated,
        writes=writes,
        cost=cost,
        prior=prior,
    )

"""One step's bookkeeping and decision, as pure functions of (report, what Redis held).

No gRPC and no Redis here: `plan_step` takes the validated report and the `StepSnapshot` read for it
and returns the speculation lengths plus the `StepWrites` to store. The servicer does the I/O around
it, so the same code plans a stream step, a unary Decide and a degraded step (empty snapshot).
The report is read once into columns and every per-request quantity is a numpy array [B]: at batch
256 a step is a few dozen vector operations, not a few thousand Python objects. The history table
and the cost fit are updated in place (a stream keeps both between its steps).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from smartspec.core.acceptance import (
    DEFAULT_PRIOR_DECAY,
    DEFAULT_PRIOR_FILL,
    DEFAULT_PRIOR_RATE,
    DEFAULT_PRIOR_STRENGTH,
    PooledPrior,
)
from smartspec.core.cost_fit import OnlineCostFit
from smartspec.core.cost_model import CostModel
from smartspec.controller.history_table import (
    ACCEPTED, LAST_FULL, LAST_K, PROPOSED, REQUESTED, SINCE_SPEC, TESTED, HistoryTable,
)
from smartspec.core.policies import guarded_decide
from smartspec.core.policies.base import BatchColumns, BatchState, Policy
from smartspec.core.policies.optimizer import predict_plan
from smartspec.controller.report_columns import UNKNOWN, ReportColumns
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


def blended(own_hits: np.ndarray, own_trials: np.ndarray, pooled_rate: float, strength: float) -> np.ndarray:
    """`acceptance.estimate` for many requests at once (the same arithmetic, element by element)."""
    weight = own_trials + strength
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(weight <= 0, pooled_rate, (own_hits + pooled_rate * strength) / weight)


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
    columns: ReportColumns | None = None,
    now_s: int | None = None,
) -> StepDecision:
    """Record the reported step and choose k for every unfinished request of the next one.

    `cost_fit` is updated in place with the step's measured times (the caller built it from the
    snapshot or from the seed); the decision uses `cost_override` when given, else the fit. So is the
    snapshot's history table when it is a `HistoryTable` (a stream keeps its table between steps);
    any other mapping is copied into a new one. `columns`: the report already read (else read here);
    `now_s`: the clock for the rows' last-seen time.
    """
    cols = columns if columns is not None else ReportColumns.from_report(report)
    histories = HistoryTable.from_states(snapshot.histories if snapshot.histories is not None else {})

    # Acceptance and fill evidence: per request, and pooled for the prior.
    rows = histories.rows_for(cols.request_ids)
    requested = cols.requested
    histories.record(rows, cols.proposed, cols.accepted, cols.tested, requested,
                     int(time.time()) if now_s is None else now_s)
    step_accepted = float(cols.accepted.sum())
    step_tested = float(cols.tested.sum())
    step_proposed = float(cols.proposed.sum())
    step_requested = float(requested.sum())
    # The same decay-and-add the store's script applies in Redis, so new requests in this very
    # step already see this step's evidence.
    prior = (snapshot.prior or PooledPrior()).update(step_accepted, step_tested, settings.prior_decay,
                                                     step_proposed, step_requested)

    # Cost model: learn from the measured step (if it ran anything), then plan with it.
    measured_ms = report.total_ms if report.total_ms > 0 else report.draft_ms + report.verify_ms
    if len(cols) and report.draft_ms + report.verify_ms > 0:
        cost_fit.observe(
            cols.proposed,
            cols.attended_context,
            cols.prefill,
            report.draft_ms,
            report.verify_ms,
            report.total_ms if report.total_ms > 0 else None,
        )
    cost = cost_override if cost_override is not None else cost_fit.model()

    # The next step: every unfinished request, in report order.
    pending = np.flatnonzero(~cols.finished)
    pending_ids = [cols.request_ids[i] for i in pending.tolist()]
    pending_rows = rows[pending]
    proposable = cols.proposable[pending]  # UNKNOWN where the proposer cannot look ahead
    tested = histories.column(TESTED, pending_rows)
    fill_estimate = blended(histories.column(PROPOSED, pending_rows), histories.column(REQUESTED, pending_rows),
                            prior.fill(settings.cold_fill), settings.prior_strength)
    columns_ = BatchColumns(
        request_ids=pending_ids,
        acceptance=blended(histories.column(ACCEPTED, pending_rows), tested, prior.rate(settings.cold_rate),
                           settings.prior_strength),
        context_tokens=cols.context[pending],
        prefill_tokens=np.zeros(len(pending_ids), dtype=np.int64),
        last_k=histories.column(LAST_K, pending_rows),
        last_fully_accepted=histories.column(LAST_FULL, pending_rows).astype(bool),
        steps_since_speculation=histories.column(SINCE_SPEC, pending_rows),
        evidence=tested.astype(np.float64),
        # next_step_fill: known from the look-ahead (1 or 0), else the request's average
        fill=np.where(proposable == UNKNOWN, fill_estimate, (proposable > 0).astype(np.float64)),
    )
    batch = BatchState.from_columns(
        columns_,
        max_k=hello.max_speculation_length,
        queued_requests=report.queued_requests,
        step_index=report.step_index,
        pooled_evidence=prior.tested,
    )
    ks = np.zeros(0, dtype=np.int64)
    predicted_tokens, predicted_ms = 0.0, 0.0
    if pending_ids:
        ks = np.array(guarded_decide(policy, batch, cost, params, prior_acceptance=prior.rate(settings.cold_rate)),
                      dtype=np.int64)
        ks = np.where(proposable == UNKNOWN, ks, np.minimum(ks, proposable))  # cap_to_proposable
        predicted_tokens, predicted_ms = predict_plan(
            columns_.acceptance, columns_.context_tokens, columns_.prefill_tokens, cost, ks, fill=columns_.fill,
        )

    # Figures the status page and the next step's metrics read back.
    generated = int(cols.accepted.sum()) + len(cols)
    goodput = generated * 1000.0 / measured_ms if measured_ms > 0 and len(cols) else None
    figures = WorkerFigures(
        predicted_step_ms=predicted_ms,
        predicted_tokens=predicted_tokens,
        goodput_tok_s=smoothed(snapshot.worker.goodput_tok_s, goodput, settings.goodput_smoothing),
    )
    speculation_lengths = tuple(ks.tolist())
    totals = {
        "steps": 1,
        "proposed": int(step_proposed),
        "accepted": int(step_accepted),
        "tested": int(step_tested),
        "generated": generated,
        "planned_k": sum(speculation_lengths),
        "planned_requests": len(speculation_lengths),
    }
    finished = tuple(cols.request_ids[i] for i in np.flatnonzero(cols.finished).tolist())
    histories.remove(finished)
    writes = StepWrites(
        worker_id=hello.worker_id,
        cost_profile_id=cost_profile_id,
        proposer_kind=proposer_kind,
        histories=histories,
        finished=finished,
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
        request_ids=tuple(pending_ids),
        speculation_lengths=speculation_lengths,
        acceptances=tuple(columns_.acceptance.tolist()),
        fills=tuple(columns_.fill.tolist()),
        predicted_step_ms=predicted_ms,
        predicted_tokens=predicted_tokens,
        measured_step_ms=measured_ms,
        generated_tokens=generated,
        writes=writes,
        cost=cost,
        prior=prior,
    )

"""One step's bookkeeping and decision, as pure functions of (report, what Redis held).

No gRPC and no Redis here: `plan_step` takes the validated report and the `StepSnapshot` read for it
and returns the speculation lengths plus the `StepWrites` to store. The servicer does the I/O around
it, so the same code plans a stream step, a unary Decide and a degraded step (empty snapshot).
The report is read once into columns and every per-request quantity is a numpy array [B]: at batch
256 a step is a few dozen vector operations, not a few thousand Python objects. The history table
and the cost fit are updated in place (a stream keeps both between its steps). The decision itself
is the pipeline the worker and the simulator run too (`core/decision.py`): this module only records
the step, gathers each pending request's evidence from the history table and calls `decide_batch`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from smartspec.core import decision
from smartspec.core.acceptance import PooledPrior
from smartspec.core.cost_fit import OnlineCostFit
from smartspec.core.cost_model import CostModel
from smartspec.core.decision import BatchDecision, Estimator, Evidence
from smartspec.controller.history_table import (
    ACCEPTED, LAST_FULL, LAST_K, PROPOSED, REQUESTED, SINCE_SPEC, TESTED, HistoryTable,
)
from smartspec.core.policies.base import Policy
from smartspec.core.policies.optimizer import predict_step
from smartspec.controller.report_columns import ReportColumns
from smartspec.controller.store import StepSnapshot, StepWrites, WorkerFigures
from smartspec.v1 import controller_pb2


@dataclass(frozen=True)
class PlannerSettings(Estimator):
    """Knobs of the controller's estimates (not of a policy): the pipeline's `Estimator` (prior
    strength and decay, cold acceptance and fill), plus how the worker's goodput is smoothed."""

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
    member_priors: Mapping[int, PooledPrior] = field(default_factory=dict)  # by ProposerKind value, likewise


@dataclass(frozen=True)
class StepEvidence:
    """The reported step's counts summed over every outcome (what the pooled prior adds)."""

    accepted: float
    tested: float
    proposed: float
    requested: float

    @classmethod
    def of(cls, cols: ReportColumns, requested: np.ndarray, rows: np.ndarray | None = None) -> "StepEvidence":
        """Summed over every outcome, or over `rows` (a boolean mask [B])."""
        if rows is None:
            return cls(float(cols.accepted.sum()), float(cols.tested.sum()), float(cols.proposed.sum()),
                       float(requested.sum()))
        return cls(float(cols.accepted[rows].sum()), float(cols.tested[rows].sum()),
                   float(cols.proposed[rows].sum()), float(requested[rows].sum()))

    def counts(self) -> tuple[float, float, float, float]:
        return (self.accepted, self.tested, self.proposed, self.requested)


def member_evidence(cols: ReportColumns, requested: np.ndarray, kinds: Sequence[int]) -> list[StepEvidence]:
    """A choice worker's step evidence per member kind (ProposerKind values): the rows it proposed."""
    return [StepEvidence.of(cols, requested, cols.proposer_kind == kind) for kind in kinds]


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
    columns: ReportColumns | None = None,
    now_s: int | None = None,
    member_kinds: Sequence[str] = (),
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
    rows = histories.rows_for(cols.request_ids)
    requested = cols.requested
    histories.record(rows, cols.proposed, cols.accepted, cols.tested, requested,
                     int(time.time()) if now_s is None else now_s)
    step = StepEvidence.of(cols, requested)
    # The same decay-and-add the store's script applies in Redis, so new requests in this very
    # step already see this step's evidence.
    prior = decision.pool_step(snapshot.prior or PooledPrior(), step.accepted, step.tested, step.proposed,
                               step.requested, settings.prior_decay)
    # member_kinds: the prior keys of the hello's member kinds, in its order
    members = member_evidence(cols, requested, hello.member_kinds)
    member_priors = {
        kind: decision.pool_step(snapshot.member_priors.get(name) or PooledPrior(), *evidence.counts(),
                                 decay=settings.prior_decay)
        for name, kind, evidence in zip(member_kinds, hello.member_kinds, members)}
    measured_ms = learn_step_cost(report, cols, cost_fit)
    cost = cost_override if cost_override is not None else cost_fit.model()

    pending = np.flatnonzero(~cols.finished)  # the next step: every unfinished request, in report order
    pending_ids = [cols.request_ids[i] for i in pending.tolist()]
    plan = decision.decide_batch(
        policy, params, cost, request_ids=pending_ids, evidence=history_evidence(histories, rows[pending]),
        context=cols.context[pending], proposable=cols.proposable[pending], prior=prior, estimator=settings,
        max_k=hello.max_speculation_length, queued_requests=report.queued_requests,
        step_index=report.step_index + 1,  # the step this plan is for
    )
    predicted_tokens, predicted_ms = predicted(plan, cost)
    generated = int(cols.accepted.sum()) + len(cols)
    finished = tuple(cols.request_ids[i] for i in np.flatnonzero(cols.finished).tolist())
    histories.remove(finished)
    figures = worker_figures(snapshot, generated, measured_ms, predicted_ms, predicted_tokens, settings)
    writes = step_writes(hello, histories, finished, step, plan, generated, figures, cost_fit=cost_fit,
                         settings=settings, proposer_kind=proposer_kind, cost_profile_id=cost_profile_id,
                         member_evidence={name: e.counts() for name, e in zip(member_kinds, members)})
    return StepDecision(
        request_ids=tuple(pending_ids),
        speculation_lengths=tuple(plan.ks.tolist()),
        acceptances=tuple(plan.columns.acceptance.tolist()),
        fills=tuple(plan.columns.fill.tolist()),
        predicted_step_ms=predicted_ms if math.isfinite(predicted_ms) else 0.0,
        predicted_tokens=predicted_tokens,
        measured_step_ms=measured_ms,
        generated_tokens=generated,
        writes=writes,
        cost=cost,
        prior=prior,
        member_priors=member_priors,
    )


def predicted(plan: BatchDecision, cost: CostModel) -> tuple[float, float]:
    """(tokens, ms): what the planned step should yield and take; nothing for an empty plan."""
    if not len(plan.ks):
        return 0.0, 0.0
    c = plan.columns
    return predict_step(c.acceptance, c.context_tokens, c.prefill_tokens, cost, plan.ks, fill=c.fill)


def history_evidence(histories: HistoryTable, rows: np.ndarray) -> Evidence:
    """The evidence the decision reads, for these rows of the history table."""
    return Evidence(
        accepted=histories.column(ACCEPTED, rows),
        tested=histories.column(TESTED, rows),
        proposed=histories.column(PROPOSED, rows),
        requested=histories.column(REQUESTED, rows),
        last_k=histories.column(LAST_K, rows),
        last_fully_accepted=histories.column(LAST_FULL, rows).astype(bool),
        steps_since_speculation=histories.column(SINCE_SPEC, rows),
    )


def learn_step_cost(report: controller_pb2.StepReport, cols: ReportColumns, cost_fit: OnlineCostFit) -> float:
    """Fold the measured step into the cost fit (if it ran anything); returns its measured time."""
    if len(cols) and report.draft_ms + report.verify_ms > 0:
        cost_fit.observe(
            cols.proposed,
            cols.attended_context,
            cols.prefill,
            report.draft_ms,
            report.verify_ms,
            report.total_ms if report.total_ms > 0 else None,
        )
    return report.total_ms if report.total_ms > 0 else report.draft_ms + report.verify_ms


def worker_figures(snapshot: StepSnapshot, generated: int, measured_ms: float, predicted_ms: float,
                   predicted_tokens: float, settings: PlannerSettings) -> WorkerFigures:
    """Figures the status page and the next step's metrics read back."""
    goodput = generated * 1000.0 / measured_ms if measured_ms > 0 and generated else None
    return WorkerFigures(
        predicted_step_ms=predicted_ms,
        predicted_tokens=predicted_tokens,
        goodput_tok_s=smoothed(snapshot.worker.goodput_tok_s, goodput, settings.goodput_smoothing),
    )


def step_writes(hello: controller_pb2.WorkerHello, histories: HistoryTable, finished: tuple[str, ...],
                step: StepEvidence, plan: BatchDecision, generated: int, figures: WorkerFigures, *,
                cost_fit: OnlineCostFit, settings: PlannerSettings, proposer_kind: str,
                cost_profile_id: str,
                member_evidence: Mapping[str, tuple[float, float, float, float]] | None = None) -> StepWrites:
    """What the store records for this step: histories, cost fit, the prior's evidence, totals, figures."""
    totals = {
        "steps": 1,
        "proposed": int(step.proposed),
        "accepted": int(step.accepted),
        "tested": int(step.tested),
        "generated": generated,
        "planned_k": int(plan.ks.sum()),
        "planned_requests": len(plan.ks),
    }
    return StepWrites(
        worker_id=hello.worker_id,
        cost_profile_id=cost_profile_id,
        proposer_kind=proposer_kind,
        histories=histories,
        finished=finished,
        cost_fit=cost_fit,   # serialised by the store if this step's write stores it
        prior_accepted=step.accepted,
        prior_tested=step.tested,
        prior_proposed=step.proposed,
        prior_requested=step.requested,
        prior_decay=settings.prior_decay,
        totals=totals,
        figures=figures,
        member_evidence=member_evidence or {},
    )

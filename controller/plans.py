"""The StepPlan messages the controller answers with: a planned step's, and a refused report's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from smartspec.controller.codec import plan_basis_proto
from smartspec.v1 import common_pb2, controller_pb2

if TYPE_CHECKING:  # annotations only
    from smartspec.controller.planner import PlannerSettings, StepDecision
    from smartspec.controller.store_policy import PolicyRecord
    from smartspec.controller.validation import InvalidInput


def error_plan(step_index: int, error: InvalidInput, decision_ms: float = 0.0) -> controller_pb2.StepPlan:
    """A report that cannot be planned: the error names the field and the gRPC status it maps to."""
    return controller_pb2.StepPlan(
        step_index=step_index,
        error=controller_pb2.PlanError(grpc_status_code=error.code.value[0], field=error.field,
                                       message=error.message),
        decision_ms=decision_ms,
    )


def step_plan(step_index: int, decision: StepDecision, *, record: PolicyRecord, policy_spec: common_pb2.PolicySpec,
              settings: PlannerSettings, max_k: int, degraded: bool) -> controller_pb2.StepPlan:
    """Every request's k, what the plan predicts, and the basis a worker re-solves it from
    (decision_ms is the caller's to set, once the plan is built)."""
    basis = plan_basis_proto(
        policy_spec, record.version, decision.cost, decision.prior, settings, max_k=max_k,
        goodput_per_ms=(decision.predicted_tokens / decision.predicted_step_ms
                        if decision.predicted_step_ms > 0 else 0.0),
        member_priors=decision.member_priors,
    )
    plan = controller_pb2.StepPlan(
        step_index=step_index,
        policy_name=record.name,
        policy_version=record.version,
        predicted_step_ms=decision.predicted_step_ms,
        predicted_tokens=decision.predicted_tokens,
        degraded=degraded,
        basis=basis,
    )
    add = plan.requests.add
    for request_id, k in zip(decision.request_ids, decision.speculation_lengths):
        add(request_id=request_id, speculation_length=k)
    return plan

"""Wire messages the controller tests build by hand (one definition for every test file)."""

from smartspec.core.acceptance import positions_tested
from smartspec.v1 import controller_pb2


def outcome(request_id, proposed=0, accepted=0, tested=None, context=100, finished=False, requested=0,
            proposable=None):
    """A RequestOutcome; `tested` defaults to what a verification of `proposed` with `accepted` tests;
    `proposable` None leaves proposable_tokens unset (a proposer that cannot look ahead)."""
    if tested is None:
        tested = positions_tested(proposed, accepted)
    return controller_pb2.RequestOutcome(request_id=request_id, proposed_tokens=proposed, accepted_tokens=accepted,
                                         tested_positions=tested, context_tokens=context, finished=finished,
                                         requested_tokens=requested, proposable_tokens=proposable)


def workload(steps: int = 8) -> list[controller_pb2.StepReport]:
    """Three requests with different acceptance ("good" accepts all, "poor" none), a third joining at
    step 3 and finishing at the last step."""
    reports = []
    for step in range(steps):
        outcomes = [outcome("good", 4 if step else 0, 4 if step else 0, context=50 + 5 * step),
                    outcome("poor", 2 if step else 0, 0, context=80 + step)]
        if step >= 3:
            outcomes.append(outcome("late", 1 if step > 3 else 0, 1 if step > 3 else 0, context=30 + 2 * step,
                                    finished=step == steps - 1))
        reports.append(controller_pb2.StepReport(step_index=step, requests=outcomes, draft_ms=1.0,
                                                 verify_ms=90.0 + 10.0 * step, total_ms=95.0 + 10.0 * step))
    return reports


def comparable(plan: controller_pb2.StepPlan) -> controller_pb2.StepPlan:
    """Everything but the time the replica spent deciding."""
    copy = controller_pb2.StepPlan()
    copy.CopyFrom(plan)
    copy.ClearField("decision_ms")
    return copy

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

"""A step report's outcomes as columns, read out of the protobuf in one pass.

Reading fields of repeated protobuf messages from Python costs ~0.1 us per field: at batch 256 the
nine fields a step needs are the largest single cost of planning it once everything else is
vectorised. So a report is read exactly once, here (one attrgetter per outcome, then numpy), and
validation, bookkeeping and planning all work on these arrays.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from smartspec.core.cost_fit import attended_context
from smartspec.v1 import controller_pb2

_OUTCOME = operator.attrgetter(
    "request_id", "proposed_tokens", "accepted_tokens", "tested_positions", "requested_tokens",
    "context_tokens", "prefill_tokens", "finished", "proposable_tokens", "proposer_kind",
)
UNKNOWN = -1  # proposable: the proposer cannot look ahead (field unset)


@dataclass(frozen=True)
class ReportColumns:
    """One entry per outcome, report order; all arrays [B] int64 except `finished` (bool)."""

    request_ids: list[str]
    proposed: np.ndarray
    accepted: np.ndarray
    tested: np.ndarray
    requested_wire: np.ndarray      # requested_tokens as sent (0 with proposals = not reported)
    context: np.ndarray
    prefill: np.ndarray
    finished: np.ndarray
    proposable: np.ndarray          # proposable_tokens, UNKNOWN where unset
    proposer_kind: np.ndarray       # the member kind that proposed (a choice worker), 0 = unnamed

    @classmethod
    def from_report(cls, report: controller_pb2.StepReport) -> "ReportColumns":
        outcomes = list(report.requests)
        if not outcomes:
            empty = np.zeros(0, dtype=np.int64)
            return cls([], empty, empty, empty, empty, empty, empty, np.zeros(0, dtype=bool), empty, empty)
        ids, *values = zip(*map(_OUTCOME, outcomes))
        (proposed, accepted, tested, requested, context, prefill, finished,
         proposable, proposer_kind) = np.array(values, dtype=np.int64)
        unset = np.flatnonzero(proposable == 0)  # 0 is either "nothing to offer" or "not known"
        if unset.size:
            unknown = [i for i in unset.tolist() if not outcomes[i].HasField("proposable_tokens")]
            proposable[unknown] = UNKNOWN
        return cls(list(ids), proposed, accepted, tested, requested, context, prefill, finished.astype(bool),
                   proposable, proposer_kind)

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def requested(self) -> np.ndarray:
        """Proposals asked for: the wire's requested_tokens, or proposed where it was not reported."""
        return np.where(self.requested_wire > 0, self.requested_wire, self.proposed)

    @property
    def attended_context(self) -> np.ndarray:
        """Context each row's step attended over: the context after it, less what the step added."""
        return attended_context(self.context, self.accepted, self.prefill)

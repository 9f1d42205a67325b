"""Checks on what workers send, before anything is read or written.

Each check raises `InvalidInput` naming the offending field the way a caller would write it
(`requests[2].accepted_tokens`), so a worker bug is found from the error alone. The gRPC layer maps
`InvalidInput.code` to a status (unary) or a PlanError (stream); nothing here knows about gRPC.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import grpc

from smartspec.core.errors import FieldError
from smartspec.v1 import common_pb2, controller_pb2

if TYPE_CHECKING:  # annotations only
    from smartspec.controller.report_columns import ReportColumns

# Controller-side limits, independent of what a worker declares.
MAX_BATCH_SIZE = 4096
MAX_SPECULATION_LENGTH = 64
MAX_ID_LENGTH = 256


class InvalidInput(FieldError):
    """A field of a worker message is wrong; `code` is the gRPC status it maps to."""


def _check_id(value: str, field: str, *, allow_colon: bool) -> None:
    if not value:
        raise InvalidInput(field, "must not be empty")
    if len(value.encode()) > MAX_ID_LENGTH:
        raise InvalidInput(field, f"must be at most {MAX_ID_LENGTH} bytes, got {len(value.encode())}")
    if not allow_colon and ":" in value:
        # Redis keys are `req:{worker_id}:{request_id}`: a colon in the worker id would let two
        # workers' requests share a key.
        raise InvalidInput(field, f"must not contain ':' (got {value!r})")


def _check_ms(value: float, field: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(field, f"must be a finite, non-negative number of milliseconds, got {value}")


def validate_hello(hello: controller_pb2.WorkerHello, prefix: str = "hello") -> None:
    """A worker's self-description: ids usable as keys, limits within the controller's own."""
    _check_id(hello.worker_id, f"{prefix}.worker_id", allow_colon=False)
    if hello.cost_profile_id:
        _check_id(hello.cost_profile_id, f"{prefix}.cost_profile_id", allow_colon=True)
    if hello.max_speculation_length > MAX_SPECULATION_LENGTH:
        raise InvalidInput(
            f"{prefix}.max_speculation_length",
            f"must be at most {MAX_SPECULATION_LENGTH}, got {hello.max_speculation_length}",
        )
    if hello.max_batch_size > MAX_BATCH_SIZE:
        raise InvalidInput(
            f"{prefix}.max_batch_size", f"must be at most {MAX_BATCH_SIZE}, got {hello.max_batch_size}"
        )
    if hello.proposer_kind not in common_pb2.ProposerKind.values():
        raise InvalidInput(f"{prefix}.proposer_kind", f"unknown ProposerKind value {hello.proposer_kind}")
    for index, sample in enumerate(hello.profile):
        where = f"{prefix}.profile[{index}]"
        if sample.batch_size == 0:
            raise InvalidInput(f"{where}.batch_size", "must be at least 1")
        _check_ms(sample.draft_ms, f"{where}.draft_ms")
        _check_ms(sample.verify_ms, f"{where}.verify_ms")


def batch_limit(hello: controller_pb2.WorkerHello) -> int:
    """The largest batch this worker may report: its own declaration, else the controller's cap."""
    return min(hello.max_batch_size or MAX_BATCH_SIZE, MAX_BATCH_SIZE)


def validate_report(report: controller_pb2.StepReport, hello: controller_pb2.WorkerHello,
                    prefix: str = "") -> None:
    """One step's facts must be internally consistent (see RequestOutcome in controller.proto)."""
    validate_report_totals(report, hello, prefix)
    validate_outcomes(report, prefix)


def validate_report_totals(report: controller_pb2.StepReport, hello: controller_pb2.WorkerHello,
                           prefix: str = "") -> None:
    """The report as a whole: batch size within limits, step times usable (checked before the
    outcomes are read at all)."""
    count = len(report.requests)
    if count > MAX_BATCH_SIZE:
        raise InvalidInput(f"{prefix}requests", f"batch of {count} exceeds the controller's limit of "
                           f"{MAX_BATCH_SIZE}", code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    if count > batch_limit(hello):
        raise InvalidInput(f"{prefix}requests", f"batch of {count} exceeds the hello's max_batch_size "
                           f"{hello.max_batch_size}")
    _check_ms(report.draft_ms, f"{prefix}draft_ms")
    _check_ms(report.verify_ms, f"{prefix}verify_ms")
    _check_ms(report.total_ms, f"{prefix}total_ms")


def validate_outcomes(report: controller_pb2.StepReport, prefix: str = "",
                      columns: "ReportColumns | None" = None) -> None:
    """Every outcome comes from one verification. With the report's `columns` already read, the
    checks run as whole-array tests, and the outcome-by-outcome walk (which names the first bad
    field) only runs when one fails."""
    if columns is not None and _outcomes_consistent(columns):
        return
    seen: dict[str, int] = {}
    for index, outcome in enumerate(report.requests):
        try:
            _check_outcome(outcome, f"{prefix}requests[{index}]", seen, index)
        except InvalidInput as exc:
            exc.request_id = outcome.request_id
            raise


def _outcomes_consistent(columns: "ReportColumns") -> bool:
    """Every check of `_check_outcome`, on all outcomes at once; False sends the caller to the walk."""
    ids = columns.request_ids
    if not ids:
        return True
    if len(set(ids)) != len(ids):
        return False
    lengths = list(map(len, ids))
    if min(lengths) == 0:
        return False
    if max(lengths) * 4 > MAX_ID_LENGTH and any(len(i.encode()) > MAX_ID_LENGTH for i in ids):  # UTF-8: <= 4 B/char
        return False
    proposed, accepted, tested, requested = columns.proposed, columns.accepted, columns.tested, columns.requested_wire
    bad = ((accepted > proposed) | (tested > proposed) | (tested < accepted) | (tested > accepted + 1)
           | ((requested > 0) & (requested < proposed)))
    return not bad.any()


def _check_outcome(outcome: controller_pb2.RequestOutcome, where: str, seen: dict[str, int], index: int) -> None:
    """One request's counts must come from a single verification (see RequestOutcome)."""
    _check_id(outcome.request_id, f"{where}.request_id", allow_colon=True)
    if outcome.request_id in seen:
        raise InvalidInput(f"{where}.request_id",
                           f"duplicate of requests[{seen[outcome.request_id]}] ({outcome.request_id!r})")
    seen[outcome.request_id] = index
    proposed, accepted, tested = outcome.proposed_tokens, outcome.accepted_tokens, outcome.tested_positions
    if accepted > proposed:
        raise InvalidInput(f"{where}.accepted_tokens",
                           f"{accepted} accepted exceeds {proposed} proposed")
    if tested > proposed:
        raise InvalidInput(f"{where}.tested_positions",
                           f"{tested} tested exceeds {proposed} proposed")
    if tested < accepted:
        raise InvalidInput(f"{where}.tested_positions",
                           f"{tested} tested is fewer than {accepted} accepted (accepted positions are tested)")
    if tested > accepted + 1:
        raise InvalidInput(f"{where}.tested_positions",
                           f"{tested} tested exceeds accepted + 1 = {accepted + 1} "
                           "(verification stops at the first rejection)")
    if 0 < outcome.requested_tokens < proposed:
        raise InvalidInput(f"{where}.requested_tokens",
                           f"{outcome.requested_tokens} requested is fewer than {proposed} proposed "
                           "(a proposer never offers more than it was asked for)")


def validate_cost_override(model: common_pb2.CostModel, field: str = "cost_model_override") -> None:
    for descriptor, value in model.ListFields():
        if not math.isfinite(value) or value < 0:
            raise InvalidInput(f"{field}.{descriptor.name}", f"must be finite and non-negative, got {value}")

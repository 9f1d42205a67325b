"""Checks on what workers send, before anything is read or written.

Each check raises `InvalidInput` naming the offending field the way a caller would write it
(`requests[2].accepted_tokens`), so a worker bug is found from the error alone. The gRPC layer maps
`InvalidInput.code` to a status (unary) or a PlanError (stream); nothing here knows about gRPC.

Everything that enters the controller's shared state (request histories, the pooled prior, a cost
profile's fit, the metrics) is bounded here first, so one hostile or broken worker cannot push a
number into it that no real step produces: step times at most `MAX_STEP_MS` each, token counts at
most `MAX_CONTEXT_TOKENS`, speculation lengths at most the hello's `max_speculation_length`,
ids in the charset of `smartspec.core.ids` (they become parts of Redis key names).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import grpc
import numpy as np

from smartspec.core.cost_model import TOKEN_COUNT_LIMIT
from smartspec.core.errors import FieldError
from smartspec.core.ids import all_valid, id_problem
from smartspec.v1 import common_pb2, controller_pb2

if TYPE_CHECKING:  # annotations only
    from smartspec.controller.report_columns import ReportColumns

# Controller-side limits, independent of what a worker declares.
MAX_BATCH_SIZE = 4096
MAX_SPECULATION_LENGTH = 64
# A step (each of its draft, verify and total times) longer than a minute is not a measurement.
MAX_STEP_MS = 60_000.0
# Context (and prefill, batched and queued counts): 16M tokens, beyond any model's window.
MAX_CONTEXT_TOKENS = 1 << 24
MAX_QUEUED_REQUESTS = 1 << 24
MAX_PROFILE_SAMPLES = 1024
# The hello's free-form strings (model, proposer, device), shown on status pages.
MAX_INFO_LENGTH = 256
MAX_MEMBER_KINDS = 8
# StepReport.trace_context (W3C `traceparent` / `tracestate`, see core/tracing.py): a few short
# headers, bounded so a report cannot carry an arbitrary map into the controller's tracer.
MAX_TRACE_ENTRIES = 8
MAX_TRACE_KEY_LENGTH = 64
MAX_TRACE_VALUE_LENGTH = 512   # W3C caps tracestate at 512 characters
# A cost coefficient (ms per unit) above a whole step's maximum cannot describe a real machine.
MAX_COEFFICIENT_MS = MAX_STEP_MS


class InvalidInput(FieldError):
    """A field of a worker message is wrong; `code` is the gRPC status it maps to."""


def _check_id(value: str, field: str) -> None:
    problem = id_problem(value)
    if problem is not None:
        raise InvalidInput(field, problem)


def _check_ms(value: float, field: str) -> None:
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(field, f"must be a finite, non-negative number of milliseconds, got {value}")
    if value > MAX_STEP_MS:
        raise InvalidInput(field, f"must be at most {MAX_STEP_MS:.0f} ms (one step), got {value:g}")


def _check_count(value: int, field: str, limit: int, what: str = "") -> None:
    if value > limit:
        raise InvalidInput(field, f"must be at most {limit}{what}, got {value}")


def validate_hello(hello: controller_pb2.WorkerHello, prefix: str = "hello") -> None:
    """A worker's self-description: ids usable as keys, limits within the controller's own."""
    _check_id(hello.worker_id, f"{prefix}.worker_id")
    if hello.cost_profile_id:
        _check_id(hello.cost_profile_id, f"{prefix}.cost_profile_id")
    _check_count(hello.max_speculation_length, f"{prefix}.max_speculation_length", MAX_SPECULATION_LENGTH)
    if hello.max_batch_size < 1:
        raise InvalidInput(f"{prefix}.max_batch_size", "must be at least 1 (the largest batch the worker reports)")
    _check_count(hello.max_batch_size, f"{prefix}.max_batch_size", MAX_BATCH_SIZE)
    if hello.proposer_kind not in common_pb2.ProposerKind.values():
        raise InvalidInput(f"{prefix}.proposer_kind", f"unknown ProposerKind value {hello.proposer_kind}")
    for name in ("model", "proposer", "device"):
        _check_count(len(getattr(hello, name)), f"{prefix}.{name}", MAX_INFO_LENGTH, " characters")
    _check_member_kinds(hello, prefix)
    _check_count(len(hello.profile), f"{prefix}.profile", MAX_PROFILE_SAMPLES, " samples")
    for index, sample in enumerate(hello.profile):
        where = f"{prefix}.profile[{index}]"
        if sample.batch_size == 0:
            raise InvalidInput(f"{where}.batch_size", "must be at least 1")
        _check_count(sample.batch_size, f"{where}.batch_size", MAX_BATCH_SIZE)
        _check_count(sample.speculation_length, f"{where}.speculation_length", MAX_SPECULATION_LENGTH)
        _check_count(sample.context_tokens, f"{where}.context_tokens", MAX_CONTEXT_TOKENS)
        _check_ms(sample.draft_ms, f"{where}.draft_ms")
        _check_ms(sample.verify_ms, f"{where}.verify_ms")


def _check_member_kinds(hello: controller_pb2.WorkerHello, prefix: str) -> None:
    """A choice worker's members: distinct known kinds, none of them a choice; nobody else has any."""
    kinds = list(hello.member_kinds)
    if not kinds:
        return
    field = f"{prefix}.member_kinds"
    if hello.proposer_kind != common_pb2.PROPOSER_KIND_CHOICE:
        raise InvalidInput(field, "only a worker whose proposer_kind is PROPOSER_KIND_CHOICE has members")
    _check_count(len(kinds), field, MAX_MEMBER_KINDS, " kinds")
    for index, kind in enumerate(kinds):
        if kind not in common_pb2.ProposerKind.values() or kind in (common_pb2.PROPOSER_KIND_UNSPECIFIED,
                                                                      common_pb2.PROPOSER_KIND_CHOICE):
            raise InvalidInput(f"{field}[{index}]", f"must be a proposer's kind (not UNSPECIFIED or CHOICE), got {kind}")
    if len(set(kinds)) != len(kinds):
        raise InvalidInput(field, f"kinds must be distinct, got {kinds}")


def batch_limit(hello: controller_pb2.WorkerHello) -> int:
    """The largest batch this worker may report: its own declaration, within the controller's cap."""
    return min(hello.max_batch_size, MAX_BATCH_SIZE)


def validate_report(report: controller_pb2.StepReport, hello: controller_pb2.WorkerHello,
                    prefix: str = "") -> None:
    """One step's facts must be internally consistent (see RequestOutcome in controller.proto)."""
    validate_report_totals(report, hello, prefix)
    validate_outcomes(report, prefix, hello=hello)


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
    _check_count(report.batched_tokens, f"{prefix}batched_tokens", MAX_CONTEXT_TOKENS)
    _check_count(report.queued_requests, f"{prefix}queued_requests", MAX_QUEUED_REQUESTS)
    if report.trace_context:
        validate_trace_context(report.trace_context, f"{prefix}trace_context")


def validate_trace_context(carrier, field: str = "trace_context") -> None:
    """At most MAX_TRACE_ENTRIES headers, keys and values within their lengths."""
    if len(carrier) > MAX_TRACE_ENTRIES:
        raise InvalidInput(field, f"at most {MAX_TRACE_ENTRIES} entries, got {len(carrier)}")
    for key, value in carrier.items():
        if len(key) > MAX_TRACE_KEY_LENGTH:
            raise InvalidInput(field, f"keys of at most {MAX_TRACE_KEY_LENGTH} characters, got one of {len(key)}")
        if len(value) > MAX_TRACE_VALUE_LENGTH:
            raise InvalidInput(field, f"values of at most {MAX_TRACE_VALUE_LENGTH} characters, "
                                      f"got {len(value)} for {key[:MAX_TRACE_KEY_LENGTH]!r}")


def validate_outcomes(report: controller_pb2.StepReport, prefix: str = "",
                      columns: "ReportColumns | None" = None, *,
                      hello: controller_pb2.WorkerHello | None = None) -> None:
    """Every outcome comes from one verification, within the worker's declared limits (`hello`:
    its max_speculation_length; None: the controller's own). With the report's `columns` already
    read, the checks run as whole-array tests, and the outcome-by-outcome walk (which names the
    first bad field) only runs when one fails."""
    max_k = hello.max_speculation_length if hello is not None else MAX_SPECULATION_LENGTH
    members = frozenset(hello.member_kinds) if hello is not None else frozenset()
    if columns is not None and _outcomes_consistent(columns, max_k, members):
        return
    seen: dict[str, int] = {}
    for index, outcome in enumerate(report.requests):
        try:
            _check_outcome(outcome, f"{prefix}requests[{index}]", seen, index, max_k, members)
        except InvalidInput as exc:
            exc.request_id = outcome.request_id if id_problem(outcome.request_id) is None else ""
            raise


def _outcomes_consistent(columns: "ReportColumns", max_k: int, members: frozenset[int] = frozenset()) -> bool:
    """Every check of `_check_outcome`, on all outcomes at once; False sends the caller to the walk."""
    ids = columns.request_ids
    if not ids:
        return True
    if len(set(ids)) != len(ids) or not all_valid(ids):
        return False
    proposed, accepted, tested, requested = columns.proposed, columns.accepted, columns.tested, columns.requested_wire
    context, prefill, proposable = columns.context, columns.prefill, columns.proposable
    bad = ((accepted > proposed) | (tested > proposed) | (tested < accepted) | (tested > accepted + 1)
           | ((requested > 0) & (requested < proposed)) | (proposed > max_k) | (requested > max_k)
           | (proposable > max_k) | (context > MAX_CONTEXT_TOKENS) | (prefill > context))
    if bad.any():
        return False
    kinds = columns.proposer_kind
    return not kinds.any() or set(np.unique(kinds[kinds != 0]).tolist()) <= members


def _check_outcome(outcome: controller_pb2.RequestOutcome, where: str, seen: dict[str, int], index: int,
                   max_k: int, members: frozenset[int] = frozenset()) -> None:
    """One request's counts must come from a single verification (see RequestOutcome)."""
    _check_id(outcome.request_id, f"{where}.request_id")
    if outcome.request_id in seen:
        raise InvalidInput(f"{where}.request_id",
                           f"duplicate of requests[{seen[outcome.request_id]}] ({outcome.request_id!r})")
    seen[outcome.request_id] = index
    proposed, accepted, tested = outcome.proposed_tokens, outcome.accepted_tokens, outcome.tested_positions
    limit = " (the hello's max_speculation_length)"
    _check_count(proposed, f"{where}.proposed_tokens", max_k, limit)
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
    _check_count(outcome.requested_tokens, f"{where}.requested_tokens", max_k, limit)
    if 0 < outcome.requested_tokens < proposed:
        raise InvalidInput(f"{where}.requested_tokens",
                           f"{outcome.requested_tokens} requested is fewer than {proposed} proposed "
                           "(a proposer never offers more than it was asked for)")
    _check_count(outcome.context_tokens, f"{where}.context_tokens", MAX_CONTEXT_TOKENS)
    if outcome.prefill_tokens > outcome.context_tokens:
        raise InvalidInput(f"{where}.prefill_tokens",
                           f"{outcome.prefill_tokens} prefilled exceeds the {outcome.context_tokens} tokens of "
                           "context after the step (which include them)")
    if outcome.HasField("proposable_tokens"):
        _check_count(outcome.proposable_tokens, f"{where}.proposable_tokens", max_k, limit)
    if outcome.proposer_kind and outcome.proposer_kind not in members:
        raise InvalidInput(f"{where}.proposer_kind",
                           f"{outcome.proposer_kind} is not one of the hello's member_kinds {sorted(members)}")


# The coefficients that cost every step something, speculating or not (each step verifies at least
# one token per row over a non-empty context): one of them must be positive.
STEP_COST_FIELDS = ("c_fixed_ms", "c_tok_ms", "c_kv_ms", "overhead_ms", "c_row_ms", "c_width_ms")


def validate_cost_override(model: common_pb2.CostModel, field: str = "cost_model_override") -> None:
    for descriptor, value in model.ListFields():
        if descriptor.name == "token_count_ms":
            _validate_count_table(model, f"{field}.token_count_ms")
            continue
        if not math.isfinite(value) or value < 0:
            raise InvalidInput(f"{field}.{descriptor.name}", f"must be finite and non-negative, got {value}")
        if value > MAX_COEFFICIENT_MS:
            raise InvalidInput(f"{field}.{descriptor.name}",
                               f"must be at most {MAX_COEFFICIENT_MS:.0f} ms per unit, got {value:g}")
    if not any(getattr(model, name) > 0 for name in STEP_COST_FIELDS):
        raise InvalidInput(field, "a step cannot take 0 ms: at least one of "
                                  f"{', '.join(STEP_COST_FIELDS)} must be positive")


def _validate_count_table(model: common_pb2.CostModel, field: str) -> None:
    """The per-count table: at most TOKEN_COUNT_LIMIT + 1 entries, each finite, within
    MAX_COEFFICIENT_MS, and not below -c_fixed_ms (no step may be predicted to take less than 0)."""
    table = model.token_count_ms
    if len(table) > TOKEN_COUNT_LIMIT + 1:
        raise InvalidInput(field, f"at most {TOKEN_COUNT_LIMIT + 1} entries, got {len(table)}")
    for count, value in enumerate(table):
        if not math.isfinite(value) or abs(value) > MAX_COEFFICIENT_MS:
            raise InvalidInput(field, f"entry {count} must be finite and within +-{MAX_COEFFICIENT_MS:.0f} ms, "
                                      f"got {value}")
        if value < -model.c_fixed_ms:
            raise InvalidInput(field, f"entry {count} ({value:g}) is below -c_fixed_ms ({-model.c_fixed_ms:g})")

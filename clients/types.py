"""Result types of the SDK: frozen dataclasses built from the wire messages.

Callers get plain Python values (str, int, float, tuples, dicts) rather than protobuf objects, so
results can be compared, hashed, printed and turned into JSON (`dataclasses.asdict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from smartspec.core.codec import parameters_from_proto, policy_spec_proto, value_from_proto
from smartspec.core.cost_model import CostModel  # the one definition, shared with the controller
from smartspec.core.errors import FieldError
from smartspec.clients.errors import InvalidArgumentError
from smartspec.v1 import admin_pb2, common_pb2, generation_pb2

# A policy parameter as Python sees it.
ParameterPy = Union[int, float, bool, str, list[int]]


def _enum_label(enum_type, number: int, prefix: str) -> str:
    """`FINISH_REASON_LENGTH` -> "length"; unknown numbers -> "unknown(N)"."""
    try:
        name = enum_type.Name(number)
    except ValueError:
        return f"unknown({number})"
    return name.removeprefix(prefix).lower()


# --- generation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; `role` is "system", "user" or "assistant"."""

    role: str
    content: str


@dataclass(frozen=True)
class TextDelta:
    """Newly generated text and the token ids it decodes from, in stream order."""

    text: str
    token_ids: tuple[int, ...] = ()

    @classmethod
    def from_proto(cls, msg: generation_pb2.TokenDelta) -> "TextDelta":
        return cls(text=msg.text, token_ids=tuple(msg.token_ids))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class SpeculationStats:
    """How speculation went for one request (acceptance is accepted / tested positions)."""

    proposed_tokens: int
    accepted_tokens: int
    acceptance_rate: float
    mean_accepted_length: float
    steps: int
    mean_speculation_length: float
    speculation_lengths: tuple[int, ...]  # k of every decode step, in order
    requested_tokens: int = 0  # proposals asked for; proposed / requested = how often the proposer filled them

    @classmethod
    def from_proto(cls, msg: generation_pb2.SpeculationStats) -> "SpeculationStats":
        return cls(
            proposed_tokens=msg.proposed_tokens,
            accepted_tokens=msg.accepted_tokens,
            acceptance_rate=msg.acceptance_rate,
            mean_accepted_length=msg.mean_accepted_length,
            steps=msg.steps,
            mean_speculation_length=msg.mean_speculation_length,
            speculation_lengths=tuple(msg.speculation_lengths),
            requested_tokens=msg.requested_tokens,
        )


@dataclass(frozen=True)
class GenerationResult:
    """The final record of one generation: full text, why it ended, usage, timings, speculation."""

    request_id: str
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "unspecified"
    usage: Usage
    speculation: SpeculationStats
    time_to_first_token_ms: float
    total_ms: float
    queue_ms: float

    @classmethod
    def from_proto(cls, msg: generation_pb2.GenerationResult) -> "GenerationResult":
        return cls(
            request_id=msg.request_id,
            text=msg.text,
            finish_reason=_enum_label(generation_pb2.FinishReason, msg.finish_reason, "FINISH_REASON_"),
            usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens),
            speculation=SpeculationStats.from_proto(msg.speculation),
            time_to_first_token_ms=msg.time_to_first_token_ms,
            total_ms=msg.total_ms,
            queue_ms=msg.queue_ms,
        )


# --- policies ---------------------------------------------------------------------------------

def to_policy_spec(name: str, parameters: Mapping[str, Any]) -> common_pb2.PolicySpec:
    """Python values -> PolicySpec (int, float, bool, str or a list/tuple of ints, through the one
    codec, smartspec.core.codec); any other value is an InvalidArgumentError naming it."""
    try:
        return policy_spec_proto(name, parameters, field="parameters")
    except FieldError as exc:
        raise InvalidArgumentError(str(exc)) from None


@dataclass(frozen=True)
class ParameterSchema:
    """One policy parameter: `type` is "int", "float", "bool", "string" or "int_list"."""

    name: str
    type: str
    description: str
    default: ParameterPy | None
    minimum: float | None = None
    maximum: float | None = None

    @classmethod
    def from_proto(cls, msg: admin_pb2.ParameterSchema) -> "ParameterSchema":
        return cls(
            name=msg.name,
            type=_enum_label(admin_pb2.ParameterType, msg.type, "PARAMETER_TYPE_"),
            description=msg.description,
            default=value_from_proto(msg.default_value, required=False),
            minimum=msg.minimum if msg.HasField("minimum") else None,
            maximum=msg.maximum if msg.HasField("maximum") else None,
        )


@dataclass(frozen=True)
class PolicyInfo:
    name: str
    description: str
    parameters: tuple[ParameterSchema, ...]

    @classmethod
    def from_proto(cls, msg: admin_pb2.PolicyInfo) -> "PolicyInfo":
        return cls(msg.name, msg.description, tuple(ParameterSchema.from_proto(p) for p in msg.parameters))

    def parameter(self, name: str) -> ParameterSchema | None:
        return next((p for p in self.parameters if p.name == name), None)


@dataclass(frozen=True)
class ActivePolicy:
    """The policy every controller replica uses now; `version` grows by one per change."""

    name: str
    parameters: dict[str, ParameterPy | None]
    version: int
    updated_unix_ms: int

    @classmethod
    def from_proto(cls, msg: admin_pb2.ActivePolicy) -> "ActivePolicy":
        params = parameters_from_proto(dict(sorted(msg.policy.parameters.items())), required=False)
        return cls(msg.policy.name, params, msg.version, msg.updated_unix_ms)


# --- status -----------------------------------------------------------------------------------


def _plain_fields(msg, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Scalar fields of a message by name (enums as numbers), for flat dataclasses."""
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields if f.name not in skip}


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    model: str
    proposer: str
    device: str
    max_speculation_length: int
    last_seen_unix_ms: int
    steps: int
    proposed_tokens: int
    accepted_tokens: int
    generated_tokens: int
    acceptance_rate: float
    mean_speculation_length: float
    goodput_tok_s: float
    cost_model: CostModel = field(default_factory=CostModel)

    @classmethod
    def from_proto(cls, msg: admin_pb2.WorkerStatus) -> "WorkerStatus":
        return cls(**_plain_fields(msg, skip=("cost_model",)), cost_model=CostModel.from_proto(msg.cost_model))


@dataclass(frozen=True)
class ControllerStatus:
    policy: ActivePolicy
    workers: tuple[WorkerStatus, ...]
    redis_ok: bool
    controller_id: str

    @classmethod
    def from_proto(cls, msg: admin_pb2.ControllerStatus) -> "ControllerStatus":
        return cls(
            policy=ActivePolicy.from_proto(msg.policy),
            workers=tuple(WorkerStatus.from_proto(w) for w in msg.workers),
            redis_ok=msg.redis_ok,
            controller_id=msg.controller_id,
        )


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker serves and how it is doing (`proposer_kind` like "ngram", "draft")."""

    worker_id: str
    model: str
    proposer: str
    proposer_kind: str
    device: str
    dtype: str
    max_speculation_length: int
    max_batch_size: int
    context_window: int
    controller: str
    controller_connected: bool
    fallback_steps: int
    running_requests: int
    queued_requests: int
    local_policy: ActivePolicy | None
    reports_proposable_tokens: bool = False  # prompt lookup: knows each request's next offer

    @classmethod
    def from_proto(cls, msg: generation_pb2.WorkerInfo) -> "WorkerInfo":
        plain = _plain_fields(msg, skip=("proposer_kind", "local_policy"))
        local = None
        if msg.HasField("local_policy"):
            local = ActivePolicy(
                msg.local_policy.name,
                parameters_from_proto(dict(sorted(msg.local_policy.parameters.items())), required=False),
                version=0,
                updated_unix_ms=0,
            )
        kind = _enum_label(common_pb2.ProposerKind, msg.proposer_kind, "PROPOSER_KIND_")
        return cls(**plain, proposer_kind=kind, local_policy=local)

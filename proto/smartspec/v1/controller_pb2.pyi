from smartspec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerHello(_message.Message):
    __slots__ = ("worker_id", "proposer_kind", "max_speculation_length", "max_batch_size", "cost_profile_id", "profile", "model", "proposer", "device", "member_kinds")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_KIND_FIELD_NUMBER: _ClassVar[int]
    MAX_SPECULATION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    COST_PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_KINDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    proposer_kind: _common_pb2.ProposerKind
    max_speculation_length: int
    max_batch_size: int
    cost_profile_id: str
    profile: _containers.RepeatedCompositeFieldContainer[_common_pb2.ProfileSample]
    model: str
    proposer: str
    device: str
    member_kinds: _containers.RepeatedScalarFieldContainer[_common_pb2.ProposerKind]
    def __init__(self, worker_id: _Optional[str] = ..., proposer_kind: _Optional[_Union[_common_pb2.ProposerKind, str]] = ..., max_speculation_length: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., cost_profile_id: _Optional[str] = ..., profile: _Optional[_Iterable[_Union[_common_pb2.ProfileSample, _Mapping]]] = ..., model: _Optional[str] = ..., proposer: _Optional[str] = ..., device: _Optional[str] = ..., member_kinds: _Optional[_Iterable[_Union[_common_pb2.ProposerKind, str]]] = ...) -> None: ...

class RequestOutcome(_message.Message):
    __slots__ = ("request_id", "proposed_tokens", "accepted_tokens", "tested_positions", "context_tokens", "prefill_tokens", "finished", "requested_tokens", "proposable_tokens", "proposer_kind")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TESTED_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROPOSABLE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_KIND_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    proposed_tokens: int
    accepted_tokens: int
    tested_positions: int
    context_tokens: int
    prefill_tokens: int
    finished: bool
    requested_tokens: int
    proposable_tokens: int
    proposer_kind: _common_pb2.ProposerKind
    def __init__(self, request_id: _Optional[str] = ..., proposed_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., tested_positions: _Optional[int] = ..., context_tokens: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., finished: _Optional[bool] = ..., requested_tokens: _Optional[int] = ..., proposable_tokens: _Optional[int] = ..., proposer_kind: _Optional[_Union[_common_pb2.ProposerKind, str]] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("step_index", "requests", "draft_ms", "verify_ms", "total_ms", "batched_tokens", "queued_requests", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    step_index: int
    requests: _containers.RepeatedCompositeFieldContainer[RequestOutcome]
    draft_ms: float
    verify_ms: float
    total_ms: float
    batched_tokens: int
    queued_requests: int
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, step_index: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[RequestOutcome, _Mapping]]] = ..., draft_ms: _Optional[float] = ..., verify_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batched_tokens: _Optional[int] = ..., queued_requests: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "report")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    hello: WorkerHello
    report: StepReport
    def __init__(self, hello: _Optional[_Union[WorkerHello, _Mapping]] = ..., report: _Optional[_Union[StepReport, _Mapping]] = ...) -> None: ...

class RequestPlan(_message.Message):
    __slots__ = ("request_id", "speculation_length")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    speculation_length: int
    def __init__(self, request_id: _Optional[str] = ..., speculation_length: _Optional[int] = ...) -> None: ...

class PlanError(_message.Message):
    __slots__ = ("grpc_status_code", "field", "message")
    GRPC_STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    grpc_status_code: int
    field: str
    message: str
    def __init__(self, grpc_status_code: _Optional[int] = ..., field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StepPlan(_message.Message):
    __slots__ = ("step_index", "requests", "policy_name", "policy_version", "error", "predicted_step_ms", "predicted_tokens", "degraded", "decision_ms", "basis")
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_STEP_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DECISION_MS_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    step_index: int
    requests: _containers.RepeatedCompositeFieldContainer[RequestPlan]
    policy_name: str
    policy_version: int
    error: PlanError
    predicted_step_ms: float
    predicted_tokens: float
    degraded: bool
    decision_ms: float
    basis: PlanBasis
    def __init__(self, step_index: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[RequestPlan, _Mapping]]] = ..., policy_name: _Optional[str] = ..., policy_version: _Optional[int] = ..., error: _Optional[_Union[PlanError, _Mapping]] = ..., predicted_step_ms: _Optional[float] = ..., predicted_tokens: _Optional[float] = ..., degraded: _Optional[bool] = ..., decision_ms: _Optional[float] = ..., basis: _Optional[_Union[PlanBasis, _Mapping]] = ...) -> None: ...

class PlanBasis(_message.Message):
    __slots__ = ("policy", "policy_version", "cost_model", "prior_accepted", "prior_tested", "prior_proposed", "prior_requested", "prior_strength", "cold_acceptance", "cold_fill", "max_speculation_length", "goodput_per_ms", "member_priors")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIOR_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PRIOR_TESTED_FIELD_NUMBER: _ClassVar[int]
    PRIOR_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    PRIOR_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    PRIOR_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    COLD_ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    COLD_FILL_FIELD_NUMBER: _ClassVar[int]
    MAX_SPECULATION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    GOODPUT_PER_MS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_PRIORS_FIELD_NUMBER: _ClassVar[int]
    policy: _common_pb2.PolicySpec
    policy_version: int
    cost_model: _common_pb2.CostModel
    prior_accepted: float
    prior_tested: float
    prior_proposed: float
    prior_requested: float
    prior_strength: float
    cold_acceptance: float
    cold_fill: float
    max_speculation_length: int
    goodput_per_ms: float
    member_priors: _containers.RepeatedCompositeFieldContainer[MemberPrior]
    def __init__(self, policy: _Optional[_Union[_common_pb2.PolicySpec, _Mapping]] = ..., policy_version: _Optional[int] = ..., cost_model: _Optional[_Union[_common_pb2.CostModel, _Mapping]] = ..., prior_accepted: _Optional[float] = ..., prior_tested: _Optional[float] = ..., prior_proposed: _Optional[float] = ..., prior_requested: _Optional[float] = ..., prior_strength: _Optional[float] = ..., cold_acceptance: _Optional[float] = ..., cold_fill: _Optional[float] = ..., max_speculation_length: _Optional[int] = ..., goodput_per_ms: _Optional[float] = ..., member_priors: _Optional[_Iterable[_Union[MemberPrior, _Mapping]]] = ...) -> None: ...

class MemberPrior(_message.Message):
    __slots__ = ("kind", "accepted", "tested", "proposed", "requested")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TESTED_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    kind: _common_pb2.ProposerKind
    accepted: float
    tested: float
    proposed: float
    requested: float
    def __init__(self, kind: _Optional[_Union[_common_pb2.ProposerKind, str]] = ..., accepted: _Optional[float] = ..., tested: _Optional[float] = ..., proposed: _Optional[float] = ..., requested: _Optional[float] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("worker", "report", "cost_model_override")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerHello
    report: StepReport
    cost_model_override: _common_pb2.CostModel
    def __init__(self, worker: _Optional[_Union[WorkerHello, _Mapping]] = ..., report: _Optional[_Union[StepReport, _Mapping]] = ..., cost_model_override: _Optional[_Union[_common_pb2.CostModel, _Mapping]] = ...) -> None: ...

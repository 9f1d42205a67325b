from smartspec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ParameterType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARAMETER_TYPE_UNSPECIFIED: _ClassVar[ParameterType]
    PARAMETER_TYPE_INT: _ClassVar[ParameterType]
    PARAMETER_TYPE_FLOAT: _ClassVar[ParameterType]
    PARAMETER_TYPE_BOOL: _ClassVar[ParameterType]
    PARAMETER_TYPE_STRING: _ClassVar[ParameterType]
    PARAMETER_TYPE_INT_LIST: _ClassVar[ParameterType]
PARAMETER_TYPE_UNSPECIFIED: ParameterType
PARAMETER_TYPE_INT: ParameterType
PARAMETER_TYPE_FLOAT: ParameterType
PARAMETER_TYPE_BOOL: ParameterType
PARAMETER_TYPE_STRING: ParameterType
PARAMETER_TYPE_INT_LIST: ParameterType

class ParameterSchema(_message.Message):
    __slots__ = ("name", "type", "description", "default_value", "minimum", "maximum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: ParameterType
    description: str
    default_value: _common_pb2.ParameterValue
    minimum: float
    maximum: float
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[ParameterType, str]] = ..., description: _Optional[str] = ..., default_value: _Optional[_Union[_common_pb2.ParameterValue, _Mapping]] = ..., minimum: _Optional[float] = ..., maximum: _Optional[float] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("name", "description", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterSchema]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[ParameterSchema, _Mapping]]] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyInfo]
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyInfo, _Mapping]]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActivePolicy(_message.Message):
    __slots__ = ("policy", "version", "updated_unix_ms")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    policy: _common_pb2.PolicySpec
    version: int
    updated_unix_ms: int
    def __init__(self, policy: _Optional[_Union[_common_pb2.PolicySpec, _Mapping]] = ..., version: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("policy", "expected_version")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy: _common_pb2.PolicySpec
    expected_version: int
    def __init__(self, policy: _Optional[_Union[_common_pb2.PolicySpec, _Mapping]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "model", "proposer", "device", "max_speculation_length", "last_seen_unix_ms", "steps", "proposed_tokens", "accepted_tokens", "generated_tokens", "acceptance_rate", "mean_speculation_length", "goodput_tok_s", "cost_model")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_SPECULATION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SPECULATION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    GOODPUT_TOK_S_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
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
    cost_model: _common_pb2.CostModel
    def __init__(self, worker_id: _Optional[str] = ..., model: _Optional[str] = ..., proposer: _Optional[str] = ..., device: _Optional[str] = ..., max_speculation_length: _Optional[int] = ..., last_seen_unix_ms: _Optional[int] = ..., steps: _Optional[int] = ..., proposed_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., mean_speculation_length: _Optional[float] = ..., goodput_tok_s: _Optional[float] = ..., cost_model: _Optional[_Union[_common_pb2.CostModel, _Mapping]] = ...) -> None: ...

class ControllerStatus(_message.Message):
    __slots__ = ("policy", "workers", "redis_ok", "controller_id")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    REDIS_OK_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    policy: ActivePolicy
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    redis_ok: bool
    controller_id: str
    def __init__(self, policy: _Optional[_Union[ActivePolicy, _Mapping]] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., redis_ok: _Optional[bool] = ..., controller_id: _Optional[str] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROPOSER_KIND_UNSPECIFIED: _ClassVar[ProposerKind]
    PROPOSER_KIND_NGRAM: _ClassVar[ProposerKind]
    PROPOSER_KIND_DRAFT: _ClassVar[ProposerKind]
    PROPOSER_KIND_EARLY_EXIT: _ClassVar[ProposerKind]
    PROPOSER_KIND_TREE: _ClassVar[ProposerKind]
    PROPOSER_KIND_SUFFIX: _ClassVar[ProposerKind]
    PROPOSER_KIND_CHOICE: _ClassVar[ProposerKind]
PROPOSER_KIND_UNSPECIFIED: ProposerKind
PROPOSER_KIND_NGRAM: ProposerKind
PROPOSER_KIND_DRAFT: ProposerKind
PROPOSER_KIND_EARLY_EXIT: ProposerKind
PROPOSER_KIND_TREE: ProposerKind
PROPOSER_KIND_SUFFIX: ProposerKind
PROPOSER_KIND_CHOICE: ProposerKind

class CostModel(_message.Message):
    __slots__ = ("c_fixed_ms", "c_spec_ms", "c_tok_ms", "c_kv_ms", "d_fixed_ms", "d_tok_ms", "d_kv_ms", "overhead_ms", "c_spec_row_ms", "c_row_ms", "c_width_ms", "d_row_ms", "token_count_ms")
    C_FIXED_MS_FIELD_NUMBER: _ClassVar[int]
    C_SPEC_MS_FIELD_NUMBER: _ClassVar[int]
    C_TOK_MS_FIELD_NUMBER: _ClassVar[int]
    C_KV_MS_FIELD_NUMBER: _ClassVar[int]
    D_FIXED_MS_FIELD_NUMBER: _ClassVar[int]
    D_TOK_MS_FIELD_NUMBER: _ClassVar[int]
    D_KV_MS_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    C_SPEC_ROW_MS_FIELD_NUMBER: _ClassVar[int]
    C_ROW_MS_FIELD_NUMBER: _ClassVar[int]
    C_WIDTH_MS_FIELD_NUMBER: _ClassVar[int]
    D_ROW_MS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_MS_FIELD_NUMBER: _ClassVar[int]
    c_fixed_ms: float
    c_spec_ms: float
    c_tok_ms: float
    c_kv_ms: float
    d_fixed_ms: float
    d_tok_ms: float
    d_kv_ms: float
    overhead_ms: float
    c_spec_row_ms: float
    c_row_ms: float
    c_width_ms: float
    d_row_ms: float
    token_count_ms: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, c_fixed_ms: _Optional[float] = ..., c_spec_ms: _Optional[float] = ..., c_tok_ms: _Optional[float] = ..., c_kv_ms: _Optional[float] = ..., d_fixed_ms: _Optional[float] = ..., d_tok_ms: _Optional[float] = ..., d_kv_ms: _Optional[float] = ..., overhead_ms: _Optional[float] = ..., c_spec_row_ms: _Optional[float] = ..., c_row_ms: _Optional[float] = ..., c_width_ms: _Optional[float] = ..., d_row_ms: _Optional[float] = ..., token_count_ms: _Optional[_Iterable[float]] = ...) -> None: ...

class ProfileSample(_message.Message):
    __slots__ = ("batch_size", "speculation_length", "context_tokens", "draft_ms", "verify_ms")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    speculation_length: int
    context_tokens: int
    draft_ms: float
    verify_ms: float
    def __init__(self, batch_size: _Optional[int] = ..., speculation_length: _Optional[int] = ..., context_tokens: _Optional[int] = ..., draft_ms: _Optional[float] = ..., verify_ms: _Optional[float] = ...) -> None: ...

class ParameterValue(_message.Message):
    __slots__ = ("int_value", "float_value", "bool_value", "string_value", "int_list_value")
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_LIST_VALUE_FIELD_NUMBER: _ClassVar[int]
    int_value: int
    float_value: float
    bool_value: bool
    string_value: str
    int_list_value: IntList
    def __init__(self, int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., bool_value: _Optional[bool] = ..., string_value: _Optional[str] = ..., int_list_value: _Optional[_Union[IntList, _Mapping]] = ...) -> None: ...

class IntList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class PolicySpec(_message.Message):
    __slots__ = ("name", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ParameterValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ParameterValue, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    parameters: _containers.MessageMap[str, ParameterValue]
    def __init__(self, name: _Optional[str] = ..., parameters: _Optional[_Mapping[str, ParameterValue]] = ...) -> None: ...

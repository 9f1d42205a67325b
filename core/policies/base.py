"""What a policy sees, what it must provide, and how its parameters are checked.

A policy is a pure function `(BatchState, CostModel, params) -> list[int]`. Everything here is
plain data so that the controller (from Redis) and the simulator (from its own bookkeeping) can
build the same inputs and run the same code.
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from smartspec.core.errors import FieldError

if TYPE_CHECKING:  # the cost model imports nothing from here; only type hints point back
    from smartspec.core.cost_model import CostModel


@dataclass(frozen=True)
class RequestState:
    """One request as a policy sees it, for the NEXT step."""

    request_id: str
    acceptance: float  # estimated a_i in [0, 1] per offered proposal (already blended with the prior)
    context_tokens: int  # context length the next step attends over
    prefill_tokens: int = 0  # prompt tokens still to prefill in the next step (usually 0)
    last_k: int = 0  # speculation length of its last step
    last_fully_accepted: bool = False  # last step accepted every proposal (heuristic policy)
    steps_since_speculation: int = 0  # consecutive steps at k = 0 (probing)
    evidence: float = 0.0  # tested positions seen for this request
    fill: float = 1.0  # expected proposals offered per proposal asked for, in [0, 1] (ngram runs dry)


_REQUEST_FIELDS = ("acceptance", "context_tokens", "prefill_tokens", "last_k", "last_fully_accepted",
                   "steps_since_speculation", "evidence", "fill")
_REQUEST_VALUES = operator.attrgetter("request_id", *_REQUEST_FIELDS)


@dataclass(frozen=True)
class BatchColumns:
    """Every RequestState field of a batch as one array [B] (batch order), for policies that work
    on whole columns. The controller builds these straight from its counters, so a batch of 256
    costs no RequestState objects unless a policy asks for `batch.requests`."""

    request_ids: Sequence[str]
    acceptance: np.ndarray                 # float64
    context_tokens: np.ndarray             # int64 (as given, from requests)
    prefill_tokens: np.ndarray             # int64 (as given)
    last_k: np.ndarray                     # int64 (as given)
    last_fully_accepted: np.ndarray        # bool
    steps_since_speculation: np.ndarray    # int64 (as given)
    evidence: np.ndarray                   # float64
    fill: np.ndarray                       # float64

    def __len__(self) -> int:
        return len(self.request_ids)

    @classmethod
    def from_requests(cls, requests: Sequence[RequestState]) -> "BatchColumns":
        if not requests:
            return cls((), *(np.zeros(0, dtype=t) for t in (float, np.int64, np.int64, np.int64, bool, np.int64,
                                                            float, float)))
        ids, acceptance, context, prefill, last_k, full, since, evidence, fill = zip(*map(_REQUEST_VALUES, requests))
        # Counts keep the type they were given (a simulator may pass fractional contexts).
        return cls(ids, np.array(acceptance, dtype=np.float64), np.array(context), np.array(prefill),
                   np.array(last_k), np.array(full, dtype=bool), np.array(since),
                   np.array(evidence, dtype=np.float64), np.array(fill, dtype=np.float64))

    def request_states(self) -> tuple[RequestState, ...]:
        columns = [getattr(self, name).tolist() for name in _REQUEST_FIELDS]
        return tuple(RequestState(rid, *values) for rid, *values in zip(self.request_ids, *columns))


class LazyRequests(SequenceABC):
    """`BatchState.requests` over columns: the RequestState tuple is built only if a policy reads it."""

    __slots__ = ("columns", "_states")

    def __init__(self, columns: BatchColumns) -> None:
        self.columns = columns
        self._states: tuple[RequestState, ...] | None = None

    def _all(self) -> tuple[RequestState, ...]:
        if self._states is None:
            self._states = self.columns.request_states()
        return self._states

    def __len__(self) -> int:
        return len(self.columns)

    def __getitem__(self, index):
        return self._all()[index]

    def __iter__(self) -> Iterator[RequestState]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (LazyRequests, tuple, list)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._all())

    def __repr__(self) -> str:
        return repr(self._all())


@dataclass(frozen=True)
class BatchState:
    """The whole batch of the next step. `requests` is a tuple of RequestState, or `LazyRequests`
    (see `from_columns`); `columns` gives the same facts as arrays either way."""

    requests: tuple[RequestState, ...]
    max_k: int  # worker's maximum speculation length
    queued_requests: int = 0
    step_index: int = 0
    # Positions ever verified for this proposer kind (the pooled prior's decayed tested count); near 0
    # every estimate is the cold default guess and only trying can tell. Unknown -> infinite.
    pooled_evidence: float = float("inf")

    @property
    def batch_size(self) -> int:
        return len(self.requests)

    @classmethod
    def from_columns(cls, columns: BatchColumns, **fields: Any) -> "BatchState":
        return cls(requests=LazyRequests(columns), **fields)

    @property
    def has_columns(self) -> bool:
        """True when built from columns (reading `columns` is then free)."""
        return isinstance(self.requests, LazyRequests)

    @property
    def columns(self) -> BatchColumns:
        """The requests' fields as arrays; derived from `requests` (once) when built from a tuple."""
        if isinstance(self.requests, LazyRequests):
            return self.requests.columns
        cached = self.__dict__.get("_columns")
        if cached is None:
            cached = BatchColumns.from_requests(self.requests)
            object.__setattr__(self, "_columns", cached)
        return cached


class PolicyError(FieldError):
    """A policy name or parameter is wrong; `field` names the culprit (maps to INVALID_ARGUMENT)."""


class UnknownPolicyError(PolicyError, KeyError):
    """No policy is registered under that name (field "name"). Also a KeyError, for lookups."""

    __str__ = FieldError.__str__   # KeyError's would quote the message


class ParameterType(enum.Enum):
    """Values match smartspec.v1.ParameterType, so the wire mapping is `ParameterType(v).value`."""

    INT = 1
    FLOAT = 2
    BOOL = 3
    STRING = 4
    INT_LIST = 5


@dataclass(frozen=True)
class ParameterSpec:
    """One documented, bounded policy parameter. Bounds are inclusive and apply to each list element."""

    name: str
    type: ParameterType
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None

    def coerce(self, value: Any) -> Any:
        """Check `value` against type and bounds and return it in canonical form.

        Raises PolicyError naming this parameter. Ints written as integral floats (JSON `4.0`)
        are accepted; bools are never numbers here (a `True` where an int belongs is a mistake).
        """
        checker = _COERCERS[self.type]
        return checker(self, value)

    def _check_bounds(self, number: float, where: str) -> None:
        if self.minimum is not None and number < self.minimum:
            raise PolicyError(where, f"must be >= {_fmt(self.minimum)}, got {number}")
        if self.maximum is not None and number > self.maximum:
            raise PolicyError(where, f"must be <= {_fmt(self.maximum)}, got {number}")


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise PolicyError(where, f"must be an integer, got a bool ({value!r})")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise PolicyError(where, f"must be an integer, got {type(value).__name__} {value!r}")


def _coerce_int(spec: ParameterSpec, value: Any) -> int:
    number = _as_int(value, spec.name)
    spec._check_bounds(number, spec.name)
    return number


def _coerce_float(spec: ParameterSpec, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(spec.name, f"must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise PolicyError(spec.name, f"must be finite, got {number}")
    spec._check_bounds(number, spec.name)
    return number


def _coerce_bool(spec: ParameterSpec, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(spec.name, f"must be true or false, got {type(value).__name__} {value!r}")
    return value


def _coerce_string(spec: ParameterSpec, value: Any) -> str:
    if not isinstance(value, str):
        raise PolicyError(spec.name, f"must be a string, got {type(value).__name__} {value!r}")
    return value


def _coerce_int_list(spec: ParameterSpec, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise PolicyError(spec.name, f"must be a list of integers, got {type(value).__name__} {value!r}")
    items = []
    for index, item in enumerate(value):
        where = f"{spec.name}[{index}]"
        number = _as_int(item, where)
        spec._check_bounds(number, where)
        items.append(number)
    return tuple(items)


_COERCERS = {
    ParameterType.INT: _coerce_int,
    ParameterType.FLOAT: _coerce_float,
    ParameterType.BOOL: _coerce_bool,
    ParameterType.STRING: _coerce_string,
    ParameterType.INT_LIST: _coerce_int_list,
}


def validate_parameters(specs: Sequence[ParameterSpec], raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """Fill defaults, reject unknown keys, wrong types and out-of-range values (naming the field)."""
    raw = {} if raw is None else raw
    known = {spec.name: spec for spec in specs}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise PolicyError(unknown[0], f"unknown parameter (allowed: {allowed})")
    return {name: spec.coerce(raw[name]) if name in raw else spec.default for name, spec in known.items()}


@runtime_checkable
class Policy(Protocol):
    """What the registry stores. Third-party policies only need these members."""

    name: str
    description: str
    parameters: tuple[ParameterSpec, ...]

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]: ...

    def decide(self, batch: BatchState, cost: "CostModel", params: Mapping[str, Any]) -> list[int]: ...


class BasePolicy:
    """Convenience base: `validate` from `parameters`, plus an optional cross-field `check` hook."""

    name: str = ""
    description: str = ""
    parameters: tuple[ParameterSpec, ...] = ()

    def validate(self, raw: Mapping[str, Any] | None) -> dict[str, Any]:
        params = validate_parameters(self.parameters, raw)
        self.check(params)
        return params

    def check(self, params: Mapping[str, Any]) -> None:
        """Constraints between parameters; raise PolicyError naming a field."""

    def decide(self, batch: BatchState, cost: "CostModel", params: Mapping[str, Any]) -> list[int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<policy {self.name!r}>"

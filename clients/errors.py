"""Typed client errors, one class per gRPC status code a caller can act on.

Callers catch `InvalidArgumentError` to fix their request, `UnavailableError` to retry elsewhere,
and so on, instead of comparing `grpc.StatusCode`s. Every error keeps the original `code` and the
server's `details` text (which names the offending field for INVALID_ARGUMENT).

    try:
        client.complete("hi", max_tokens=-1)
    except InvalidArgumentError as exc:
        print(exc.code.name, exc.details)
"""

from __future__ import annotations

import grpc


class SmartspecError(Exception):
    """Base class: a call failed with a gRPC status `code` and the server's `details`."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        if code is not None:
            self.code = code
        self.details = details
        super().__init__(f"{self.code.name}: {details}")


class InvalidArgumentError(SmartspecError, ValueError):
    """The request itself is wrong (the details name the field); do not retry it unchanged."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnavailableError(SmartspecError):
    """The server could not be reached or is shutting down; safe to retry idempotent calls."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhaustedError(SmartspecError):
    """The server is full (e.g. the worker's queue); back off and retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(SmartspecError):
    """Missing or wrong bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceededError(SmartspecError):
    """The call's deadline passed before the server answered."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class AlreadyExistsError(SmartspecError):
    """A request with the same request_id is already running."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(SmartspecError):
    """The server's state did not allow the call (e.g. policy version changed meanwhile)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class CancelledError(SmartspecError):
    """The call was cancelled (by this client or the server)."""

    code = grpc.StatusCode.CANCELLED


_BY_CODE: dict[grpc.StatusCode, type[SmartspecError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        UnavailableError,
        ResourceExhaustedError,
        UnauthenticatedError,
        DeadlineExceededError,
        AlreadyExistsError,
        FailedPreconditionError,
        CancelledError,
    )
}


def error_from_code(code: grpc.StatusCode, details: str) -> SmartspecError:
    """The typed error for `code` (the base class for codes without their own)."""
    cls = _BY_CODE.get(code)
    return cls(details) if cls is not None else SmartspecError(details, code)


def error_from_rpc(exc: grpc.RpcError) -> SmartspecError:
    """Map a grpc (or grpc.aio) RpcError to its typed SmartspecError."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_from_code(code or grpc.StatusCode.UNKNOWN, details or "")

"""One error for bad input, named by the field at fault, and its gRPC status.

Every check in the system (a policy parameter, a cost-model coefficient, a reported outcome, a
worker message, a Generate request) raises a subclass of `FieldError`. The subclasses say where the
input came from; the base holds the field, the message and the status, and `abort` is the one place
that turns it into a gRPC error, so every server answers bad input the same way.
"""

from __future__ import annotations

from typing import NoReturn

import grpc


class FieldError(ValueError):
    """`field` (as a caller writes it: `requests[2].accepted_tokens`) is wrong: `message` says how.
    `code` is the gRPC status it maps to (INVALID_ARGUMENT unless a subclass or caller says
    otherwise); `request_id` names the request at fault, for logs, when the field is inside one."""

    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str, *, code: grpc.StatusCode | None = None,
                 request_id: str = "") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        if code is not None:
            self.code = code
        self.request_id = request_id

    def __str__(self) -> str:   # KeyError subclasses would otherwise quote the message
        return f"{self.field}: {self.message}"


def abort(context: grpc.ServicerContext, error: FieldError) -> NoReturn:
    """End an RPC with the error's status and 'field: message' as the details."""
    context.abort(error.code, str(error))
    raise AssertionError("unreachable: context.abort raises")   # for type checkers; abort never returns

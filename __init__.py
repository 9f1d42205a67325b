"""smartspec: goodput-driven speculative decoding for LLM serving.

The client SDK's public names live here:

    from smartspec import Client, AsyncClient, InvalidArgumentError

    with Client(worker="127.0.0.1:50061") as client:
        print(client.complete("Hello", max_tokens=8).text)

Importing the package stays cheap (no grpc, no torch): the SDK names load on first use, so that
server subcommands and `smartspec.core.config` do not pay for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_SDK_NAMES: dict[str, str] = {
    "AsyncClient": "smartspec.clients.client",
    "GenerationStream": "smartspec.clients.client",
    "Client": "smartspec.clients.sync_client",
    "SyncGenerationStream": "smartspec.clients.sync_client",
    **{
        name: "smartspec.clients.errors"
        for name in (
            "SmartspecError", "InvalidArgumentError", "UnavailableError", "ResourceExhaustedError",
            "UnauthenticatedError", "DeadlineExceededError", "AlreadyExistsError",
            "FailedPreconditionError", "CancelledError",
        )
    },
    **{
        name: "smartspec.clients.types"
        for name in (
            "ChatMessage", "TextDelta", "Usage", "SpeculationStats", "GenerationResult", "ParameterSchema",
            "PolicyInfo", "ActivePolicy", "CostModel", "WorkerStatus", "ControllerStatus", "WorkerInfo",
        )
    },
}

__all__ = ["__version__", *_SDK_NAMES]


def __getattr__(name: str) -> Any:
    module = _SDK_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'smartspec' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from smartspec.clients.client import AsyncClient, GenerationStream
    from smartspec.clients.errors import (
        AlreadyExistsError, CancelledError, DeadlineExceededError, FailedPreconditionError,
        InvalidArgumentError, ResourceExhaustedError, SmartspecError, UnauthenticatedError, UnavailableError,
    )
    from smartspec.clients.sync_client import Client, SyncGenerationStream
    from smartspec.clients.types import (
        ActivePolicy, ChatMessage, ControllerStatus, CostModel, GenerationResult, ParameterSchema, PolicyInfo,
        SpeculationStats, TextDelta, Usage, WorkerInfo, WorkerStatus,
    )

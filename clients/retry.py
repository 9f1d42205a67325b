"""Retries with exponential backoff for idempotent calls that failed with UNAVAILABLE.

Only UNAVAILABLE is retried: it means the call did not reach a server that could act on it (connect
refused, server draining), so repeating an idempotent read cannot change anything twice. Every other
code is the server's real answer and goes straight to the caller.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from smartspec.clients.errors import UnavailableError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` extra attempts; the n-th waits about `initial_backoff_s * 2**n` (capped, jittered)."""

    retries: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff times must be >= 0")


def backoff_s(policy: RetryPolicy, attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Wait before retry number `attempt` (0-based): exponential, capped, jittered to [50%, 100%]."""
    ceiling = min(policy.max_backoff_s, policy.initial_backoff_s * (2**attempt))
    return ceiling * (0.5 + 0.5 * rand())


async def retry_unavailable(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run `call()`; on UnavailableError try again up to `policy.retries` times, then re-raise."""
    for attempt in range(policy.retries + 1):
        try:
            return await call()
        except UnavailableError:
            if attempt == policy.retries:
                raise
            await sleep(backoff_s(policy, attempt))
    raise AssertionError("unreachable")  # the loop either returns or raises

"""One request inside the engine: the client's handle on it, and its state while it holds a slot."""

from __future__ import annotations

import queue
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from smartspec.worker.proposers import SamplingParams

from .sequence import GenerationFailed, GenerationOutcome, GenerationRequest, OutputText, SpeculationCounters, TokenDelta


class RequestHandle:
    """The client side of one request: iterate its events (TokenDelta..., then one outcome)."""

    def __init__(self, request: GenerationRequest, submitted_at: float = 0.0) -> None:
        self.request = request
        self.submitted_at = submitted_at       # engine clock; queue and TTFT are measured from it
        self._events: queue.Queue = queue.Queue()

    def events(self, timeout: float | None = None) -> Iterator[TokenDelta | GenerationOutcome | GenerationFailed]:
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if not isinstance(event, TokenDelta):
                return

    def result(self, timeout: float | None = None) -> GenerationOutcome:
        """Wait for the end; raises RuntimeError if the engine failed the request."""
        for event in self.events(timeout):
            if isinstance(event, GenerationFailed):
                raise RuntimeError(event.message)
            if isinstance(event, GenerationOutcome):
                return event
        raise AssertionError("unreachable")

    def _put(self, event) -> None:
        self._events.put(event)


@dataclass
class RunningRequest:
    """A request holding a slot. `tokens` = prompt + generated; the last one is not cached yet."""

    handle: RequestHandle
    slot: int
    generator: torch.Generator | None
    sampling: SamplingParams
    output: OutputText
    submitted_at: float
    admitted_at: float
    tokens: list[int] = field(default_factory=list)
    cached: int = 0                   # tokens whose K/V are in the slot (prefill progress, then decode)
    generated: int = 0
    first_token_at: float | None = None
    stats: SpeculationCounters = field(default_factory=SpeculationCounters)

    @classmethod
    def admit(cls, handle: RequestHandle, *, slot: int, queued_at: float, now: float,
              decode: Callable[[list[int]], str]) -> "RunningRequest":
        """The request's state from the moment it gets `slot`: nothing cached, nothing generated."""
        request = handle.request
        sampling = SamplingParams(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k)
        return cls(
            handle=handle,
            slot=slot,
            generator=request_generator(request, sampling),
            sampling=sampling,
            output=OutputText(decode, request.stop),
            submitted_at=queued_at,
            admitted_at=now,
            tokens=list(request.prompt_ids),
        )

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def request_id(self) -> str:
        return self.handle.request.request_id

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.request.prompt_ids)

    @property
    def context_tokens(self) -> int:
        """What a step reports as its context: the prompt cached so far while prefilling, else every token."""
        return self.cached if self.prefilling else len(self.tokens)


def request_generator(request: GenerationRequest, sampling: SamplingParams) -> torch.Generator | None:
    """The request's own RNG (None when greedy): seeded from the request, else at random."""
    if sampling.is_greedy:
        return None
    # A CPU generator on every device: the same seed gives the same draws on CPU and GPU
    # (the verify and sampling functions move what they draw to the logits' device).
    generator = torch.Generator()
    generator.manual_seed(request.seed if request.seed is not None else random.getrandbits(63))
    return generator

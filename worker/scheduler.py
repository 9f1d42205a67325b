"""Admission and per-step token budgeting for continuous batching (pure functions, no torch).

Every step spends at most `token_budget` target query tokens: decode rows first (each running
request's last token plus its proposals), then prompt prefill in FIFO order, chunked so that a
long prompt never stalls the requests already decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PrefillChunks:
    """How many prompt tokens each prefilling request gets this step.

    `continuing[i]` is the chunk for the i-th request already admitted but not fully prefilled;
    `admitted` is how many waiting requests (from the queue head) get a slot now, and
    `new_chunks[j]` the chunk for the j-th of them.
    """

    continuing: tuple[int, ...]
    admitted: int
    new_chunks: tuple[int, ...]

    @property
    def prefill_tokens(self) -> int:
        return sum(self.continuing) + sum(self.new_chunks)


def chunk_prefill(
    *,
    token_budget: int,
    decode_tokens: int,
    remaining_prompts: Sequence[int],
    waiting_prompts: Sequence[int],
    free_slots: int,
) -> PrefillChunks:
    """Split the budget left after decoding over prompts, oldest first.

    remaining_prompts: prompt tokens still to prefill for admitted requests (oldest first).
    waiting_prompts: prompt lengths of queued requests (queue order).
    A queued request is admitted only while a slot is free and at least one budget token is
    left, so every admitted request makes progress in its first step.
    """
    if token_budget < 1:
        raise ValueError("token_budget must be >= 1")
    budget = max(token_budget - decode_tokens, 0)
    continuing = []
    for remaining in remaining_prompts:
        chunk = min(remaining, budget)
        continuing.append(chunk)
        budget -= chunk
    new_chunks = []
    for prompt_len in waiting_prompts[: max(free_slots, 0)]:
        if budget <= 0:
            break
        chunk = min(prompt_len, budget)
        new_chunks.append(chunk)
        budget -= chunk
    return PrefillChunks(continuing=tuple(continuing), admitted=len(new_chunks), new_chunks=tuple(new_chunks))


def clamp_speculation(k: int, *, max_k: int, context_tokens: int, capacity: int, tokens_left: int) -> int:
    """The k a request can actually run.

    Verifying k proposals writes k + 1 positions from `context_tokens - 1` (the last token is not
    cached yet), so k <= capacity - context_tokens; and proposing more than `tokens_left - 1`
    tokens (max_tokens) is wasted work, since the target adds one of its own.
    """
    return max(0, min(k, max_k, capacity - context_tokens, tokens_left - 1))


def group_by_length(lengths: Sequence[int], max_padding: float = 0.25) -> list[list[int]]:
    """Indexes of `lengths` grouped so that each group can run as one right-padded forward.

    Sorted by length; a group grows while its padded size (rows x longest) stays within
    (1 + max_padding) x its real tokens, so batching prefills never costs much padding compute.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for index in order:
        if groups:
            group = groups[-1]
            longest = lengths[index]                      # sorted: the newcomer is the longest
            real = sum(lengths[i] for i in group) + lengths[index]
            if (len(group) + 1) * longest <= (1 + max_padding) * real:
                group.append(index)
                continue
        groups.append([index])
    return groups

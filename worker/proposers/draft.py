"""Draft-model proposer: a small model with the target's tokenizer guesses k tokens per request.

It keeps its own KV cache, one slot per request. Each step it first catches up on the committed
tokens it has not seen (after a rejection its cache holds proposals the target threw away: the common
prefix with the new context is kept, the rest is overwritten), then drafts autoregressively with ONE
batched forward per depth; a request drops out of the batch once it has its k tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from smartspec.v1 import common_pb2

from .base import Proposal, ProposalRequest, Proposer
from .sampling import probs_from_logits, sample

# Catch-up longer than this (a new prompt) is prefilled in a forward of its own, so that one long
# prompt does not pad every other row of the batched catch-up forward to its length.
_SEPARATE_PREFILL_TOKENS = 16


@dataclass
class _Slot:
    index: int
    cached: list[int] = field(default_factory=list)  # tokens whose K/V this slot holds, in order


@dataclass
class _Row:
    """One request during one propose() call."""

    request: ProposalRequest
    slot: _Slot
    k: int  # proposals this row will make (request.k clamped to the cache's room)
    pending: list[int]  # tokens to feed next; their last position's logits give the next draft
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)  # [V] each, sampled rows only


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, by bisection over C-speed slice compares.

    Called for every request every step on contexts of thousands of tokens; the mismatch (a
    rejected proposal) is usually near the end, where a Python loop from the start would be slow.
    """
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low] holds; the answer is <= high
    if a[:high] == b[:high]:
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


class DraftModelProposer(Proposer):
    """Proposals from `loaded_model` (a smartspec.worker.model LoadedModel) with its own KV cache."""

    kind = common_pb2.PROPOSER_KIND_DRAFT

    def __init__(self, loaded_model: Any, max_slots: int, max_tokens: int) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        self.model = loaded_model
        self.max_tokens = max_tokens
        self.cache = loaded_model.module.allocate_cache(max_slots, max_tokens)
        self._device = loaded_model.module.device
        self._slots: dict[str, _Slot] = {}
        self._free = list(range(max_slots - 1, -1, -1))  # pop() hands out slot 0 first

    def release(self, seq_id: str) -> None:
        slot = self._slots.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot.index)

    @torch.inference_mode()
    def propose(self, requests: Sequence[ProposalRequest]) -> list[Proposal]:
        rows = [self._start_row(request) for request in requests]
        # in slot order: consecutive slots let the model read the cache as a slice, not a gather
        drafting = sorted((row for row in rows if row.k > 0), key=lambda row: row.slot.index)
        self._prefill_long_catch_up(drafting)
        while drafting:
            # depth d: feed each row's pending tokens, draft one token from the last position
            logits = self._forward(drafting)  # [B, V]
            greedy_choice = logits.argmax(dim=-1).tolist()  # [B], one host sync for the batch
            for row, row_logits, choice in zip(drafting, logits, greedy_choice):
                self._take_draft(row, row_logits, choice)
            drafting = [row for row in drafting if len(row.tokens) < row.k]
        return [self._proposal(row) for row in rows]

    def _start_row(self, request: ProposalRequest) -> _Row:
        context = request.token_ids
        if not context:
            raise ValueError(f"request {request.seq_id!r}: token_ids is empty")
        if len(context) > self.max_tokens:
            raise ValueError(
                f"request {request.seq_id!r}: context of {len(context)} tokens exceeds the draft cache ({self.max_tokens})"
            )
        if request.k < 0:
            raise ValueError(f"request {request.seq_id!r}: k must be >= 0, got {request.k}")
        slot = self._slot_for(request.seq_id)
        # Keep the cached prefix that still matches; always re-feed at least the last token, whose
        # logits the first draft needs. Truncation is only moving the length pointer.
        keep = min(_common_prefix_length(slot.cached, context), len(context) - 1)
        del slot.cached[keep:]
        # Drafting feeds drafts 1..k-1, writing positions len(context) .. len(context) + k - 2.
        k = min(request.k, self.max_tokens - len(context) + 1)
        return _Row(request, slot, k, pending=list(context[keep:]))

    def _slot_for(self, seq_id: str) -> _Slot:
        slot = self._slots.get(seq_id)
        if slot is None:
            if not self._free:
                raise RuntimeError(f"draft cache has no free slot for {seq_id!r} ({len(self._slots)} in use)")
            slot = self._slots[seq_id] = _Slot(self._free.pop())
        return slot

    def _prefill_long_catch_up(self, rows: list[_Row]) -> None:
        """Feed all but the last token of long catch-ups (new prompts) one row at a time."""
        for row in rows:
            if len(row.pending) > _SEPARATE_PREFILL_TOKENS:
                prefix, row.pending = row.pending[:-1], row.pending[-1:]
                self._forward_tokens([row.slot], [prefix])

    def _forward(self, rows: list[_Row]) -> torch.Tensor:
        """Feed every row's pending tokens; returns logits at each row's last one: [B, V]."""
        logits = self._forward_tokens([row.slot for row in rows], [row.pending for row in rows])
        for row in rows:
            row.pending = []
        return logits

    def _forward_tokens(self, slots: list[_Slot], feeds: list[list[int]]) -> torch.Tensor:
        width = max(len(feed) for feed in feeds)
        input_ids = torch.zeros(len(feeds), width, dtype=torch.long)  # [B, S], right-padded
        for i, feed in enumerate(feeds):
            input_ids[i, : len(feed)] = torch.tensor(feed, dtype=torch.long)
        logits = self.model.module.forward_step(
            self.cache,
            input_ids.to(self._device),
            torch.tensor([slot.index for slot in slots], dtype=torch.long, device=self._device),  # [B]
            torch.tensor([len(slot.cached) for slot in slots], dtype=torch.long, device=self._device),  # [B]
            torch.tensor([len(feed) for feed in feeds], dtype=torch.long, device=self._device),  # [B]
            logits_rows="last",
        )  # logits: [B, 1, V]
        for slot, feed in zip(slots, feeds):
            slot.cached.extend(feed)
        return logits[:, 0, :]

    def _take_draft(self, row: _Row, logits: torch.Tensor, greedy_choice: int) -> None:
        """Draft one token for `row` from its logits [V]; queue it to feed unless it is the last."""
        params = row.request.sampling
        if params.is_greedy:
            token = greedy_choice
        else:
            probs = probs_from_logits(logits, params)  # [V] float32
            token = int(sample(probs, row.request.generator))
            row.probs.append(probs.cpu())
        row.tokens.append(token)
        if len(row.tokens) < row.k:
            row.pending = [token]

    @staticmethod
    def _proposal(row: _Row) -> Proposal:
        probs = torch.stack(row.probs) if row.probs else None  # [k, V]
        return Proposal(row.tokens, probs)

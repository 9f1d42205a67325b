"""Host-side packing of one verification step: which rule verifies each row, and where its slots sit.

A row's slots are its n + 1 logit rows in the packed [N, V] logits (one per proposal, then the
bonus). `lay_out_verification` orders the rows greedy first, then the sampled rows grouped by
SamplingParams, and lays out per-slot index tensors the device half (verify_device.py) ships in one
copy; `draw_uniforms` draws each sampled row's uniforms from its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .base import Proposal
from .sampling import GREEDY, SamplingParams


@dataclass(frozen=True)
class RowBlock:
    """Rows next to each other in plan order that share one SamplingParams (one argmax, or one
    `probs_from_logits` call, for all of them)."""

    params: SamplingParams
    rows: int
    first_slot: int  # in plan order
    slots: int
    packed_range: tuple[int, int] | None  # [start, stop) of packed_logits when the slots sit there in a run


@dataclass(frozen=True)
class VerificationLayout:
    """Host-side bookkeeping for one step: which rule verifies each row and where its slots sit.

    A row's slots are its n + 1 logit rows (one per proposal, then the bonus). The plan orders the
    rows greedy first, then the sampled rows grouped by SamplingParams; the verdict columns come
    back in this `order`.
    """

    vocab_size: int
    order: tuple[int, ...]  # step rows in plan order
    lengths: tuple[int, ...]  # n per row, plan order
    blocks: tuple[RowBlock, ...]  # the greedy block (if any) first, then one per distinct sampled params
    draft_rows: tuple[int, ...]  # step rows whose Proposal.probs are stacked (plan order)
    # 1-D host long tensors over the M = N slots in plan order, shipped to the device in one copy:
    slot_positions: torch.Tensor  # [M] the slot's row in packed_logits
    proposed: torch.Tensor  # [M] the proposed token (0 at bonus slots, never read there)
    row_of: torch.Tensor  # [M] the slot's row (plan order)
    local: torch.Tensor  # [M] the slot's index within its row: j for proposal j, n at the bonus
    draft_row_of: torch.Tensor  # [Ms] per sampled slot: its row in the stacked draft probs, or the zero row

    @property
    def greedy_rows(self) -> int:
        return self.blocks[0].rows if self.blocks and self.blocks[0].params.is_greedy else 0

    @property
    def greedy_slots(self) -> int:
        return self.blocks[0].slots if self.greedy_rows else 0

    @property
    def sampled_blocks(self) -> tuple[RowBlock, ...]:
        return self.blocks[1:] if self.greedy_rows else self.blocks


def lay_out_verification(
    logits_shape: Sequence[int], proposals: Sequence[Proposal], sampling: Sequence[SamplingParams]
) -> VerificationLayout:
    """Validate one step's rows and lay out their slots (host only, Python ints and CPU tensors)."""
    vocab_size = _check_rows(logits_shape, proposals, sampling)
    lengths_in_step = [len(proposal.tokens) for proposal in proposals]
    by_params = _rows_by_rule(sampling)
    order = [row for rows in by_params.values() for row in rows]
    greedy_rows = len(by_params.get(GREEDY, []))
    draft_rows = tuple(row for row in order[greedy_rows:] if proposals[row].probs is not None and proposals[row].tokens)
    slots = _lay_out_slots(proposals, lengths_in_step, order, greedy_rows=greedy_rows, draft_rows=draft_rows)

    def longs(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return VerificationLayout(
        vocab_size=vocab_size,
        order=tuple(order),
        lengths=tuple(lengths_in_step[row] for row in order),
        blocks=_row_blocks(by_params, lengths_in_step, slots.positions),
        draft_rows=draft_rows,
        slot_positions=longs(slots.positions),
        proposed=longs(slots.proposed),
        row_of=longs(slots.row_of),
        local=longs(slots.local),
        draft_row_of=longs(slots.draft_row_of),
    )


def _check_rows(logits_shape: Sequence[int], proposals: Sequence[Proposal], sampling: Sequence[SamplingParams]) -> int:
    """The vocabulary size V, once the packed [N, V] shape, the token ids and the draft probs fit."""
    if len(logits_shape) != 2:
        raise ValueError(f"packed logits must be [N, V], got shape {list(logits_shape)}")
    total, vocab_size = int(logits_shape[0]), int(logits_shape[1])
    expected = sum(len(proposal.tokens) + 1 for proposal in proposals)
    if total != expected:
        raise ValueError(f"packed logits have {total} rows, expected sum(len(proposal) + 1) = {expected}")
    for row, proposal in enumerate(proposals):
        if proposal.tokens and not all(0 <= token < vocab_size for token in proposal.tokens):
            raise ValueError(f"row {row}: proposed token ids must be in [0, {vocab_size}), got {proposal.tokens}")
        if not sampling[row].is_greedy and proposal.probs is not None and proposal.probs.shape[-1] != vocab_size:
            raise ValueError(f"row {row}: draft_probs must be [{len(proposal.tokens)}, {vocab_size}], "
                             f"got {list(proposal.probs.shape)}")
    return vocab_size


def _rows_by_rule(sampling: Sequence[SamplingParams]) -> dict[SamplingParams, list[int]]:
    """Step rows by rule: greedy first (top-k / top-p do not change an argmax), then each distinct
    SamplingParams in order of first appearance (dicts keep insertion order)."""
    by_params: dict[SamplingParams, list[int]] = {}
    for row, params in sorted(enumerate(sampling), key=lambda item: not item[1].is_greedy):
        by_params.setdefault(GREEDY if params.is_greedy else params, []).append(row)
    return by_params


class _Slots(NamedTuple):
    """Per slot, in plan order (the fields of VerificationLayout of the same names, as lists)."""

    positions: list[int]
    proposed: list[int]
    row_of: list[int]
    local: list[int]
    draft_row_of: list[int]  # sampled slots only


def _lay_out_slots(proposals: Sequence[Proposal], lengths_in_step: Sequence[int], order: Sequence[int], *,
                   greedy_rows: int, draft_rows: tuple[int, ...]) -> _Slots:
    row_starts = [0]  # packed position of each step row's first slot: prefix sums of n + 1
    for n in lengths_in_step:
        row_starts.append(row_starts[-1] + n + 1)
    zero_row = sum(lengths_in_step[row] for row in draft_rows)  # index of the all-zero row after the stack
    draft_offset, next_offset = {}, 0
    for row in draft_rows:
        draft_offset[row], next_offset = next_offset, next_offset + lengths_in_step[row]

    slots = _Slots([], [], [], [], [])
    for plan_row, row in enumerate(order):
        n = lengths_in_step[row]
        slots.positions.extend(range(row_starts[row], row_starts[row] + n + 1))
        slots.proposed.extend(list(proposals[row].tokens) + [0])
        slots.row_of.extend([plan_row] * (n + 1))
        slots.local.extend(range(n + 1))
        if plan_row >= greedy_rows:
            if row in draft_offset:
                slots.draft_row_of.extend(range(draft_offset[row], draft_offset[row] + n))
                slots.draft_row_of.append(zero_row)  # the bonus slot: q = 0, the residual is p itself
            else:
                slots.draft_row_of.extend([zero_row] * (n + 1))  # deterministic: q = one-hot(x), built where needed
    return slots


def _row_blocks(by_params: dict[SamplingParams, list[int]], lengths_in_step: Sequence[int],
                slot_positions: Sequence[int]) -> tuple[RowBlock, ...]:
    """One block per rule, in plan order; `packed_range` where its slots sit in one run of the logits."""
    blocks, first_slot = [], 0
    for params, rows in by_params.items():
        slots = sum(lengths_in_step[row] + 1 for row in rows)
        positions = slot_positions[first_slot : first_slot + slots]
        in_a_run = positions == list(range(positions[0], positions[0] + slots))
        blocks.append(RowBlock(params=params, rows=len(rows), first_slot=first_slot, slots=slots,
                               packed_range=(positions[0], positions[0] + slots) if in_a_run else None))
        first_slot += slots
    return tuple(blocks)


def draw_uniforms(plan: VerificationLayout, generators: Sequence[torch.Generator | None]) -> list[torch.Tensor]:
    """One U[0, 1) per slot of every sampled row, from that row's own generator: [n + 1] per row.

    Uniform j < n decides proposal j; uniform n draws the row's final token (at its first rejection
    or the bonus). Drawing n + 1 whatever happens keeps a seeded request's stream independent of
    its neighbours and of where its rejection falls. On the generator's device (CPU for the engine).
    """
    draws = []
    for plan_row in range(plan.greedy_rows, len(plan.order)):
        generator = generators[plan.order[plan_row]]
        device = generator.device if generator is not None else torch.device("cpu")
        draws.append(torch.rand(plan.lengths[plan_row] + 1, generator=generator, device=device))
    return draws

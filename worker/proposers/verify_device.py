"""The device half of verification: a whole step's verdicts from the packed logits, with no host sync.

`packed_verdicts` reads a `VerificationLayout` (verify_layout.py) and returns, per row, how many
proposals were accepted and the final token; the helpers below are its vectorised pieces
(greedy argmax equality, the rejection-sampling acceptance test and residual draw).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .device_copy import cat_on, ship_together
from .sampling import probs_from_logits
from .verify_layout import RowBlock, VerificationLayout


def packed_verdicts(
    packed_logits: torch.Tensor,
    plan: VerificationLayout,
    uniforms: Sequence[torch.Tensor],
    draft_probs: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """The device half of `verify_packed`: [2, B] long, (accepted proposals, final token) per row in
    plan order, computed without reading any device value back to the host (so the caller's one
    read is the step's only synchronisation).

    uniforms: `draw_uniforms(plan, ...)`; draft_probs: Proposal.probs per step row (index = step row).
    """
    device = packed_logits.device
    slot_positions, proposed, row_of, local, draft_row_of, lengths = ship_together(
        [plan.slot_positions, plan.proposed, plan.row_of, plan.local, plan.draft_row_of,
         torch.tensor(plan.lengths, dtype=torch.long)], device)  # [M] x 4, [Ms], [B]
    is_proposal = local < lengths[row_of]  # [M]: False exactly at each row's bonus slot
    slots_per_row = lengths + 1  # [B]
    row_end = slots_per_row.cumsum(0)  # [B]: one past each row's bonus slot
    row_start = row_end - slots_per_row  # [B]
    greedy_rows, greedy_slots = plan.greedy_rows, plan.greedy_slots
    accepted_parts, final_tokens = [], []

    if greedy_rows:
        greedy_logits = _block_logits(packed_logits, slot_positions, plan.blocks[0])  # [Mg, V]
        target_choice = greedy_logits.argmax(dim=-1)  # [Mg]: the target's own token at every greedy slot
        accepted_parts.append(target_choice == proposed[:greedy_slots])  # [Mg]: x_j == argmax p_j

    if plan.sampled_blocks:
        # target p per block, with the same function a draft model uses, so p and q are built alike
        block_probs = [probs_from_logits(_block_logits(packed_logits, slot_positions, block), block.params)
                       for block in plan.sampled_blocks]  # [M_block, V] float32 each
        target_probs = block_probs[0] if len(block_probs) == 1 else torch.cat(block_probs)  # [Ms, V]
        draft = stacked_draft_probs([draft_probs[row] for row in plan.draft_rows], plan.vocab_size, device)  # [Q+1, V]
        u = cat_on(uniforms, device)  # [Ms]: slot j < n tests proposal j, slot n draws the final token
        x = proposed[greedy_slots:]  # [Ms]
        # accept x_j iff u_j < p_j(x_j) / q_j(x_j): probability min(1, p_j(x_j) / q_j(x_j))
        accepted_parts.append(u < acceptance_ratio(target_probs, draft, draft_row_of, x))  # [Ms]

    # Each row keeps its proposals up to its first unaccepted slot (its bonus slot at the latest).
    num_accepted = first_rejection(torch.cat(accepted_parts) & is_proposal, row_of, local, len(plan.order))  # [B]
    final_slot = row_start + num_accepted  # [B]: the first rejection, or the bonus slot

    if greedy_rows:
        final_tokens.append(target_choice[final_slot[:greedy_rows]])  # [Bg]: the target's argmax there
    if plan.sampled_blocks:
        final = final_slot[greedy_rows:] - greedy_slots  # [Bs] into the sampled slots
        q_final = draft_at(draft, draft_row_of[final], x[final], is_proposal[greedy_slots:][final])  # [Bs, V]
        # the final token ~ norm(max(0, p_j - q_j)) at the final slot j; at the bonus q = 0, so p_n itself
        residual = residual_probs(target_probs[final], q_final)  # [Bs, V], unnormalised
        final_uniform = u[row_end[greedy_rows:] - 1 - greedy_slots]  # [Bs]: each row's bonus-slot uniform
        final_tokens.append(inverse_cdf_sample(residual, final_uniform))  # [Bs]
    return torch.stack([num_accepted, torch.cat(final_tokens)])  # [2, B]


def _block_logits(packed_logits: torch.Tensor, slot_positions: torch.Tensor, block: RowBlock) -> torch.Tensor:
    """The block's logit rows [M_block, V]: a view when they sit in one run of the packed logits
    (always so when every row shares one rule), else one gather."""
    if block.packed_range is not None:
        return packed_logits[block.packed_range[0] : block.packed_range[1]]
    return packed_logits.index_select(0, slot_positions[block.first_slot : block.first_slot + block.slots])


def first_rejection(accepted: torch.Tensor, row_of: torch.Tensor, local: torch.Tensor, rows: int) -> torch.Tensor:
    """accepted [M] bool over ragged rows laid out one after another -> [R] long: the index, within its
    row, of each row's first False, i.e. the length of its all-accepted prefix.

    One scatter-min over all slots replaces a loop over rows (ragged rows need no padding). Every row
    must hold a False (the bonus slot does), so the result is at most the row's proposal count.
    """
    beyond_any_row = local.numel()  # larger than every within-row index
    rejected_at = torch.where(accepted, beyond_any_row, local)  # [M]: slot index where not accepted
    first = torch.full((rows,), beyond_any_row, dtype=torch.long, device=local.device)  # [R]
    return first.scatter_reduce(0, row_of, rejected_at, reduce="amin")  # [R]: min over each row's slots


def stacked_draft_probs(draft_probs: Sequence[torch.Tensor], vocab_size: int, device: torch.device) -> torch.Tensor:
    """The draft distributions of all draft-model rows stacked, plus one all-zero row: [Q + 1, V] float32.

    Slots without a draft distribution (bonus slots, deterministic proposals) point at the zero row.
    """
    rows = [probs.float() for probs in draft_probs] + [torch.zeros(1, vocab_size)]
    return cat_on(rows, device)  # [Q + 1, V]


def acceptance_ratio(target_probs: torch.Tensor, draft: torch.Tensor, draft_row_of: torch.Tensor,
                     proposed: torch.Tensor) -> torch.Tensor:
    """p_j(x_j) / q_j(x_j) for every sampled slot: [Ms] (bonus slots give a value nobody reads).

    target_probs [Ms, V]; draft [Q + 1, V] from `stacked_draft_probs`; draft_row_of, proposed [Ms].
    """
    p_x = target_probs.gather(1, proposed[:, None])[:, 0]  # [Ms]: p_j(x_j)
    one_hot_draft = draft_row_of == draft.shape[0] - 1  # [Ms]: deterministic proposal, q_j = one-hot(x_j)
    q_x = torch.where(one_hot_draft, 1.0, draft[draft_row_of, proposed])  # [Ms]: q_j(x_j)
    # q_j(x_j) = 0 cannot happen for a token drawn from q_j; clamp so the ratio stays finite
    return p_x / q_x.clamp_min(torch.finfo(torch.float32).tiny)


def draft_at(draft: torch.Tensor, draft_row: torch.Tensor, proposed: torch.Tensor,
             is_proposal: torch.Tensor) -> torch.Tensor:
    """q at each row's final slot: [R, V]. The draft row there; one-hot(x) for a deterministic
    proposal; zero at the bonus slot (nothing was proposed there)."""
    q = draft.index_select(0, draft_row)  # [R, V]: the zero row unless a draft model proposed here
    one_hot_draft = (draft_row == draft.shape[0] - 1) & is_proposal  # [R]
    # q + one-hot(x) where due; in place is safe, index_select made q a fresh tensor
    return q.scatter_add_(1, proposed[:, None], one_hot_draft.to(q.dtype)[:, None])


def residual_probs(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """max(0, p - q) per row, unnormalised: [R, V]. Falls back to p where nothing is left, which only
    rounding can cause (a rejection needs p(x) < q(x), hence p has mass where q has less)."""
    residual = (target_probs - draft_probs).clamp_min_(0.0)  # [R, V]
    empty = residual.sum(dim=-1, keepdim=True) <= 0  # [R, 1]
    return torch.where(empty, target_probs, residual)


def inverse_cdf_sample(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from unnormalised weights [R, V] and a pre-drawn U[0, 1) per row [R] -> [R] long.

    The token is the first i with cdf_i > u * cdf_V: P(i) = w_i / sum(w), and a zero-weight token
    (cdf_i = cdf_{i-1}) is never chosen. float64 keeps u * cdf_V strictly below cdf_V (u <= 1 - 2^-24).
    """
    cdf = weights.double().cumsum(dim=-1)  # [R, V]
    threshold = uniforms.double() * cdf[:, -1]  # [R]
    token = torch.searchsorted(cdf, threshold[:, None], right=True)[:, 0]  # [R]: first cdf_i > threshold
    return token.clamp_max(weights.shape[-1] - 1)  # unreachable for finite weights; keeps NaN in range


"""Lossless verification of proposed tokens against the target model.

Greedy: keep the longest prefix of proposals equal to the target's argmax, then emit the target's own
argmax; the output is token for token what plain greedy decoding would give.

Sampling (Leviathan et al. 2023; Chen et al. 2023): for each proposed x_j drawn from the draft q_j,
accept with probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection draw the replacement from
the residual norm(max(0, p_j - q_j)); when all n are accepted draw a bonus token from p_n. Each emitted
token is then distributed exactly as p. A deterministic proposer (prompt lookup) is the draft q_j =
one-hot(x_j): accept with probability p_j(x_j), and the residual is p_j with x_j zeroed, renormalised.

`verify_packed` does all of this for every row of a step at once, on the packed [N, V] logits the
target's forward returns: one argmax for the greedy rows, vectorised rejection sampling for the
sampled ones, and a single host synchronisation for the whole step (reading the verdicts back).
`greedy_verify` / `rejection_verify` are the one-row reference versions of the same rules.

All functions here are pure (the only state is the caller's torch.Generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .base import Proposal
from .sampling import GREEDY, SamplingParams, probs_from_logits, sample


def _as_token_tensor(proposed: Sequence[int] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    tokens = torch.as_tensor(proposed, dtype=torch.long).reshape(-1)  # [n]
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"proposed token ids must be in [0, {vocab_size}), got {tokens.tolist()}")
    return tokens


def greedy_verify(target_logits: torch.Tensor, proposed: Sequence[int] | torch.Tensor) -> tuple[int, int]:
    """target_logits [n+1, V], proposed [n] -> (num_accepted, next_token).

    target_logits[j] is the target's prediction for the position of proposed[j] (row n: the bonus).
    """
    n = target_logits.shape[0] - 1
    tokens = _as_token_tensor(proposed, target_logits.shape[-1])  # [n]
    if tokens.numel() != n:
        raise ValueError(f"target_logits has {n + 1} rows, expected len(proposed) + 1 = {tokens.numel() + 1}")
    # On the host: `tokens` is a CPU tensor (comparing it with CUDA logits' argmax would raise),
    # and the two int() reads below then cost no further device syncs.
    target_choice = target_logits.argmax(dim=-1).cpu()  # [n+1]
    matches = target_choice[:n] == tokens  # [n] bool
    # accepted = length of the all-true prefix: cumprod turns everything after the first False to 0
    num_accepted = int(matches.long().cumprod(dim=0).sum())
    # the target's own token at the first mismatch, or the bonus token after n accepted proposals
    return num_accepted, int(target_choice[num_accepted])


def rejection_verify(
    target_probs: torch.Tensor,
    proposed: Sequence[int] | torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """target_probs [n+1, V], proposed [n], draft_probs [n, V] or None (deterministic) -> (num_accepted, next_token)."""
    n = target_probs.shape[0] - 1
    vocab_size = target_probs.shape[-1]
    tokens = _as_token_tensor(proposed, vocab_size)  # [n]
    if tokens.numel() != n:
        raise ValueError(f"target_probs has {n + 1} rows, expected len(proposed) + 1 = {tokens.numel() + 1}")
    p = target_probs.float()  # [n+1, V]
    tokens = tokens.to(p.device)
    positions = torch.arange(n, device=p.device)  # [n]
    p_x = p[positions, tokens]  # [n]: p_j(x_j)
    if draft_probs is None:
        q_x = torch.ones(n, device=p.device)  # q_j = one-hot(x_j) -> q_j(x_j) = 1
    else:
        if tuple(draft_probs.shape) != (n, vocab_size):
            raise ValueError(f"draft_probs must be [{n}, {vocab_size}], got {list(draft_probs.shape)}")
        draft_probs = draft_probs.to(p.device, torch.float32)
        q_x = draft_probs[positions, tokens]  # [n]: q_j(x_j)

    # accept x_j iff u_j < p_j(x_j) / q_j(x_j) with u_j ~ U[0, 1): probability min(1, p/q).
    # (q_j(x_j) = 0 cannot happen for a token drawn from q_j; clamp so the ratio stays finite.)
    rng_device = generator.device if generator is not None else p.device
    u = torch.rand(n, generator=generator, device=rng_device).to(p.device)  # [n]
    accepted = u < p_x / q_x.clamp_min(torch.finfo(torch.float32).tiny)  # [n] bool
    num_accepted = int(accepted.long().cumprod(dim=0).sum())

    if num_accepted == n:
        # all accepted: the bonus token comes straight from the target at position n
        return n, int(sample(p[n], generator))

    # rejected at j: draw from the residual max(0, p_j - q_j), renormalised
    j = num_accepted
    p_j = p[j]  # [V]
    if draft_probs is None:
        residual = p_j.clone()
        residual[tokens[j]] = 0.0  # p - one-hot(x_j), clamped at 0, only touches x_j
    else:
        residual = (p_j - draft_probs[j]).clamp_min(0.0)  # [V]
    total = residual.sum()
    if not total > 0:
        # only reachable through rounding (a rejection needs p_j(x_j) < q_j(x_j), hence mass elsewhere)
        residual, total = p_j, p_j.sum()
    return j, int(sample(residual / total, generator))


@dataclass(frozen=True)
class RowVerification:
    """What one request gets from a verify step."""

    tokens: list[int]  # accepted proposals followed by the target's own token (1..n+1 tokens)
    num_accepted: int  # proposals kept
    tested_positions: int  # num_accepted + 1 if a rejection ended the run (what acceptance counts)


def verify_batch(
    target_logits: torch.Tensor,
    proposals: Sequence[Proposal],
    sampling: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    first_logit_index: Sequence[int] | None = None,
) -> list[RowVerification]:
    """Verify every row of one padded target forward: `verify_packed` after packing the rows.

    target_logits: [B, S, V]; row i predicts its proposals from target_logits[i, s : s + n_i + 1]
    with s = first_logit_index[i] (default 0: the forward fed [last committed token, proposals...]
    right-padded). Kept for callers holding padded logits; the engine passes packed ones directly.
    """
    batch, width, vocab_size = target_logits.shape
    if not (len(proposals) == len(sampling) == len(generators) == batch):
        raise ValueError(
            f"need one proposal, SamplingParams and generator per row: batch {batch}, got "
            f"{len(proposals)}, {len(sampling)}, {len(generators)}"
        )
    starts = [0] * batch if first_logit_index is None else list(first_logit_index)
    flat_rows: list[int] = []  # row i's slots in the flattened [B * S, V] logits, row after row
    for row, (proposal, start) in enumerate(zip(proposals, starts)):
        n = len(proposal.tokens)
        if start < 0 or start + n + 1 > width:
            raise ValueError(f"row {row}: logits [{start}, {start + n + 1}) fall outside S = {width}")
        flat_rows.extend(range(row * width + start, row * width + start + n + 1))
    index = to_device_without_sync(torch.tensor(flat_rows, dtype=torch.long), target_logits.device)  # [N]
    packed = target_logits.reshape(batch * width, vocab_size).index_select(0, index)  # [N, V]
    return verify_packed(packed, proposals, sampling, generators)


# ---------------------------------------------------------------- the whole step in one pass


def verify_packed(
    packed_logits: torch.Tensor,
    proposals: Sequence[Proposal],
    sampling: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[RowVerification]:
    """Verify every row of one step from the packed target logits, with ONE host synchronisation.

    packed_logits: [N, V] with N = sum(n_i + 1): row i's n_i + 1 logit rows (the target's prediction
    for each of its n_i proposals, then for the bonus position) follow row i-1's, exactly as
    `forward_step(..., logits_rows="packed")` returns them. Greedy rows follow `greedy_verify`,
    sampled rows `rejection_verify` with the target distribution `probs_from_logits(row, params)`;
    a sampled row's randomness comes from its own generator only (n_i + 1 uniforms per step drawn
    on the host), so a seeded request repeats whatever else shares its batch.
    """
    if not (len(proposals) == len(sampling) == len(generators)):
        raise ValueError(
            f"need one proposal, SamplingParams and generator per row, got "
            f"{len(proposals)}, {len(sampling)}, {len(generators)}"
        )
    if not proposals:
        return []
    plan = plan_verification(packed_logits.shape, proposals, sampling)
    uniforms = draw_uniforms(plan, generators)
    verdicts = packed_verdicts(packed_logits, plan, uniforms, [proposal.probs for proposal in proposals])  # [2, B]
    accepted_in_plan_order, tokens_in_plan_order = verdicts.cpu().tolist()  # the step's one host sync
    results: list[RowVerification | None] = [None] * len(proposals)
    for column, row in enumerate(plan.order):
        n = len(proposals[row].tokens)
        accepted = accepted_in_plan_order[column]
        tested = accepted + (1 if accepted < n else 0)  # a rejection tested one more position
        tokens = proposals[row].tokens[:accepted] + [tokens_in_plan_order[column]]
        results[row] = RowVerification(tokens, accepted, tested)
    return results  # type: ignore[return-value]


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
class VerificationPlan:
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


def plan_verification(
    logits_shape: Sequence[int], proposals: Sequence[Proposal], sampling: Sequence[SamplingParams]
) -> VerificationPlan:
    """Validate one step's rows and lay out their slots (host only, Python ints and CPU tensors)."""
    if len(logits_shape) != 2:
        raise ValueError(f"packed logits must be [N, V], got shape {list(logits_shape)}")
    total, vocab_size = int(logits_shape[0]), int(logits_shape[1])
    lengths_in_step = [len(proposal.tokens) for proposal in proposals]
    if total != sum(n + 1 for n in lengths_in_step):
        raise ValueError(f"packed logits have {total} rows, expected sum(len(proposal) + 1) = "
                         f"{sum(n + 1 for n in lengths_in_step)}")
    for row, proposal in enumerate(proposals):
        if proposal.tokens and not all(0 <= token < vocab_size for token in proposal.tokens):
            raise ValueError(f"row {row}: proposed token ids must be in [0, {vocab_size}), got {proposal.tokens}")
        if not sampling[row].is_greedy and proposal.probs is not None and proposal.probs.shape[-1] != vocab_size:
            raise ValueError(f"row {row}: draft_probs must be [{len(proposal.tokens)}, {vocab_size}], "
                             f"got {list(proposal.probs.shape)}")
    row_starts = [0]  # packed position of each step row's first slot: prefix sums of n + 1
    for n in lengths_in_step:
        row_starts.append(row_starts[-1] + n + 1)

    # Rows by rule: greedy first (top-k / top-p do not change an argmax), then each distinct
    # SamplingParams in order of first appearance (dicts keep insertion order).
    by_params: dict[SamplingParams, list[int]] = {}
    for row, params in sorted(enumerate(sampling), key=lambda item: not item[1].is_greedy):
        by_params.setdefault(GREEDY if params.is_greedy else params, []).append(row)
    order = [row for rows in by_params.values() for row in rows]
    greedy_rows = len(by_params.get(GREEDY, []))

    draft_rows = tuple(row for row in order[greedy_rows:] if proposals[row].probs is not None and proposals[row].tokens)
    zero_row = sum(lengths_in_step[row] for row in draft_rows)  # index of the all-zero row after the stack
    draft_offset, next_offset = {}, 0
    for row in draft_rows:
        draft_offset[row], next_offset = next_offset, next_offset + lengths_in_step[row]

    slot_positions, proposed, row_of, local, draft_row_of = [], [], [], [], []
    for plan_row, row in enumerate(order):
        n = lengths_in_step[row]
        slot_positions.extend(range(row_starts[row], row_starts[row] + n + 1))
        proposed.extend(list(proposals[row].tokens) + [0])
        row_of.extend([plan_row] * (n + 1))
        local.extend(range(n + 1))
        if plan_row >= greedy_rows:
            if row in draft_offset:
                draft_row_of.extend(range(draft_offset[row], draft_offset[row] + n))
                draft_row_of.append(zero_row)  # the bonus slot: q = 0, the residual is p itself
            else:
                draft_row_of.extend([zero_row] * (n + 1))  # deterministic: q = one-hot(x), built where needed

    blocks, first_slot = [], 0
    for params, rows in by_params.items():
        slots = sum(lengths_in_step[row] + 1 for row in rows)
        positions = slot_positions[first_slot : first_slot + slots]
        in_a_run = positions == list(range(positions[0], positions[0] + slots))
        blocks.append(RowBlock(params, len(rows), first_slot, slots,
                               (positions[0], positions[0] + slots) if in_a_run else None))
        first_slot += slots

    def longs(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return VerificationPlan(
        vocab_size=vocab_size,
        order=tuple(order),
        lengths=tuple(lengths_in_step[row] for row in order),
        blocks=tuple(blocks),
        draft_rows=draft_rows,
        slot_positions=longs(slot_positions),
        proposed=longs(proposed),
        row_of=longs(row_of),
        local=longs(local),
        draft_row_of=longs(draft_row_of),
    )


def draw_uniforms(plan: VerificationPlan, generators: Sequence[torch.Generator | None]) -> list[torch.Tensor]:
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


def packed_verdicts(
    packed_logits: torch.Tensor,
    plan: VerificationPlan,
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
        u = _cat_on(uniforms, device)  # [Ms]: slot j < n tests proposal j, slot n draws the final token
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
    return _cat_on(rows, device)  # [Q + 1, V]


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


# ---------------------------------------------------------------- moving host tensors without a sync


def to_device_without_sync(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to `device` without waiting for the device's queued work.

    A plain CUDA .to() from pageable memory synchronises the stream; from pinned memory with
    non_blocking=True it is queued behind the forward instead (the caching host allocator keeps the
    pinned buffer alive until the copy ran).
    """
    if host.device == device:
        return host
    if device.type == "cuda" and host.device.type == "cpu":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def ship_together(host: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Several 1-D host long tensors to `device` in one copy (one transfer per step, not one per tensor)."""
    moved = to_device_without_sync(torch.cat(list(host)), device)
    return list(moved.split([tensor.numel() for tensor in host]))


def _cat_on(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """torch.cat onto `device`: host pieces are concatenated on the host and shipped in one copy."""
    host = [tensor for tensor in tensors if tensor.device.type == "cpu"]
    if len(host) == len(tensors):
        return to_device_without_sync(torch.cat(host), device)
    return torch.cat([to_device_without_sync(tensor, device) if tensor.device.type == "cpu" else tensor.to(device)
                      for tensor in tensors])

"""Reference verification for the tests (and scripts/gpu_check.py), not used by the product.

`greedy_verify` / `rejection_verify` are the one-row rules stated in worker/proposers/verify.py's
docstring, written plainly; `verify_packed` does the same for a whole step at once, and the tests
hold it to these row by row. `verify_batch` feeds `verify_packed` from padded [B, S, V] logits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from smartspec.worker.proposers.base import Proposal
from smartspec.worker.proposers.device_copy import to_device_without_sync
from smartspec.worker.proposers.sampling import SamplingParams, sample
from smartspec.worker.proposers.verify import RowVerification, verify_packed


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

"""The one-row reference rules of verification (verify.py's docstring states them).

`greedy_verify` / `rejection_verify` verify one request's proposals on their own; `verify_packed`
does the same for a whole step at once, and the tests hold it to these row by row.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .sampling import sample


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

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
`greedy_verify` / `rejection_verify` (verify_reference.py) are the one-row reference versions of the
same rules; verify_layout.py lays out a step's rows on the host, verify_device.py computes the verdicts.

All functions here are pure (the only state is the caller's torch.Generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from smartspec.core.acceptance import positions_tested

from .base import Proposal
from .sampling import SamplingParams
from .verify_device import packed_verdicts
from .verify_layout import draw_uniforms, lay_out_verification


@dataclass(frozen=True)
class RowVerification:
    """What one request gets from a verify step."""

    tokens: list[int]  # accepted proposals followed by the target's own token (1..n+1 tokens)
    num_accepted: int  # proposals kept
    tested_positions: int  # num_accepted + 1 if a rejection ended the run (what acceptance counts)


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
    plan = lay_out_verification(packed_logits.shape, proposals, sampling)
    uniforms = draw_uniforms(plan, generators)
    verdicts = packed_verdicts(packed_logits, plan, uniforms, [proposal.probs for proposal in proposals])  # [2, B]
    accepted_in_plan_order, tokens_in_plan_order = verdicts.cpu().tolist()  # the step's one host sync
    results: list[RowVerification | None] = [None] * len(proposals)
    for column, row in enumerate(plan.order):
        n = len(proposals[row].tokens)
        accepted = accepted_in_plan_order[column]
        tested = positions_tested(n, accepted)  # a rejection tested one more position
        tokens = proposals[row].tokens[:accepted] + [tokens_in_plan_order[column]]
        results[row] = RowVerification(tokens, accepted, tested)
    return results  # type: ignore[return-value]

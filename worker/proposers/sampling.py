"""Sampling parameters and the one function that turns logits into a token distribution.

The target (at verification) and a draft model (at proposal) must build their distributions the same
way, or rejection sampling would keep the wrong distribution; so both call `probs_from_logits` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens.

    temperature: 0 = greedy (argmax); > 0 divides the logits before the softmax.
    top_p: nucleus mass in (0, 1]; 1 = no nucleus cut.
    top_k: keep only the k most likely tokens; 0 = no limit.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> probs [..., V] (float32): temperature, then top-k, then top-p.

    Greedy params give the one-hot of the argmax: the limit of temperature -> 0, so rejection
    sampling against it reduces to greedy verification.
    """
    logits = logits.float()  # logits: [..., V]
    vocab_size = logits.shape[-1]
    if params.is_greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), vocab_size).float()  # [..., V]

    # Shift the maximum to 0 before dividing: a tiny temperature then sends the other logits to
    # -inf (a one-hot, the greedy limit) instead of overflowing the maximum to +inf (NaN probs).
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature  # [..., V]
    keep_top_k = 0 < params.top_k < vocab_size
    if not keep_top_k and params.top_p >= 1.0:
        return torch.softmax(scaled, dim=-1)

    # Work in sorted order (descending): top-k is a prefix, top-p is a prefix of what is left.
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # both [..., V]
    rank = torch.arange(vocab_size, device=logits.device)  # [V]
    if keep_top_k:
        sorted_logits = sorted_logits.masked_fill(rank >= params.top_k, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [..., V]
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p: drop token r when the mass strictly
        # before it already reaches top_p. The most likely token is always kept.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [..., V]
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)  # back to vocab order


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row: probs [..., V] -> token ids [...] (long), on the generator's device."""
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)  # a CPU generator cannot drive a CUDA draw
    flat = probs.reshape(-1, probs.shape[-1])  # [N, V]
    drawn = torch.multinomial(flat, num_samples=1, generator=generator)  # [N, 1]
    return drawn.reshape(probs.shape[:-1])

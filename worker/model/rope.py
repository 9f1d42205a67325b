"""Rotary position embeddings: frequency tables (with the simple scaling schemes) and rotation.

Tables are precomputed once per model for every position the cache can hold, so a step only
gathers rows by position. Angles are computed in fp32 (fp64 for fp64 models), never in half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling` / `rope_parameters`, for the schemes this runtime implements."""
    kind: str = "default"                       # default | linear | llama3
    factor: float = 1.0                         # linear: positions / factor; llama3: long-wave slow-down
    low_freq_factor: float = 1.0                # llama3 only
    high_freq_factor: float = 4.0               # llama3 only
    original_max_position_embeddings: int = 8192   # llama3 only


def _unscaled(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    return inv_freq


def _linear(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    # Dividing every frequency by the factor is dividing every position by it.
    return inv_freq / scaling.factor


def _llama3(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than the original context are slowed down by `factor`,
    shorter than original / high_freq_factor are kept, and those between are interpolated."""
    original = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq                                           # [D/2]
    long_limit = original / scaling.low_freq_factor
    short_limit = original / scaling.high_freq_factor
    blend = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    between = (1 - blend) * inv_freq / scaling.factor + blend * inv_freq
    adjusted = torch.where(wavelength > long_limit, inv_freq / scaling.factor, inv_freq)
    return torch.where((wavelength >= short_limit) & (wavelength <= long_limit), between, adjusted)


FREQUENCY_SCALINGS: dict[str, Callable[[torch.Tensor, RopeScaling], torch.Tensor]] = {
    "default": _unscaled,
    "linear": _linear,
    "llama3": _llama3,
}


def rope_tables(head_dim: int, theta: float, scaling: RopeScaling, length: int, device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [length, head_dim] for positions 0..length-1 (halves duplicated, HF layout)."""
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    half = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(exact)
    inv_freq = FREQUENCY_SCALINGS[scaling.kind](1.0 / (theta ** (half / head_dim)), scaling)   # [D/2]
    angles = torch.outer(torch.arange(length, device=device).to(exact), inv_freq)               # [length, D/2]
    angles = torch.cat([angles, angles], dim=-1)                                                # [length, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, D]; cos/sin: [B, 1, S, D]."""
    return x * cos + rotate_half(x) * sin

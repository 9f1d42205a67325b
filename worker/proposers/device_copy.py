"""Moving host tensors to the device without a host synchronisation (verification's one sync is its own)."""

from __future__ import annotations

from typing import Sequence

import torch


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


def cat_on(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """torch.cat onto `device`: host pieces are concatenated on the host and shipped in one copy."""
    host = [tensor for tensor in tensors if tensor.device.type == "cpu"]
    if len(host) == len(tensors):
        return to_device_without_sync(torch.cat(host), device)
    return torch.cat([to_device_without_sync(tensor, device) if tensor.device.type == "cpu" else tensor.to(device)
                      for tensor in tensors])

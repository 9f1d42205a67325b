"""The wrapper every policy decision goes through: clean inputs in, legal ks out, never an exception.

A policy is user-swappable code; a bug in it must cost speculation, not the worker's step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping

import numpy as np

from smartspec.core.acceptance import DEFAULT_PRIOR_RATE
from smartspec.core.cost_model import CostModel
from smartspec.core.policies.base import BatchState, Policy

log = logging.getLogger(__name__)


def _unit(value: float, fallback: float) -> float:
    """value clipped into [0, 1]; `fallback` when it is not a finite number."""
    return fallback if not math.isfinite(value) else min(1.0, max(0.0, value))


def _all_in_unit(batch: BatchState) -> bool:
    """Every acceptance and fill in [0, 1] (NaN fails); on the columns when the batch has them."""
    if batch.has_columns:
        a, f = batch.columns.acceptance, batch.columns.fill
        return bool(((a >= 0.0) & (a <= 1.0) & (f >= 0.0) & (f <= 1.0)).all())
    return all(0.0 <= r.acceptance <= 1.0 and 0.0 <= r.fill <= 1.0 for r in batch.requests)


def sanitize_batch(batch: BatchState, prior_acceptance: float = DEFAULT_PRIOR_RATE) -> BatchState:
    """Non-finite acceptance -> the prior, non-finite fill -> 1; finite values clipped into [0, 1];
    max_k >= 0."""
    if not (math.isfinite(prior_acceptance) and 0.0 <= prior_acceptance <= 1.0):
        prior_acceptance = DEFAULT_PRIOR_RATE
    if batch.max_k >= 0 and _all_in_unit(batch):
        return batch
    requests = []
    for request in batch.requests:
        a, f = _unit(request.acceptance, prior_acceptance), _unit(request.fill, 1.0)
        same = a == request.acceptance and f == request.fill
        requests.append(request if same else dataclasses.replace(request, acceptance=a, fill=f))
    return dataclasses.replace(batch, requests=tuple(requests), max_k=max(0, int(batch.max_k)))


def _clamp(ks: list[Any], max_k: int) -> list[int]:
    values = np.asarray(ks)  # [B]
    if values.ndim != 1 or values.dtype.kind not in "iuf":
        raise TypeError(f"speculation lengths must be numbers, got {values.dtype} values of shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"speculation lengths must be finite, got {ks!r}")
    return np.clip(values, 0, max_k).astype(np.int64).tolist()


def guarded_decide(policy: Policy, batch: BatchState, cost: CostModel, params: Mapping[str, Any],
                   *, prior_acceptance: float = DEFAULT_PRIOR_RATE) -> list[int]:
    """policy.decide with sanitised inputs, each k clamped to 0..max_k, and k = 0 for all on any
    failure (an exception, a wrong-length or non-numeric answer), which is logged."""
    clean = sanitize_batch(batch, prior_acceptance)
    size = len(clean.requests)
    try:
        ks = list(policy.decide(clean, cost, params))
        if len(ks) != size:
            raise ValueError(f"returned {len(ks)} speculation lengths for {size} requests")
        return _clamp(ks, clean.max_k) if ks else []
    except Exception:  # noqa: BLE001 - any policy failure degrades to no speculation
        log.exception("policy %r failed; planning k = 0 for all %d requests", getattr(policy, "name", policy), size)
        return [0] * size

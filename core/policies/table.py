"""`table`: k looked up from the batch size in a fixed table (like vLLM V1's per-batch-size K)."""

from __future__ import annotations

from typing import Any, Mapping

from smartspec.core.cost_model import CostModel
from smartspec.core.policies.base import (
    BasePolicy,
    BatchState,
    ParameterSpec,
    ParameterType,
    PolicyError,
)


def lookup_k(batch_size: int, upper_bounds: tuple[int, ...], ks: tuple[int, ...]) -> int:
    """ks[i] for the first i with batch_size <= upper_bounds[i]; 0 beyond the last bound."""
    for bound, k in zip(upper_bounds, ks):
        if batch_size <= bound:
            return k
    return 0


class TablePolicy(BasePolicy):
    name = "table"
    description = (
        "Batch-size table: a batch of B requests uses ks[i] for the first i with B <= batch_sizes[i]; "
        "batches larger than the last bound do not speculate."
    )
    parameters = (
        ParameterSpec("batch_sizes", ParameterType.INT_LIST, (1, 4, 16),
                      "Strictly increasing inclusive upper bounds on the batch size.",
                      minimum=1, maximum=1_000_000),
        ParameterSpec("ks", ParameterType.INT_LIST, (6, 4, 2),
                      "Speculation length for each batch-size range (same length as batch_sizes).",
                      minimum=0, maximum=64),
    )

    def check(self, params: Mapping[str, Any]) -> None:
        bounds, ks = params["batch_sizes"], params["ks"]
        if not bounds:
            raise PolicyError("batch_sizes", "must not be empty")
        if len(ks) != len(bounds):
            raise PolicyError("ks", f"must have one entry per batch_sizes entry ({len(bounds)}), got {len(ks)}")
        for index in range(1, len(bounds)):
            if bounds[index] <= bounds[index - 1]:
                raise PolicyError(f"batch_sizes[{index}]", "bounds must be strictly increasing")

    def decide(self, batch: BatchState, cost: CostModel, params: Mapping[str, Any]) -> list[int]:
        size = len(batch.requests)
        return [lookup_k(size, params["batch_sizes"], params["ks"])] * size


POLICY = TablePolicy()

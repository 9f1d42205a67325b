"""`batch-threshold`: speculate with a fixed k only while the batch is small (vLLM's
disable-by-batch-size rule)."""

from __future__ import annotations

from typing import Any, Mapping

from smartspec.core.cost_model import CostModel
from smartspec.core.policies.base import BasePolicy, BatchState, ParameterSpec, ParameterType


class BatchThresholdPolicy(BasePolicy):
    name = "batch-threshold"
    description = "k for every request while the batch has fewer than batch_size requests, else 0."
    parameters = (
        ParameterSpec("k", ParameterType.INT, 4, "Speculation length below the threshold.", minimum=0, maximum=64),
        ParameterSpec("batch_size", ParameterType.INT, 8,
                      "Batches of this many requests or more do not speculate.", minimum=1, maximum=1_000_000),
    )

    def decide(self, batch: BatchState, cost: CostModel, params: Mapping[str, Any]) -> list[int]:
        size = len(batch.requests)
        k = params["k"] if size < params["batch_size"] else 0
        return [k] * size


POLICY = BatchThresholdPolicy()

"""`fixed`: the same k for every request at every load, as a static speculative server does."""

from __future__ import annotations

from typing import Any, Mapping

from smartspec.core.cost_model import CostModel
from smartspec.core.policies.base import BasePolicy, BatchState, ParameterSpec, ParameterType


class FixedPolicy(BasePolicy):
    name = "fixed"
    description = "Constant speculation length k for every request (clamped to the worker's maximum)."
    parameters = (
        ParameterSpec("k", ParameterType.INT, 4, "Speculation length for every request.", minimum=0, maximum=64),
    )

    def decide(self, batch: BatchState, cost: CostModel, params: Mapping[str, Any]) -> list[int]:
        return [params["k"]] * len(batch.requests)


POLICY = FixedPolicy()

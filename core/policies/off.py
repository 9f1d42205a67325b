"""`off`: never speculate. The baseline every other policy is compared against."""

from __future__ import annotations

from typing import Any, Mapping

from smartspec.core.cost_model import CostModel
from smartspec.core.policies.base import BasePolicy, BatchState


class OffPolicy(BasePolicy):
    name = "off"
    description = "No speculation: k = 0 for every request."
    parameters = ()

    def decide(self, batch: BatchState, cost: CostModel, params: Mapping[str, Any]) -> list[int]:
        return [0] * len(batch.requests)


POLICY = OffPolicy()

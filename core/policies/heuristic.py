"""`heuristic`: per-request +2 after a fully accepted step, -1 otherwise (HF transformers'
dynamic number of assistant tokens)."""

from __future__ import annotations

from typing import Any, Mapping

from smartspec.core.cost_model import CostModel
from smartspec.core.policies.base import (
    BasePolicy,
    BatchState,
    ParameterSpec,
    ParameterType,
    PolicyError,
    RequestState,
)


def next_k(request: RequestState, params: Mapping[str, Any]) -> int:
    """Grow after a step whose proposals were all accepted, shrink otherwise, never below min_k.

    The schedule never goes below min_k >= 1, so last_k == 0 can only mean the request has not
    speculated yet (or another policy ran it): it starts from start_k.
    """
    if request.last_k <= 0:
        return params["start_k"]
    if request.last_fully_accepted:
        return request.last_k + params["increase"]
    return max(params["min_k"], request.last_k - params["decrease"])


class HeuristicPolicy(BasePolicy):
    name = "heuristic"
    description = "Per request: k + increase after a fully accepted step, k - decrease otherwise."
    parameters = (
        ParameterSpec("start_k", ParameterType.INT, 5, "k of a request's first speculative step.",
                      minimum=1, maximum=64),
        ParameterSpec("increase", ParameterType.INT, 2, "Added after a step that accepted every proposal.",
                      minimum=0, maximum=64),
        ParameterSpec("decrease", ParameterType.INT, 1, "Subtracted after a step with a rejection.",
                      minimum=0, maximum=64),
        ParameterSpec("min_k", ParameterType.INT, 1, "Lower bound on k.", minimum=1, maximum=64),
    )

    def check(self, params: Mapping[str, Any]) -> None:
        if params["start_k"] < params["min_k"]:
            raise PolicyError("start_k", f"must be >= min_k ({params['min_k']})")

    def decide(self, batch: BatchState, cost: CostModel, params: Mapping[str, Any]) -> list[int]:
        # k above the worker's maximum is clamped by the guard; clamp here too so last_k stays honest
        return [min(batch.max_k, next_k(r, params)) for r in batch.requests]


POLICY = HeuristicPolicy()

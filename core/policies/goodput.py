"""`goodput` (default): per-request k maximising expected tokens per predicted step time (SmartSpec)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

from smartspec.core.acceptance import DEFAULT_PRIOR_STRENGTH
from smartspec.core.cost_model import CostModel
from smartspec.core.policies.base import BasePolicy, BatchState, ParameterSpec, ParameterType
from smartspec.core.policies.optimizer import optimize_goodput, predict_step

# Below this many verified positions pooled over the proposer kind, estimates are still the cold guess.
COLD_EVIDENCE = DEFAULT_PRIOR_STRENGTH
# Probes may cost at most this share of step time on average. A probe step at batch 32 on the
# reference machine costs up to ~60% more than a plain one (every row's query widens): at the
# default interval of 8 that alone was a 4-7% loss on work where speculation does not pay.
PROBE_BUDGET = 0.02


def probe_interval_for(extra_share: float, probe_interval: int, budget: float = PROBE_BUDGET) -> int:
    """Steps between probes so that probe steps costing `extra_share` more than the plan without
    them spend at most `budget` of step time on average (never more often than probe_interval)."""
    if not extra_share > 0:
        return probe_interval
    return max(probe_interval, math.ceil(extra_share / budget))


def apply_probes(ks: np.ndarray, steps_since_speculation: np.ndarray, step_index: int,
                 probe_interval: int, cold: bool = False) -> np.ndarray:
    """Give k = 1 to requests held at k = 0 for `probe_interval` steps, so their estimate can recover.

    A request at k = 0 produces no acceptance evidence, so without probes one bad stretch would
    pin it at 0 forever. When nobody else speculates this step, a probe also pays the batch-wide
    c_spec, so such probes wait for a step index divisible by the interval and go together:
    at most one c_spec per interval. When the plan already speculates, due probes ride along.
    `cold`: (almost) nothing was ever verified for this proposer kind, so every estimate is the cold
    default guess: probe now. A dry probe costs nothing, a filled one buys the evidence.
    """
    if probe_interval <= 0 or ks.size == 0:
        return ks
    due = (ks == 0) & ((steps_since_speculation >= probe_interval) | cold)  # [B]
    if not due.any():
        return ks
    if cold or ks.max() > 0 or step_index % probe_interval == 0:
        ks = ks.copy()
        ks[due] = 1
    return ks


def budgeted_probes(ks: np.ndarray, steps_since_speculation: np.ndarray, step_index: int, probe_interval: int,
                    now: bool, step_ms: Callable[[np.ndarray], float], allowed: np.ndarray | None = None) -> np.ndarray:
    """`apply_probes` with the interval stretched (probe_interval_for) so that probes cost at most
    PROBE_BUDGET of step time, by `step_ms` (the predicted ms of a plan's ks) with and without them.
    `now`: probe every due row this step, unstretched (`apply_probes`' cold). `allowed` ([B] bool):
    the rows that may be probed (None: all)."""
    def probe(interval: int) -> np.ndarray:
        probed = apply_probes(ks, steps_since_speculation, step_index, interval, now)
        return probed if allowed is None else np.where(allowed, probed, ks)

    probed = probe(probe_interval)
    if not now and (probed != ks).any():
        # What these probes would add to the step, as a share of the step without them.
        probed = probe(probe_interval_for(step_ms(probed) / step_ms(ks) - 1.0, probe_interval))
    return probed


class GoodputPolicy(BasePolicy):
    name = "goodput"
    description = (
        "SmartSpec: each step choose every request's k in 0..K maximising predicted goodput "
        "(expected accepted + bonus tokens / predicted step time), exactly, with periodic k=1 "
        "probes for requests held at k=0."
    )
    parameters = (
        ParameterSpec("max_k", ParameterType.INT, 0,
                      "Upper bound on k below the worker's own maximum; 0 = the worker's maximum.",
                      minimum=0, maximum=64),
        ParameterSpec("probe_interval", ParameterType.INT, 8,
                      "A request held at k=0 for this many steps is given k=1 once; 0 disables probing.",
                      minimum=0, maximum=100_000),
        # 5%: the cost model's validated error (BENCHMARKS.md section 6: median within 5%); a
        # predicted gain smaller than that is as likely a loss, and chat in bursts measured one.
        ParameterSpec("min_gain", ParameterType.FLOAT, 0.05,
                      "Speculate only if predicted goodput beats k=0 for all by this relative margin "
                      "(hedges against cost-model error).",
                      minimum=0.0, maximum=10.0),
        # Off by default: measured side by side (BENCHMARKS.md §7, "The per-count table"), planning
        # with it lost 4-13% at batch 1 on every unseen workload while winning some bursts.
        ParameterSpec("count_table", ParameterType.BOOL, False,
                      "Plan with the cost model's per-query-token-count table (default: its line alone; "
                      "predictions always use the table)."),
    )

    def decide(self, batch: BatchState, cost: CostModel, params: Mapping[str, Any]) -> list[int]:
        max_k = batch.max_k if params["max_k"] == 0 else min(batch.max_k, params["max_k"])
        if not params["count_table"] and cost.token_count_ms:
            cost = cost.replace(token_count_ms=())
        columns = batch.columns
        plan = optimize_goodput(
            columns.acceptance,
            columns.context_tokens,
            columns.prefill_tokens,
            cost,
            max_k,
            fill=columns.fill,
        )
        ks = plan.ks
        if plan.goodput < plan.baseline_goodput * (1.0 + params["min_gain"]):
            ks = np.zeros_like(ks)
        if max_k > 0:
            ks = budgeted_probes(
                ks, columns.steps_since_speculation, batch.step_index, params["probe_interval"],
                now=batch.pooled_evidence < COLD_EVIDENCE,
                step_ms=lambda plan_ks: predict_step(columns.acceptance, columns.context_tokens,
                                                     columns.prefill_tokens, cost, plan_ks, fill=columns.fill)[1])
        return ks.tolist()


POLICY = GoodputPolicy()

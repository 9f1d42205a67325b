"""The simulated planner: what the controller and the worker know of each simulated request, and the
decision they make from it, through the one pipeline of core/decision.py.

Evidence is kept in arrays over the workload's requests (request i is row i), by the pipeline's
rules: every row a step ran is one step of its request's history (a prefill chunk a step at k = 0),
and the pooled prior decays once per step and takes that step's evidence (`pool_step`), as the
controller's store does. Plans are `decide_batch` on the decoding rows, so a simulated step is planned
exactly as the controller (and the worker's re-plan) would plan it from the same facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from smartspec.core.acceptance import PooledPrior
from smartspec.core.cost_model import CostModel
from smartspec.core.decision import UNKNOWN_PROPOSABLE, Estimator, Evidence, decide_batch, pool_step
from smartspec.core.policies import Policy


@dataclass
class SimPlanner:
    """The policy, the cost model it plans with, and the evidence of `n` requests plus the pooled prior."""

    policy: Policy
    params: Mapping[str, Any]
    cost: CostModel
    estimator: Estimator
    max_k: int
    n: int
    prior: PooledPrior = field(default_factory=PooledPrior)
    evidence: Evidence = field(init=False)  # [N], updated in place

    def __post_init__(self) -> None:
        self.evidence = Evidence.zeros(self.n)

    def plan(self, dec: np.ndarray, context: np.ndarray, offer: np.ndarray | None, *, prior: PooledPrior,
             queued: int, step_index: int) -> np.ndarray:
        """k per decoding request [D] for step `step_index`: each request's own evidence shrunk toward
        `prior`, planned on the look-ahead `offer` [D] where the proposer has one (None: a draft
        model) and never above it. The engine's clamps come after."""
        proposable = np.full(dec.size, UNKNOWN_PROPOSABLE, dtype=np.int64) if offer is None else offer
        plan = decide_batch(
            self.policy, self.params, self.cost, request_ids=[str(r) for r in dec.tolist()],
            evidence=self.evidence.take(dec), context=context, proposable=proposable, prior=prior,
            estimator=self.estimator, max_k=self.max_k, queued_requests=queued, step_index=step_index,
        )
        return plan.ks

    def record_step(self, dec: np.ndarray, asked: np.ndarray, offered: np.ndarray, accepted: np.ndarray,
                    tested: np.ndarray, prefill_rows: np.ndarray) -> None:
        """One step's outcomes: decoding rows `dec` [D] (k asked, proposals offered, accepted, tested)
        and prefill rows [P] (no proposals), then the step pooled into the prior."""
        self.evidence.record(dec, offered, accepted, tested, asked)
        if prefill_rows.size:
            none = np.zeros(prefill_rows.size, dtype=np.int64)
            self.evidence.record(prefill_rows, none, none, none, none)
        self.prior = pool_step(self.prior, int(accepted.sum()), int(tested.sum()), int(offered.sum()),
                               int(asked.sum()), self.estimator.prior_decay)

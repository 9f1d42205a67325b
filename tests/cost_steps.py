"""Steps of a known cost model, for the formula's tests and the online fit's (test_cost_model.py, test_cost_fit.py)."""

from __future__ import annotations

import numpy as np

from smartspec.core.cost_model import CostModel

TRUE_MODEL = CostModel(
    c_fixed_ms=30.0, c_spec_ms=12.0, c_spec_row_ms=3.0, c_tok_ms=1.5, c_kv_ms=0.004, c_row_ms=2.0,
    c_width_ms=4e-4, d_fixed_ms=6.0, d_row_ms=2.0, d_tok_ms=0.4, d_kv_ms=0.0008, overhead_ms=0.0,
)


def random_step(rng: np.random.Generator):
    batch = int(rng.integers(1, 33))
    # the share of rows that speculate varies from step to step (some steps: none), so the
    # per-speculating-row terms are told apart from the per-row and per-token ones
    speculating = rng.random(batch) < rng.random() * (rng.random() < 0.8)
    ks = rng.integers(1, 9, size=batch) * speculating
    contexts = rng.integers(50, 2000, size=batch)
    prefills = np.where(rng.random(batch) < 0.1, rng.integers(1, 200, size=batch), 0)
    return ks, contexts, prefills


def noisy_times(rng, cost: CostModel, ks, contexts, prefills, noise=0.05):
    draft = cost.draft_ms(ks, contexts) * (1 + noise * rng.standard_normal())
    verify = cost.verify_ms(ks, contexts, prefills) * (1 + noise * rng.standard_normal())
    return max(0.0, draft), max(0.0, verify)

"""Time one (proposer, k) decision for a large batch with three proposers: ngram, suffix, draft.

    python scripts/bench_choice_optimizer.py [--batch 256] [--max-k 8] [--batches 200]

Prints the median and 99th-percentile wall time of `optimize_choices` over random batches (each
timed once after a warm-up pass), next to `optimize_goodput` on the same rows with one proposer,
as the floor the single-proposer policy pays today, and the whole worker-side decision
(`worker/choice_plan.py` `plan_choices`: each row's options read from a real ProposerChoice of
prompt lookup, suffix decoding and a priced stand-in for a draft model, the optimiser, the probes,
the assignment) for one batch of requests that looked ahead over 512-token contexts, half of them
ending in a span prompt lookup and suffix decoding can copy; each step starts its search from the
previous step's optimum, as the worker's does; verify priced by the H100 fit (bench/step_models.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from smartspec.bench.step_models import PRESETS
from smartspec.core.cost_model import DEFAULT_COST_MODEL, CostModel
from smartspec.core.policies.choice_optimizer import optimize_choices
from smartspec.core.policies.optimizer import optimize_goodput

# ngram and suffix look-ups are host work per asked row; the draft model runs once per depth.
PROPOSER_COSTS = (
    CostModel(d_row_ms=0.0106),  # ngram (prompt lookup)
    CostModel(d_row_ms=0.02),  # suffix tree
    CostModel(d_fixed_ms=3.0, d_row_ms=0.01, d_tok_ms=0.02, d_kv_ms=1e-6),  # small draft model
)


# A batch of 256 is a GPU's: the worker plan is priced with the SmartSpec authors' H100 fit (on this
# CPU's own fit nothing pays at that size, and the plan is plain after one round).
GPU_VERIFY_COST = PRESETS["h100-llama8b"]


def random_batch(rng: np.random.Generator, batch: int, max_k: int) -> dict:
    lookups = 2
    acceptance = np.column_stack([rng.beta(2, 2, size=(batch, lookups)), rng.beta(5, 3, size=batch)])  # [B, 3]
    fill = np.column_stack([rng.uniform(size=(batch, lookups)), np.ones(batch)])  # a draft model always fills
    available = np.column_stack([rng.random((batch, lookups)) < 0.7, np.ones(batch, dtype=bool)])  # [B, 3]
    k_cap = np.column_stack([rng.integers(0, max_k + 1, size=(batch, lookups)), np.full(batch, max_k)])  # look-ahead
    return dict(acceptance=acceptance, fill=fill, k_cap=k_cap, available=available,
                contexts=rng.integers(16, 4096, size=batch), prefills=np.zeros(batch, dtype=np.int64))


def time_choices(batches: list[dict], max_k: int) -> list[float]:
    samples = []
    for b in batches:
        start = time.perf_counter()
        optimize_choices(b["acceptance"], b["fill"], b["k_cap"], b["contexts"], b["prefills"], DEFAULT_COST_MODEL,
                         PROPOSER_COSTS, max_k, available=b["available"])
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def time_single(batches: list[dict], max_k: int) -> list[float]:
    samples = []
    for b in batches:
        start = time.perf_counter()
        optimize_goodput(b["acceptance"][:, 0], b["contexts"], b["prefills"], DEFAULT_COST_MODEL, max_k,
                         fill=b["fill"][:, 0])
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


class _PricedStandIn:
    """A member with a cost of its own and no look-ahead (a draft model's place; never asked here)."""

    kind = 2
    reports_lookahead = False

    def propose(self, requests):
        raise AssertionError("not asked in this benchmark")

    def lookahead(self, seq_id, token_ids, max_k):
        return None

    def proposal_class(self, seq_id):
        return None

    def release(self, seq_id):
        pass


def time_worker_plan(batch: int, max_k: int, repeats: int) -> list[float]:
    from smartspec.worker.choice_plan import plan_choices
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.proposers.choice import ProposerChoice
    from smartspec.worker.steps import SpeculationQuery

    rng = np.random.default_rng(1)
    choice = ProposerChoice([make_proposer("ngram"), make_proposer("suffix"), _PricedStandIn()],
                            ["ngram", "suffix", "draft"], cost_prior=PROPOSER_COSTS[2])
    queries = []
    for row in range(batch):
        phrase = rng.integers(100, 30000, size=32).tolist()
        tail = rng.integers(100, 30000, size=8).tolist() if row % 2 else []  # odd rows: no match to copy
        context = (phrase * 17)[:512 - len(tail)] + tail
        choice.lookahead(f"r{row}", context, max_k)
        queries.append(SpeculationQuery(f"r{row}", len(context)))
    params = {"min_gain": 0.05, "probe_interval": 8, "max_k": 0}
    since = np.zeros(batch, dtype=np.int64)
    samples = []
    for step in range(repeats + 5):
        start = time.perf_counter()
        plan_choices(choice, GPU_VERIFY_COST, queries, max_k=max_k, params=params,
                     steps_since_speculation=since, step_index=step)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples[5:]


def report(name: str, samples: list[float]) -> None:
    print(f"{name:22s} median {statistics.median(samples):.3f} ms, p99 {float(np.percentile(samples, 99)):.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-k", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    batches = [random_batch(rng, args.batch, args.max_k) for _ in range(args.batches)]
    time_choices(batches[:20], args.max_k)  # warm-up
    time_single(batches[:20], args.max_k)
    print(f"B={args.batch} P={len(PROPOSER_COSTS)} K={args.max_k}, {args.batches} random batches")
    report("optimize_choices", time_choices(batches, args.max_k))
    report("optimize_goodput", time_single(batches, args.max_k))
    report("plan_choices (worker)", time_worker_plan(args.batch, args.max_k, args.batches))


if __name__ == "__main__":
    main()

"""Time one `goodput` decision for a large batch: the controller makes one per worker step.

    python scripts/bench_decide.py [--batch 256] [--max-k 8] [--runs 2000]

Prints the median and 99th-percentile wall time of `guarded_decide` (validation of inputs,
the exact optimiser, probes, clamping), next to the `fixed` policy's as a floor for the
per-call overhead, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from smartspec.core.cost_model import DEFAULT_COST_MODEL
from smartspec.core.policies import BatchState, RequestState, get, guarded_decide


def random_batch(rng: np.random.Generator, batch: int, max_k: int) -> BatchState:
    requests = tuple(
        RequestState(
            request_id=f"r{i}",
            acceptance=float(rng.beta(2, 2)),
            context_tokens=int(rng.integers(16, 4096)),
            steps_since_speculation=int(rng.integers(0, 12)),
        )
        for i in range(batch)
    )
    return BatchState(requests=requests, max_k=max_k, step_index=int(rng.integers(0, 1000)))


def time_policy(name: str, batches: list[BatchState], runs: int) -> list[float]:
    policy = get(name)
    params = policy.validate({})
    samples = []
    for run in range(runs):
        batch = batches[run % len(batches)]
        start = time.perf_counter()
        guarded_decide(policy, batch, DEFAULT_COST_MODEL, params)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-k", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    batches = [random_batch(rng, args.batch, args.max_k) for _ in range(16)]
    time_policy("goodput", batches, 50)  # warm-up
    results = {name: time_policy(name, batches, args.runs) for name in ("goodput", "fixed")}
    for name, samples in results.items():
        p99 = float(np.percentile(samples, 99))
        print(f"{name:8s} batch={args.batch} K={args.max_k}: median {statistics.median(samples):.3f} ms, "
              f"p99 {p99:.3f} ms over {args.runs} decisions")
    ratio = statistics.median(results["goodput"]) / statistics.median(results["fixed"])
    print(f"goodput / fixed median ratio: {ratio:.1f}x")


if __name__ == "__main__":
    main()

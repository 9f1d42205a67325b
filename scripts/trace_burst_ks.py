"""Where a burst's tokens go: per-step k, accepted tokens and step times of one burst, per policy.

`bench_unseen.py` reports a burst's throughput and mean latency; this says why two policies with
the same mean latency end a burst at different times. One process, the default target loaded once,
a fresh in-process worker per run (prompt lookup, `--controller none`, the local planner), every
engine step recorded. Optionally the worker first serves the workload's 4 prompts one at a time
(--warm), as a stack that ran the one-at-a-time cells first has learned from them.

    python scripts/trace_burst_ks.py [--workload summaries] [--burst 12] [--policies fixed:3,goodput]
        [--repeats 2] [--prompts 4] [--warm]

A burst of N cycles the workload's --prompts prompts, as bench_unseen.py's bursts do.

Per run: wall time, steps (all, decode-only, speculative, plain), tokens per ms of speculative and
plain decode steps, tokens proposed and accepted, and how many rows asked for each k.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_unseen  # noqa: E402  (scripts/ is not a package)
from bench_proposer_choice import run_requests  # noqa: E402
from smartspec.worker.cli import build_proposer  # noqa: E402
from smartspec.worker.engine import EngineConfig  # noqa: E402
from smartspec.worker.model import load_model  # noqa: E402
from smartspec.worker.server import WorkerOptions, WorkerServer  # noqa: E402
from smartspec.worker.steps import StepFacts  # noqa: E402


def serve(model, policy: str, batch: int) -> WorkerServer:
    config = EngineConfig(max_batch_size=batch, max_context_tokens=2048, token_budget=2048, max_k=8)
    proposer = build_proposer("ngram", model, draft="auto", max_slots=batch, max_tokens=2048)
    options = WorkerOptions(worker_id="trace", engine=config, local_policy=policy, profile_steps=0,
                            proposer_name="ngram")
    server = WorkerServer(model, proposer, options)
    server.start()
    return server


def tokens_per_ms(steps: list[StepFacts]) -> float:
    ms = sum(s.total_ms for s in steps)
    return sum(r.accepted_tokens + 1 for s in steps for r in s.requests) / ms if ms else 0.0


def summary(policy: str, wall_s: float, steps: list[StepFacts]) -> str:
    decode = [s for s in steps if s.requests and all(r.prefill_tokens == 0 for r in s.requests)]
    speculative = [s for s in decode if any(r.requested_tokens for r in s.requests)]
    plain = [s for s in decode if not any(r.requested_tokens for r in s.requests)]
    ks = collections.Counter(r.requested_tokens for s in decode for r in s.requests)
    proposed = sum(r.proposed_tokens for s in decode for r in s.requests)
    accepted = sum(r.accepted_tokens for s in decode for r in s.requests)
    return (f"{policy:14s} wall {wall_s:6.2f} s  steps {len(steps)} (decode {len(decode)}: speculative "
            f"{len(speculative)}, plain {len(plain)})  tok/ms speculative {tokens_per_ms(speculative):.4f} "
            f"plain {tokens_per_ms(plain):.4f}  proposed {proposed} accepted {accepted}  "
            f"rows per k {dict(sorted(ks.items()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="summaries", choices=sorted(bench_unseen.WORKLOADS))
    parser.add_argument("--burst", type=int, default=12)
    parser.add_argument("--policies", default="fixed:3,goodput")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=4, help="prompts the burst cycles (bench_unseen.py's)")
    parser.add_argument("--warm", action="store_true", help="serve those prompts one at a time first")
    args = parser.parse_args()
    model = load_model("SmolLM2-135M-Instruct")
    distinct = bench_unseen.WORKLOADS[args.workload](args.prompts, random.Random(0))
    prompts = [distinct[i % len(distinct)] for i in range(args.burst)]
    policies = args.policies.split(",")
    for repeat in range(args.repeats):
        for policy in policies if repeat % 2 == 0 else policies[::-1]:  # who goes first alternates
            server = serve(model, policy, args.burst)
            steps: list[StepFacts] = []
            planner = server.engine.planner
            observe = planner.observe

            def recording(step: StepFacts, observe=observe) -> None:
                steps.append(step)
                observe(step)

            planner.observe = recording
            address = f"127.0.0.1:{server.port}"
            try:
                if args.warm:
                    asyncio.run(run_requests(address, distinct, 1, args.max_tokens))
                    steps.clear()
                wall_s, _ = asyncio.run(run_requests(address, prompts, args.burst, args.max_tokens))
            finally:
                server.stop(1.0)
            print(summary(policy, wall_s, steps), flush=True)


if __name__ == "__main__":
    main()

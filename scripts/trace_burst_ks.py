"""Where a burst's tokens go: per-step k, accepted tokens and step times of one burst, per policy.

`bench_unseen.py` reports a burst's throughput and mean latency; this says why two policies with
the same mean latency end a burst at different times. One process, the default target loaded once,
a fresh in-process worker per run (prompt lookup, `--controller none`, the local planner), every
engine step recorded. Optionally the worker first serves the workload's 4 prompts one at a time
(--warm), as a stack that ran the one-at-a-time cells first has learned from them.

    python scripts/trace_burst_ks.py [--workload summaries] [--burst 12] [--policies fixed:3,goodput]
        [--repeats 2] [--prompts 4] [--warm] [--at-once N] [--by-count] [--baseline-guard FILE]

A burst of N cycles the workload's --prompts prompts, as bench_unseen.py's bursts do; --at-once 1
serves them one at a time instead (the one-at-a-time cells). --baseline-guard FILE: a policy
named with the suffix "+baseline" (e.g. goodput+baseline) runs with the GoodputGuard class of
FILE, an older worker/goodput_guard.py (`git show REV:worker/goodput_guard.py > FILE`), so two
versions of the guard are compared in one run.

Per run: wall time, steps (all, decode-only, speculative, plain), tokens per ms of speculative and
plain decode steps, tokens proposed and accepted, how many rows asked for each k, rows planned k = 0
although the proposer had something to offer, steps the guard held, and the median predicted /
measured step time of speculative and plain steps by the planner's model of that moment. --by-count adds,
per query-token count N of the decode steps (sum of proposed + 1 over rows), how many steps ran at N,
their median step ms and tokens made: what each count really cost in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import bench_unseen  # noqa: E402  (scripts/ is not a package)
from bench_proposer_choice import run_requests  # noqa: E402
from smartspec.core.cost_fit import attended_context  # noqa: E402
from smartspec.core.cost_model import CostModel  # noqa: E402
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


def declined_rows(steps: list[StepFacts]) -> int:
    """Rows planned k = 0 although the step before said the proposer could offer something."""
    offered: dict[str, int] = {}
    declined = 0
    for s in steps:
        for r in s.requests:
            if r.prefill_tokens == 0 and offered.get(r.request_id, 0) > 0 and r.requested_tokens == 0:
                declined += 1
            offered[r.request_id] = r.proposable_tokens or 0
    return declined


def predicted_ms(cost: CostModel, step: StepFacts) -> tuple[float, float]:
    """What the planner's model of the moment predicted for the step as it ran: (with its per-count
    table, line alone)."""
    rows = step.requests
    proposed, accepted, prefill, context = (np.array(column, dtype=np.int64) for column in zip(
        *[(r.proposed_tokens, r.accepted_tokens, r.prefill_tokens, r.context_tokens) for r in rows]))
    attended = attended_context(context, accepted, prefill)  # [B]
    return (float(cost.predict_ms(proposed, attended, prefill)),
            float(cost.replace(token_count_ms=()).predict_ms(proposed, attended, prefill)))


def prediction_error(steps: list[StepFacts], predictions: dict[int, tuple[float, float]]) -> str:
    """Median predicted / measured step time of speculative and of plain decode steps."""
    parts = []
    for name, chosen in (("speculative", lambda s: any(r.proposed_tokens for r in s.requests)),
                         ("plain", lambda s: not any(r.requested_tokens for r in s.requests))):
        ratios = [(predictions[id(s)][0] / s.total_ms, predictions[id(s)][1] / s.total_ms) for s in steps
                  if s.requests and s.total_ms > 0 and all(r.prefill_tokens == 0 for r in s.requests) and chosen(s)]
        if ratios:
            parts.append(f"{name} predicted/measured {statistics.median(r[0] for r in ratios):.2f} "
                         f"(line alone {statistics.median(r[1] for r in ratios):.2f})")
    return "    " + ", ".join(parts)


def summary(policy: str, wall_s: float, steps: list[StepFacts], held_steps: int = 0) -> str:
    decode = [s for s in steps if s.requests and all(r.prefill_tokens == 0 for r in s.requests)]
    speculative = [s for s in decode if any(r.requested_tokens for r in s.requests)]
    plain = [s for s in decode if not any(r.requested_tokens for r in s.requests)]
    ks = collections.Counter(r.requested_tokens for s in decode for r in s.requests)
    proposed = sum(r.proposed_tokens for s in decode for r in s.requests)
    accepted = sum(r.accepted_tokens for s in decode for r in s.requests)
    return (f"{policy:14s} wall {wall_s:6.2f} s  steps {len(steps)} (decode {len(decode)}: speculative "
            f"{len(speculative)}, plain {len(plain)})  tok/ms speculative {tokens_per_ms(speculative):.4f} "
            f"plain {tokens_per_ms(plain):.4f}  proposed {proposed} accepted {accepted}  "
            f"rows per k {dict(sorted(ks.items()))}  declined rows {declined_rows(steps)}  guard-held steps {held_steps}")


def by_count(steps: list[StepFacts]) -> str:
    """Per query-token count of the decode steps: steps, median total ms, mean tokens made."""
    groups: dict[int, list[StepFacts]] = collections.defaultdict(list)
    for s in steps:
        if s.requests and all(r.prefill_tokens == 0 for r in s.requests):
            groups[sum(r.proposed_tokens + 1 for r in s.requests)].append(s)
    lines = []
    for count, group in sorted(groups.items()):
        made = sum(r.accepted_tokens + 1 for s in group for r in s.requests) / len(group)
        lines.append(f"    N={count:3d}  steps {len(group):4d}  median {statistics.median(s.total_ms for s in group):7.1f} ms"
                     f"  tokens/step {made:5.2f}")
    return "\n".join(lines)


def load_guard_class(path: str):
    """GoodputGuard from another version of worker/goodput_guard.py (its relative imports made absolute)."""
    source = Path(path).read_text().replace("from .steps import", "from smartspec.worker.steps import")
    spec = importlib.util.spec_from_loader("baseline_goodput_guard", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up
    exec(compile(source, path, "exec"), module.__dict__)
    return module.GoodputGuard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="summaries", choices=sorted(bench_unseen.WORKLOADS))
    parser.add_argument("--burst", type=int, default=12)
    parser.add_argument("--policies", default="fixed:3,goodput")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=4, help="prompts the burst cycles (bench_unseen.py's)")
    parser.add_argument("--warm", action="store_true", help="serve those prompts one at a time first")
    parser.add_argument("--at-once", type=int, default=0, help="requests in flight together (0: the whole burst)")
    parser.add_argument("--by-count", action="store_true", help="also print each query-token count's steps")
    parser.add_argument("--baseline-guard", help="worker/goodput_guard.py of another version, for POLICY+baseline")
    args = parser.parse_args()
    model = load_model("SmolLM2-135M-Instruct")
    distinct = bench_unseen.WORKLOADS[args.workload](args.prompts, random.Random(0))
    prompts = [distinct[i % len(distinct)] for i in range(args.burst)]
    policies = args.policies.split(",")
    baseline_guard = load_guard_class(args.baseline_guard) if args.baseline_guard else None
    for repeat in range(args.repeats):
        for policy in policies if repeat % 2 == 0 else policies[::-1]:  # who goes first alternates
            at_once = args.at_once or args.burst
            name, baseline = policy.removesuffix("+baseline"), policy.endswith("+baseline")
            if baseline and baseline_guard is None:
                raise SystemExit(f"{policy}: needs --baseline-guard FILE")
            server = serve(model, name, at_once)
            steps: list[StepFacts] = []
            predictions: dict[int, tuple[float, float]] = {}
            planner = server.engine.planner
            if baseline:
                planner.guard = baseline_guard()
            observe = planner.observe

            def recording(step: StepFacts, observe=observe, planner=planner) -> None:
                steps.append(step)
                if step.requests:
                    predictions[id(step)] = predicted_ms(planner.cost, step)
                observe(step)

            planner.observe = recording
            address = f"127.0.0.1:{server.port}"
            try:
                if args.warm:
                    asyncio.run(run_requests(address, distinct, 1, args.max_tokens))
                    steps.clear()
                wall_s, _ = asyncio.run(run_requests(address, prompts, at_once, args.max_tokens))
            finally:
                server.stop(1.0)
            print(summary(policy, wall_s, steps, planner.guard.held_steps), flush=True)
            print(prediction_error(steps, predictions), flush=True)
            if args.by_count:
                print(by_count(steps), flush=True)


if __name__ == "__main__":
    main()

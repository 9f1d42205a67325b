"""Bursts of different work back to back, on one stack: does goodput keep up when the work changes?

`bench_unseen.py` measures each workload on its own. Real traffic changes: a burst of chat can
follow a burst of code edits, and whatever the worker and the controller learned on the first
(the pooled acceptance prior, the goodput guard's records) meets the second. This runs a sequence
of bursts on one stack (as `smartspec up` starts it) and prints, per burst: throughput, mean
latency, the worker's steps, tokens per step, tokens proposed and accepted (from its /metrics),
and which batch classes the goodput guard holds off afterwards. Compare a goodput burst with the
`off` bursts next to it.

    python scripts/bench_burst_sequence.py [--burst 32] [--max-tokens 128]
        [--sequence code-edits:goodput,chat:off,chat:goodput,code-edits:goodput,chat:goodput,chat:off]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import urllib.request

import bench_unseen
from smartspec import AsyncClient
from smartspec.bench.cli import wait_idle
from smartspec.core.policy_spec import parse_policy_spec

COUNTERS = ("steps_total", "proposed_tokens_total", "accepted_tokens_total", "generated_tokens_total")
DEFAULT_SEQUENCE = "code-edits:goodput,chat:off,chat:goodput,code-edits:goodput,chat:goodput,chat:off"


def scrape(url: str) -> tuple[dict[str, float], list[str]]:
    """The worker's counters (summed over labels) and the batch classes its guard holds off."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    counters = {name: sum(float(v) for v in re.findall(rf"^smartspec_worker_{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
                for name in COUNTERS}
    held = re.findall(r'^smartspec_worker_speculation_backed_off\{batch_from="(\d+)"\} 1\.0$', text, re.M)
    return counters, held


async def run(args) -> None:
    sequence = [item.split(":", 1) for item in args.sequence.split(",")]
    with bench_unseen.local_stack("") as (worker, controller, ports):
        metrics_url = f"http://127.0.0.1:{ports.worker_metrics}/metrics"
        prompts = {name: bench_unseen.WORKLOADS[name](args.prompts, random.Random(args.seed))
                   for name in {workload for workload, _ in sequence}}
        async with AsyncClient(worker=worker, controller=controller) as client:
            await client.complete("Warm up.", max_tokens=8)
            for workload, spec in sequence:
                name, params = parse_policy_spec(spec)
                await client.set_policy(name, **params)
                await wait_idle(client)
                before, _ = scrape(metrics_url)
                cell = await bench_unseen.run_cell(client, prompts[workload], args.burst, args.max_tokens)
                after, held = scrape(metrics_url)
                delta = {name: after[name] - before[name] for name in COUNTERS}
                steps = max(1.0, delta["steps_total"])
                print(f"{workload:10s} {spec:10s} throughput {cell['throughput_tok_s']:6.1f} tok/s  latency "
                      f"{cell['mean_latency_s']:6.2f} s  steps {steps:4.0f}  tokens/step "
                      f"{delta['generated_tokens_total'] / steps:5.2f}  proposed {delta['proposed_tokens_total']:5.0f}  "
                      f"accepted {delta['accepted_tokens_total']:5.0f}  guard holds off at batch {held or '-'}",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequence", default=DEFAULT_SEQUENCE, help="WORKLOAD:POLICY,... run in this order")
    parser.add_argument("--burst", type=int, default=32, help="requests at once per burst")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per workload (a burst cycles them)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    unknown = {w for w, _ in (item.split(":", 1) for item in args.sequence.split(","))} - set(bench_unseen.WORKLOADS)
    if unknown:
        sys.exit(f"unknown workloads {sorted(unknown)} (known: {', '.join(bench_unseen.WORKLOADS)})")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

"""Swap the controller's policy with the real CLI while a workload runs; the worker never restarts.

    python scripts/demo_policy_swap.py [--phase-s 10] [--clients 3]

Starts `smartspec up --serve` (ports 0, the real Redis under a private prefix; the printed lines
give the addresses and pids), runs a few SDK generate loops in the background, and goes through
three phases: `goodput` (the default), `smartspec policy set fixed --param k=1`, then
`smartspec policy set goodput`. Around each swap it scrapes the worker's Prometheus /metrics and
prints, per phase, the mean k (under fixed k=1 below 1: k is capped at what prompt lookup can offer;
the check is that no request-step ran more than 1) (from the `smartspec_worker_speculation_length` histogram's sum and
count) and proposed tokens per step (`smartspec_worker_proposed_tokens` / `smartspec_worker_steps`),
computed from counter deltas. The worker's pid and start time are checked unchanged throughout.
Ends with SIGINT to `smartspec up` (what Ctrl-C sends) and checks every child is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from demo_support import SMARTSPEC, REDIS_URL, Child, check, main_wrapper, private_prefix, run_cli, wipe_prefix
from smartspec import AsyncClient
from smartspec.bench.datasets import load_dataset

UP_LINE = r"{role}\s+listening on (\S+) \(gRPC\)\s+metrics (\S+)\s+pid (\d+)"


@dataclass(frozen=True)
class Scrape:
    k_sum: float
    k_count: float
    k_at_most_1: float          # the histogram's le="1.0" bucket: request-steps that ran k <= 1
    proposed: float
    steps: float


def scrape(metrics_url: str) -> Scrape:
    """The worker's counters that the per-phase means are computed from."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("smartspec_worker_speculation_length_sum",
                               "smartspec_worker_speculation_length_count", "smartspec_worker_steps_total"):
                values[sample.name] = sample.value
            elif sample.name == "smartspec_worker_speculation_length_bucket" and sample.labels.get("le") == "1.0":
                values["k_at_most_1"] = sample.value
            elif sample.name == "smartspec_worker_proposed_tokens_total":
                values["proposed"] = values.get("proposed", 0.0) + sample.value
    return Scrape(values.get("smartspec_worker_speculation_length_sum", 0.0),
                  values.get("smartspec_worker_speculation_length_count", 0.0), values.get("k_at_most_1", 0.0),
                  values.get("proposed", 0.0), values.get("smartspec_worker_steps_total", 0.0))


def process_start_ticks(pid: int) -> int:
    """Start time of `pid` (/proc/PID/stat field 22): a restarted process with a reused pid differs."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])


async def workload(address: str, clients: int, stop: asyncio.Event, completed: list[int]) -> None:
    prompts = [p.as_message_dicts() for p in load_dataset("summarise", clients, seed=1, max_prompt_tokens=250).prompts]

    async def loop(client: AsyncClient, messages) -> None:
        while not stop.is_set():
            await client.complete(messages, max_tokens=32, temperature=0.0)
            completed[0] += 1

    async with AsyncClient(worker=address, stream_timeout=120) as client:
        await asyncio.gather(*(loop(client, m) for m in prompts))


async def scenario(args, controller: str, worker: str, metrics_url: str, worker_pid: int) -> None:
    start_ticks = process_start_ticks(worker_pid)
    stop = asyncio.Event()
    completed = [0]
    background = asyncio.create_task(workload(worker, args.clients, stop, completed))
    phases = [("goodput (default)", None),
              ("fixed k=1", ("fixed", "--param", "k=1")),
              ("goodput", ("goodput",))]
    rows = []
    await asyncio.sleep(3)                            # let the loops reach steady decoding
    for label, set_args in phases:
        if set_args:
            out = await asyncio.to_thread(run_cli, "policy", "set", *set_args, "--controller", controller, "--json")
            active = json.loads(out)
            print(f"$ smartspec policy set {' '.join(set_args)} --controller {controller}"
                  f"  -> {active['name']} v{active['version']}")
            await asyncio.sleep(1.0)                  # steps already planned under the old policy drain
        before, done_before = await asyncio.to_thread(scrape, metrics_url), completed[0]
        await asyncio.sleep(args.phase_s)
        after, done_after = await asyncio.to_thread(scrape, metrics_url), completed[0]
        check(process_start_ticks(worker_pid) == start_ticks, f"worker pid {worker_pid} changed during {label}")
        k_count = after.k_count - before.k_count
        steps = after.steps - before.steps
        check(k_count > 0 and steps > 0, f"no decode steps during {label}")
        rows.append((label, (after.k_sum - before.k_sum) / k_count, (after.proposed - before.proposed) / steps,
                     int(steps), done_after - done_before, (after.k_at_most_1 - before.k_at_most_1) / k_count))
    stop.set()
    await background

    print(f"\nworker pid {worker_pid} unchanged (same /proc start time) through all phases; "
          f"metrics from {metrics_url}, {args.phase_s:.0f} s per phase\n")
    print("| phase | mean k per request (histogram sum/count) | proposed tokens per step (whole batch) | steps | requests completed |")
    print("|---|---:|---:|---:|---:|")
    for label, mean_k, proposed_per_step, steps, done, _ in rows:
        print(f"| {label} | {mean_k:.2f} | {proposed_per_step:.2f} | {steps} | {done} |")
    # Under fixed k=1 a request runs k=1 when prompt lookup has a match for it and k=0 when it has
    # none (k is never more than the proposer can offer), so its mean is below 1, but no step runs more.
    fixed_k, fixed_share_le_1 = rows[1][1], rows[1][5]
    check(fixed_share_le_1 > 0.999, f"under fixed k=1, {100 * (1 - fixed_share_le_1):.1f}% of request-steps ran k > 1")
    check(0.2 < fixed_k <= 1.0, f"mean k under fixed k=1 was {fixed_k:.2f}")
    check(rows[0][1] > 1.2 and rows[2][1] > 1.2, "goodput phases did not speculate more than k=1")
    print("OK: mean k moved with each swap, no worker restart")


def demo(args) -> None:
    prefix = private_prefix("swap")
    log_dir = Path(tempfile.mkdtemp(prefix="smartspec-demo-swap-"))
    up = Child("up", [*SMARTSPEC, "up", "--serve", "--redis", REDIS_URL, "--redis-prefix", prefix,
                      "--controller-port", "0", "--worker-port", "0", "--controller-metrics-port", "0",
                      "--worker-metrics-port", "0", "--log-dir", str(log_dir)], log_dir)
    pids: list[int] = []
    try:
        controller, _, controller_pid = up.wait_for(UP_LINE.format(role="controller"), 120).groups()
        worker, metrics_url, worker_pid = up.wait_for(UP_LINE.format(role="worker"), 900).groups()
        pids = [int(controller_pid), int(worker_pid)]
        up.wait_for(r"serving; Ctrl-C stops everything", 30)
        print(f"smartspec up (pid {up.pid}): controller {controller} (pid {controller_pid}), "
              f"worker {worker} (pid {worker_pid}), worker metrics {metrics_url}, redis prefix {prefix!r}")
        asyncio.run(scenario(args, controller, worker, metrics_url, int(worker_pid)))
    finally:
        code = up.stop(signal.SIGINT, timeout_s=60)
        time.sleep(0.5)
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        print(f"SIGINT to smartspec up: exit {code}; children still running: {alive or 'none'}; logs in {log_dir}")
        wipe_prefix(prefix)
        check(not alive, f"children {alive} survived SIGINT")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-s", type=float, default=10.0, help="seconds each phase is measured")
    parser.add_argument("--clients", type=int, default=3, help="concurrent generate loops")
    args = parser.parse_args()
    return main_wrapper(lambda: demo(args))


if __name__ == "__main__":
    sys.exit(main())

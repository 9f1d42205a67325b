"""The controller's tax on a worker: policy `off` with a controller attached vs `--controller none`.

Under `off` nothing about the tokens changes, so any difference in tokens/s between the two workers
is what the sidecar costs a step: the report, the wait for a plan, re-planning. Two workers over the
same loaded model, one streaming to a real controller (real Redis, loopback gRPC), one planning
locally; bursts of B requests (ignore_eos, exactly --new-tokens each) through the SDK, the two
workers alternating (who goes first rotates), median of --repeats per cell. Also prints the plan
wait per step the attached worker measured, and the CPU the controller and the Redis server spent
per attached step (/proc: user + system time; Redis's includes whatever else uses it meanwhile).

On this two-core machine torch's two threads and the controller share the cores, so the sidecar's
CPU shows up as the attached worker's lost tokens/s. `--controller-cpu N` gives the controller
core N alone, as a GPU server's spare cores would (this process, torch's threads and Redis keep the
others; torch gets one thread fewer), to show what is left of the tax without the sharing.

    python scripts/bench_sidecar.py [--batches 1,8,32] [--new-tokens 32] [--repeats 3] [--json out.json]
        [--controller-cpu N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid

import sys
import tempfile
from pathlib import Path

import redis
import torch

from smartspec import AsyncClient, Client
from smartspec.core.processes import free_port, start_child, stop_child, wait_port_open
from smartspec.worker.engine import EngineConfig
from smartspec.worker.model import load_model
from smartspec.worker.proposers import make_proposer
from smartspec.worker.server import WorkerOptions, WorkerServer

PROMPTS = [
    "Explain how a hash map handles collisions, with an example in Python.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List the steps to make bread at home, from flour to the first slice.",
    "What are the trade-offs between microservices and a monolith for a small team?",
]


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (/proc/PID/stat), 0 where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def redis_pid(url: str) -> int | None:
    """The Redis server's pid when it runs on this machine (INFO server), else None."""
    try:
        with redis.Redis.from_url(url) as client:
            return int(client.info("server")["process_id"])
    except (redis.RedisError, KeyError, ValueError):
        return None


def pin(controller_pid: int, cpu: int) -> None:
    """Core `cpu` for the controller alone; every other core for this process (torch's threads)."""
    others = os.sched_getaffinity(0) - {cpu}
    if cpu not in os.sched_getaffinity(0) or not others:
        raise SystemExit(f"--controller-cpu {cpu}: needs that core and at least one other")
    os.sched_setaffinity(controller_pid, {cpu})
    os.sched_setaffinity(0, others)
    torch.set_num_threads(len(others))


async def burst(address: str, batch: int, new_tokens: int) -> tuple[float, int]:
    """Submit `batch` requests at once; (seconds until the last one finished, tokens generated)."""
    async with AsyncClient(worker=address) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(
            client.complete(PROMPTS[i % len(PROMPTS)], max_tokens=new_tokens, ignore_eos=True)
            for i in range(batch)
        ))
        elapsed = time.perf_counter() - started
    return elapsed, sum(r.usage.completion_tokens for r in results)


def start_worker(model, name: str, controller: str | None, max_batch: int) -> WorkerServer:
    engine = EngineConfig(max_batch_size=max_batch, max_context_tokens=512, max_queue=64,
                          token_budget=max(2048, max_batch * 9), max_k=8)
    options = WorkerOptions(worker_id=f"sidecar-{name}-{uuid.uuid4().hex[:6]}", engine=engine,
                            controller=controller, local_policy="off", profile_steps=0, proposer_name="ngram")
    server = WorkerServer(model, make_proposer("ngram"), options)
    server.start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", default="")
    parser.add_argument("--controller-cpu", type=int, default=None,
                        help="give the controller this core alone (default: share every core, as `smartspec up` does)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    # The controller in its own process, as deployed (in this one it would share the worker's GIL).
    port = free_port()
    controller = start_child("controller", [
        sys.executable, "-m", "smartspec.cli", "controller", "--port", str(port), "--metrics-port", "0",
        "--redis", args.redis, "--redis-prefix", f"smartspec-sidecar:{uuid.uuid4().hex[:8]}:",
    ], Path(tempfile.mkdtemp(prefix="smartspec-sidecar-")))
    if not wait_port_open("127.0.0.1", port, 60):
        raise SystemExit(f"controller did not start:\n{controller.log_tail()}")
    if args.controller_cpu is not None:
        pin(controller.process.pid, args.controller_cpu)
    sidecar_pids = {"controller": controller.process.pid, "redis": redis_pid(args.redis)}
    address = f"127.0.0.1:{port}"
    with Client(controller=address) as admin:
        admin.set_policy("off")
    model = load_model()
    workers = {
        "attached": start_worker(model, "attached", address, max(batches)),
        "none": start_worker(model, "none", None, max(batches)),
    }
    deadline = time.monotonic() + 30
    while not workers["attached"].link.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    rows = []
    try:
        for name, server in workers.items():   # warm-up: first forwards allocate and page in
            asyncio.run(burst(f"127.0.0.1:{server.port}", 2, 4))
        for batch in batches:
            rates: dict[str, list[float]] = {name: [] for name in workers}
            link = workers["attached"].link
            wait_before, steps_before = link.plan_wait_ms_total, workers["attached"].engine.snapshot().steps
            sidecar_cpu_s = {name: 0.0 for name in sidecar_pids}
            for repeat in range(args.repeats):
                order = list(workers) if repeat % 2 == 0 else list(reversed(workers))
                for name in order:
                    attached = name == "attached"   # the sidecar's CPU counts during its worker's bursts only
                    cpu_before = {side: cpu_seconds(pid) for side, pid in sidecar_pids.items() if pid and attached}
                    elapsed, tokens = asyncio.run(burst(f"127.0.0.1:{workers[name].port}", batch, args.new_tokens))
                    if attached:
                        for side, before in cpu_before.items():
                            sidecar_cpu_s[side] += cpu_seconds(sidecar_pids[side]) - before
                    rates[name].append(tokens / elapsed)
            steps = workers["attached"].engine.snapshot().steps - steps_before
            row = {
                "batch": batch,
                "attached_tok_s": statistics.median(rates["attached"]),
                "none_tok_s": statistics.median(rates["none"]),
                "plan_wait_ms_per_step": (link.plan_wait_ms_total - wait_before) / max(1, steps),
                "fallback_steps": link.fallback_steps,
                "controller_cpu_ms_per_step": 1000.0 * sidecar_cpu_s["controller"] / max(1, steps),
                "redis_cpu_ms_per_step": 1000.0 * sidecar_cpu_s["redis"] / max(1, steps),
                "repeats": args.repeats,
            }
            row["ratio"] = row["attached_tok_s"] / row["none_tok_s"]
            rows.append(row)
            print(f"batch {batch:3d}: attached {row['attached_tok_s']:7.1f} tok/s, none {row['none_tok_s']:7.1f} "
                  f"tok/s, ratio {row['ratio']:.3f}, plan wait {row['plan_wait_ms_per_step']:.2f} ms/step, CPU per step: "
                  f"controller {row['controller_cpu_ms_per_step']:.2f} ms, Redis {row['redis_cpu_ms_per_step']:.2f} ms",
                  flush=True)
    finally:
        for server in workers.values():
            server.stop(grace=1)
        stop_child(controller)
    print("\n| batch | attached to controller (tok/s) | --controller none (tok/s) | ratio | plan wait per step (ms) "
          "| CPU per step: controller, Redis (ms) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch']} | {row['attached_tok_s']:.1f} | {row['none_tok_s']:.1f} | {row['ratio']:.3f} | "
              f"{row['plan_wait_ms_per_step']:.2f} | {row['controller_cpu_ms_per_step']:.2f}, "
              f"{row['redis_cpu_ms_per_step']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"new_tokens": args.new_tokens, "controller_cpu": args.controller_cpu, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()

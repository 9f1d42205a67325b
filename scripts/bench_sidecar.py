"""The controller's tax on a worker: policy `off` with a controller attached vs `--controller none`.

Under `off` nothing about the tokens changes, so any difference in tokens/s between the two workers
is what the sidecar costs a step: the report, the wait for a plan, re-planning. Two workers over the
same loaded model, one streaming to a real controller (real Redis, loopback gRPC), one planning
locally; bursts of B requests (ignore_eos, exactly --new-tokens each) through the SDK, the two
workers alternating (who goes first rotates), median of --repeats per cell. Also prints the plan
wait per step the attached worker measured.

    python scripts/bench_sidecar.py [--batches 1,8,32] [--new-tokens 32] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import sys
import tempfile
from pathlib import Path

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
            for repeat in range(args.repeats):
                order = list(workers) if repeat % 2 == 0 else list(reversed(workers))
                for name in order:
                    elapsed, tokens = asyncio.run(burst(f"127.0.0.1:{workers[name].port}", batch, args.new_tokens))
                    rates[name].append(tokens / elapsed)
            steps = workers["attached"].engine.snapshot().steps - steps_before
            row = {
                "batch": batch,
                "attached_tok_s": statistics.median(rates["attached"]),
                "none_tok_s": statistics.median(rates["none"]),
                "plan_wait_ms_per_step": (link.plan_wait_ms_total - wait_before) / max(1, steps),
                "fallback_steps": link.fallback_steps,
                "repeats": args.repeats,
            }
            row["ratio"] = row["attached_tok_s"] / row["none_tok_s"]
            rows.append(row)
            print(f"batch {batch:3d}: attached {row['attached_tok_s']:7.1f} tok/s, none {row['none_tok_s']:7.1f} "
                  f"tok/s, ratio {row['ratio']:.3f}, plan wait {row['plan_wait_ms_per_step']:.2f} ms/step",
                  flush=True)
    finally:
        for server in workers.values():
            server.stop(grace=1)
        stop_child(controller)
    print("\n| batch | attached to controller (tok/s) | --controller none (tok/s) | ratio | plan wait per step (ms) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch']} | {row['attached_tok_s']:.1f} | {row['none_tok_s']:.1f} | {row['ratio']:.3f} | "
              f"{row['plan_wait_ms_per_step']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"new_tokens": args.new_tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

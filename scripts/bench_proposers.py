"""Proposers side by side on the real default model: none (k = 0) vs ngram vs draft at a fixed k.

    python scripts/bench_proposers.py [--new-tokens 48] [--k 4] [--concurrency 16] [--datasets summarise,chat]

One run, one process: the default target (SmolLM2-135M-Instruct, fp32, CPU) is loaded once and
served by an in-process worker (real gRPC on a free loopback port, local `fixed` policy, no
controller) per proposer, in turn. For the first prompt of each of --datasets (default: one
summarise and one chat prompt, from `smartspec.bench.datasets`), greedy, `ignore_eos` so every
request makes exactly --new-tokens: batch 1 (one request) and --concurrency identical requests sent
at once through the SDK.
Reported per row: tokens per decode step (mean accepted length + 1 from the target), acceptance
rate (accepted / tested positions), wall time of the whole batch and the speedup vs `none` in
the same row group; and whether every output equals the k = 0 batch-1 output (lossless).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass

from smartspec import AsyncClient
from smartspec.bench.datasets import load_dataset, names
from smartspec.worker.cli import build_proposer
from smartspec.worker.engine import EngineConfig
from smartspec.worker.model import load_model
from smartspec.worker.server import WorkerOptions, WorkerServer

PROPOSERS = ("none", "ngram", "draft")


@dataclass(frozen=True)
class Row:
    prompt: str
    batch: int
    proposer: str
    tokens_per_step: float
    acceptance: float
    wall_s: float
    outputs: tuple[str, ...]


def pick_prompts(new_tokens: int, datasets: list[str]) -> list[tuple[str, list[dict[str, str]]]]:
    picked = []
    for dataset in datasets:
        prompt = load_dataset(dataset, 1, seed=0, max_tokens=new_tokens, max_prompt_tokens=300).prompts[0]
        source = prompt.source.split(" (")[0]   # drop the file path
        picked.append((f"{dataset}: {source}", prompt.as_message_dicts()))
    return picked


async def run_batch(address: str, messages, copies: int, new_tokens: int):
    async with AsyncClient(worker=address, stream_timeout=600) as client:
        began = time.perf_counter()
        results = await asyncio.gather(*(
            client.complete(messages, max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            for _ in range(copies)))
        return time.perf_counter() - began, results


def serve(model, proposer_name: str, k: int, batch: int) -> WorkerServer:
    """An in-process worker running every request at k (0 for `none`)."""
    config = EngineConfig(max_batch_size=batch, max_context_tokens=1024, token_budget=batch * (k + 1) + 512, max_k=k)
    proposer = build_proposer("ngram" if proposer_name == "none" else proposer_name, model, draft="auto",
                              max_slots=batch, max_tokens=1024)
    policy = "off" if proposer_name == "none" else f"fixed:{k}"
    options = WorkerOptions(worker_id=f"bench-{proposer_name}", engine=config, local_policy=policy,
                            profile_steps=0, proposer_name=proposer_name)
    server = WorkerServer(model, proposer, options)
    server.start()
    return server


def measure(model, prompts, k: int, batch: int, new_tokens: int) -> list[Row]:
    rows = []
    for proposer_name in PROPOSERS:
        server = serve(model, proposer_name, k, batch)
        address = f"127.0.0.1:{server.port}"
        try:
            asyncio.run(run_batch(address, prompts[0][1], 1, 8))        # warm-up: first-call costs
            for label, messages in prompts:
                for copies in (1, batch):
                    wall, results = asyncio.run(run_batch(address, messages, copies, new_tokens))
                    stats = [r.speculation for r in results]
                    rows.append(Row(label, copies, proposer_name,
                                    statistics.mean(s.mean_accepted_length for s in stats),
                                    statistics.mean(s.acceptance_rate for s in stats) if proposer_name != "none" else 0.0,
                                    wall, tuple(r.text for r in results)))
                    print(f"  {proposer_name:5s} {label[:40]:40s} x{copies:<2d} {wall:6.2f} s", file=sys.stderr, flush=True)
        finally:
            server.stop(1.0)
    return rows


def table(rows: list[Row]) -> tuple[str, bool]:
    baseline = {(r.prompt, r.batch): r for r in rows if r.proposer == "none"}
    reference = {r.prompt: r.outputs[0] for r in rows if r.proposer == "none" and r.batch == 1}
    lines = ["| prompt | batch | proposer | tokens/step | acceptance | wall s | speedup vs none | output = k=0 |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    all_equal = True
    for r in sorted(rows, key=lambda r: (r.prompt, r.batch, PROPOSERS.index(r.proposer))):
        same = all(text == reference[r.prompt] for text in r.outputs)
        all_equal &= same
        base = baseline[(r.prompt, r.batch)]
        acceptance = "-" if r.proposer == "none" else f"{r.acceptance:.2f}"
        lines.append(f"| {r.prompt} | {r.batch} | {r.proposer} | {r.tokens_per_step:.2f} | {acceptance} | "
                     f"{r.wall_s:.2f} | {base.wall_s / r.wall_s:.2f}x | {'OK' if same else 'MISMATCH'} |")
    return "\n".join(lines), all_equal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--datasets", default="summarise,chat", help=f"comma-separated, of: {', '.join(names())}")
    args = parser.parse_args()
    datasets = [name for name in args.datasets.split(",") if name]
    if unknown := sorted(set(datasets) - set(names())):
        parser.error(f"unknown dataset(s): {', '.join(unknown)}")

    began = time.perf_counter()
    model = load_model("SmolLM2-135M-Instruct")
    print(f"loaded {model.name} in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    prompts = pick_prompts(args.new_tokens, datasets)
    rows = measure(model, prompts, args.k, args.concurrency, args.new_tokens)
    text, all_equal = table(rows)
    print(f"\n{model.name}, fp32 CPU, greedy, {args.new_tokens} new tokens per request, fixed k = {args.k}, "
          f"draft = built 'auto'; wall = whole batch\n")
    print(text)
    print(f"\noutputs vs k = 0: {'OK (all equal)' if all_equal else 'MISMATCH'}  (total {time.perf_counter() - began:.0f} s)")
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())

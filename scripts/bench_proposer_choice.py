"""Proposers side by side under the goodput policy, against no speculation, on work that repeats itself and work that does not.

    python scripts/bench_proposer_choice.py [--proposers none,ngram,suffix,ngram+suffix,draft,ngram+suffix+draft]
        [--workloads summaries,code-edits,chat,multi-turn-edit,templated,no-repeat]
        [--prompts 6] [--burst 12] [--max-tokens 128] [--profile-all] [--json out.json]

One process, the default target (SmolLM2-135M-Instruct, fp32, CPU) loaded once. Each cell (a
workload, one at a time or a burst) gets a fresh in-process worker per proposer (real gRPC on a
loopback port, `--controller none` with the local goodput policy; `none` runs policy `off`; a
worker with a draft model runs its startup profile, so its plan knows what drafting costs; with
the draft among several proposers, goodput plans (proposer, k) per row: worker/choice_plan.py), so
cross-request memory (suffix) starts empty in every cell and only learns from the cell's own
earlier requests. One at a time: --prompts requests in dataset order (a multi-turn conversation's
turns in turn order). Burst: --burst different prompts sent at once. Who goes first rotates per cell.

Workloads: summaries, code edits and chat are bench_unseen.py's (npm's docs and JavaScript, open
questions: text unlike the project's datasets); multi-turn-edit, templated and no-repeat are the
repeating workloads and their control from smartspec.bench.datasets. Reported per cell and proposer:
tokens per step (mean accepted length + 1), wall time, speedup vs `none` in the same cell, and
whether every output equals `none`'s token for token (greedy); for a list of proposers, the share
of proposing rows each member filled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_unseen  # noqa: E402  (scripts/ is not a package)
from smartspec import AsyncClient  # noqa: E402
from smartspec.bench.datasets import load_dataset  # noqa: E402
from smartspec.worker.cli import build_proposer  # noqa: E402
from smartspec.worker.engine import EngineConfig  # noqa: E402
from smartspec.worker.model import load_model  # noqa: E402
from smartspec.worker.server import WorkerOptions, WorkerServer  # noqa: E402

DEFAULT_PROPOSERS = "none,ngram,suffix,ngram+suffix,draft,ngram+suffix+draft"
DEFAULT_WORKLOADS = "summaries,code-edits,chat,multi-turn-edit,templated,no-repeat"
REPEATING = ("multi-turn-edit", "templated", "no-repeat")


@dataclass(frozen=True)
class Cell:
    workload: str
    at_once: int
    proposer: str
    wall_s: float
    tokens_per_step: float
    acceptance: float
    outputs: list[str]
    member_shares: dict[str, float]  # a proposer list: share of proposing rows each member filled


def prompts_for(workload: str, count: int, max_tokens: int) -> list[list[dict[str, str]]]:
    if workload in bench_unseen.WORKLOADS:
        return bench_unseen.WORKLOADS[workload](count, random.Random(0))
    if workload in REPEATING:
        return [p.as_message_dicts() for p in load_dataset(workload, count, seed=0, max_tokens=max_tokens).prompts]
    raise SystemExit(f"unknown workload {workload!r} (known: {', '.join([*bench_unseen.WORKLOADS, *REPEATING])})")


def serve(model, proposer: str, batch: int, max_k: int, profile_all: bool = False) -> WorkerServer:
    config = EngineConfig(max_batch_size=batch, max_context_tokens=2048, token_budget=2048, max_k=max_k)
    name = "ngram" if proposer == "none" else proposer.replace("+", ",")
    built = build_proposer(name, model, draft="auto", max_slots=batch, max_tokens=2048)
    # The startup profile fits the draft model's own cost terms; the model-free proposers' costs are
    # the default model's (fitted on this machine), so they skip the profile's ~half a minute, unless
    # profile_all: then every speculating column starts from its own profile of today's machine.
    options = WorkerOptions(worker_id=f"bench-{proposer}", engine=config,
                            local_policy="off" if proposer == "none" else "goodput",
                            profile_steps=3 if "draft" in proposer or (profile_all and proposer != "none") else 0, proposer_name=name)
    server = WorkerServer(model, built, options)
    server.start()
    return server


async def run_requests(address: str, prompts, at_once: int, max_tokens: int):
    """Every prompt, at_once of them in flight together; (wall s, results in prompt order)."""
    async with AsyncClient(worker=address, stream_timeout=1200) as client:
        await client.complete("Warm up.", max_tokens=4)
        began = time.perf_counter()
        results = []
        for start in range(0, len(prompts), at_once):
            results += await asyncio.gather(*(
                client.complete(messages, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
                for messages in prompts[start:start + at_once]))
        return time.perf_counter() - began, results


def measure(model, proposers, workload: str, prompts, at_once: int, max_tokens: int, rotate: int,
            profile_all: bool = False) -> list[Cell]:
    order = proposers[rotate % len(proposers):] + proposers[:rotate % len(proposers)]
    cells = []
    for proposer in order:
        server = serve(model, proposer, max(at_once, 1), max_k=8, profile_all=profile_all)
        try:
            wall, results = asyncio.run(run_requests(f"127.0.0.1:{server.port}", prompts, at_once, max_tokens))
        finally:
            server.stop(1.0)
        stats = [r.speculation for r in results]
        counts = getattr(server.proposer, "proposals_by_member", [])
        shares = {name: count / max(1, sum(counts)) for name, count in zip(getattr(server.proposer, "names", []), counts)}
        cells.append(Cell(workload, at_once, proposer, wall, statistics.mean(s.mean_accepted_length for s in stats),
                          statistics.mean(s.acceptance_rate for s in stats), [r.text for r in results], shares))
        print(f"  {workload:16s} x{at_once:<3d} {proposer:13s} {wall:7.2f} s  tokens/step "
              f"{cells[-1].tokens_per_step:.2f}  " + " ".join(f"{n} {v:.0%}" for n, v in shares.items()),
              file=sys.stderr, flush=True)
    return cells


def table(cells: list[Cell], proposers: list[str]) -> tuple[str, bool]:
    base = {(c.workload, c.at_once): c for c in cells if c.proposer == "none"}
    lines = ["| workload | at once | " + " | ".join(f"{p}: tok/step, speedup" for p in proposers if p != "none")
             + " | outputs = none |", "|---|---:|" + "---|" * (len(proposers) - 1) + "---|"]
    all_equal = True
    keys = sorted(base, key=lambda key: (key[1], [c.workload for c in cells].index(key[0])))
    for workload, at_once in keys:
        row = {c.proposer: c for c in cells if (c.workload, c.at_once) == (workload, at_once)}
        reference = base[(workload, at_once)]
        same = all(row[p].outputs == reference.outputs for p in row)
        all_equal &= same
        parts = [f"{row[p].tokens_per_step:.2f}, {reference.wall_s / row[p].wall_s:.2f}x" for p in proposers
                 if p != "none"]
        lines.append(f"| {workload} | {at_once} | " + " | ".join(parts) + f" | {'yes' if same else 'NO'} |")
    return "\n".join(lines), all_equal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proposers", default=DEFAULT_PROPOSERS)
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    parser.add_argument("--prompts", type=int, default=6, help="requests per workload, one at a time (0: no such cells)")
    parser.add_argument("--burst", type=int, default=12, help="requests at once in the burst cells (0: none)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--profile-all", action="store_true",
                        help="every speculating column runs the startup profile (default: only those with a draft)")
    parser.add_argument("--json", default="", help="write every cell (outputs included) here")
    args = parser.parse_args()
    proposers = args.proposers.split(",")
    if "none" not in proposers:
        parser.error("--proposers needs 'none' (the baseline)")
    began = time.perf_counter()
    model = load_model("SmolLM2-135M-Instruct")
    cells: list[Cell] = []
    for index, workload in enumerate(args.workloads.split(",")):
        if args.prompts:
            cells += measure(model, proposers, workload, prompts_for(workload, args.prompts, args.max_tokens), 1,
                             args.max_tokens, rotate=2 * index, profile_all=args.profile_all)
        if args.burst:
            cells += measure(model, proposers, workload, prompts_for(workload, args.burst, args.max_tokens),
                             args.burst, args.max_tokens, rotate=2 * index + 1, profile_all=args.profile_all)
    text, all_equal = table(cells, proposers)
    print(f"\n{model.name}, fp32 CPU, greedy, {args.max_tokens} tokens per request (ignore_eos), local goodput "
          f"policy per proposer (`none`: off), a fresh worker per cell; speedup = none's wall / proposer's wall\n")
    print(text)
    listed = [c for c in cells if c.member_shares]
    if listed:
        print("\nShare of proposing rows each member filled:\n")
        print("| workload | at once | proposers | shares |\n|---|---:|---|---|")
        for c in listed:
            print(f"| {c.workload} | {c.at_once} | {c.proposer} | "
                  + ", ".join(f"{name} {share:.0%}" for name, share in c.member_shares.items()) + " |")
    print(f"\noutputs vs none: {'all equal' if all_equal else 'MISMATCH'}  (total {time.perf_counter() - began:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(c) for c in cells]))
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())

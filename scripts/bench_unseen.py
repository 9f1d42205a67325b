"""Policies on work the project was never tuned on: one at a time, and in bursts that fill the batch.

The bench datasets (bench/datasets.py) are built from Python's docs and standard library. This run
uses text from elsewhere on the machine: npm's command documentation (summaries), npm's own
JavaScript source (code edits), and open questions written for this script (chat, where prompt
lookup has little to copy). Greedy, --max-tokens per request, through the SDK against a stack
started as `smartspec up` does (Redis, a controller process, a worker process).

Cells: workload (summaries, code edits, chat) x mode (one at a time; a burst of N requests at
once). In every cell each policy runs the same prompts, back to back, rotating who goes first per
repeat. Reported per cell and policy: mean request latency, throughput (tokens / wall time), both
as ratios against `off` in the same repeat (median over repeats), the plan wait per worker step
(from the worker's /metrics), and whether every output equals `off`'s token for token.

    python scripts/bench_unseen.py [--policies off,fixed:3,fixed:5,goodput] [--modes 1,12,32]
        [--prompts 4] [--max-tokens 128] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import contextlib
import tempfile

from smartspec import AsyncClient
from smartspec.bench.cli import wait_idle
from smartspec.core.policy_spec import parse_policy_list, parse_policy_spec, split_policy_list
from smartspec.core.processes import free_port, start_child, stop_all
from smartspec.core.launch import Ports, controller_argv, start_redis, wait_serving, worker_argv

NPM = Path("/usr/lib/node_modules/npm")

CHAT = [
    "What should I pack for a week of hiking in the Scottish Highlands in October?",
    "Why do cats purr, and do they only do it when they are happy?",
    "How did the printing press change how people in Europe learned to read?",
    "Give me three ideas for a birthday party for a seven-year-old who loves dinosaurs.",
    "What is the difference between weather and climate, in plain words?",
    "How can I get better at remembering people's names when I meet them?",
    "Why is the sky red at sunset but blue at noon?",
    "What are some good habits for keeping houseplants alive in a dark apartment?",
    "Explain why bread goes stale, and whether the fridge helps or hurts.",
    "What was daily life like for a sailor on a merchant ship in the 1700s?",
    "How should a beginner start learning to play the guitar?",
    "Why do some people get motion sickness on boats and others do not?",
]

CODE_TASKS = [
    "Add JSDoc comments to every function in this JavaScript and return the whole file.",
    "Rewrite this JavaScript to use async/await wherever it uses promises or callbacks; return all of the code.",
    "Rename the local variables in this JavaScript to clearer names and return the full edited code.",
    "Add input validation with helpful error messages to this JavaScript; return the complete code.",
]


def _chunk(text: str, max_chars: int) -> str:
    return text[:max_chars].rsplit("\n", 1)[0]


def summary_prompts(count: int, rng: random.Random) -> list[list[dict[str, str]]]:
    files = sorted((NPM / "docs" / "content" / "commands").glob("*.md"))
    if not files:
        raise SystemExit(f"no npm docs under {NPM}: install nodejs/npm or pick other text")
    chosen = rng.sample(files, count)
    prompts = []
    for path in chosen:
        body = re.sub(r"^---.*?---\s*", "", path.read_text(errors="replace"), flags=re.S)
        prompts.append([{"role": "user", "content":
                         "Summarise this documentation for a new user in one paragraph, keeping the "
                         f"option names exactly:\n\n{_chunk(body, 1300)}"}])
    return prompts


def code_prompts(count: int, rng: random.Random) -> list[list[dict[str, str]]]:
    files = sorted(p for p in (NPM / "lib" / "commands").glob("*.js") if 1200 < p.stat().st_size < 6000)
    chosen = rng.sample(files, count)
    return [[{"role": "user", "content": f"{CODE_TASKS[i % len(CODE_TASKS)]}\n\n```js\n"
              f"{_chunk(path.read_text(errors='replace'), 1100)}\n```"}] for i, path in enumerate(chosen)]


def chat_prompts(count: int, rng: random.Random) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": q}] for q in rng.sample(CHAT, count)]


WORKLOADS = {"summaries": summary_prompts, "code-edits": code_prompts, "chat": chat_prompts}


def metric_totals(url: str) -> tuple[float, float]:
    """(plan wait seconds, steps) so far, from the worker's Prometheus text."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    wait = re.search(r"^smartspec_worker_plan_wait_seconds_sum (\S+)$", text, re.M)
    steps = re.search(r"^smartspec_worker_steps_total (\S+)$", text, re.M)
    return float(wait.group(1)) if wait else 0.0, float(steps.group(1)) if steps else 0.0


async def run_cell(client, prompts, burst: int, max_tokens: int) -> dict:
    """`burst` = 1: the prompts one after another; else `burst` requests at once (prompts cycled)."""
    async def one(messages):
        started = time.perf_counter()
        result = await client.complete(messages, max_tokens=max_tokens, temperature=0.0)
        return time.perf_counter() - started, result

    started = time.perf_counter()
    if burst == 1:
        outcomes = [await one(m) for m in prompts]
    else:
        outcomes = await asyncio.gather(*(one(prompts[i % len(prompts)]) for i in range(burst)))
    wall = time.perf_counter() - started
    tokens = sum(r.usage.completion_tokens for _, r in outcomes)
    return {
        "mean_latency_s": statistics.fmean(lat for lat, _ in outcomes),
        "throughput_tok_s": tokens / wall,
        "tokens": tokens,
        "texts": [r.text for _, r in outcomes],
        "accepted": sum(r.speculation.accepted_tokens for _, r in outcomes),
        "proposed": sum(r.speculation.proposed_tokens for _, r in outcomes),
    }


async def bench(worker: str, controller: str, metrics_url: str, args) -> list[dict]:
    rng = random.Random(args.seed)
    workloads = {name: WORKLOADS[name](args.prompts, rng) for name in args.workloads.split(",")}
    modes = [int(m) for m in args.modes.split(",")]
    policies = split_policy_list(args.policies)
    rows = []
    async with AsyncClient(worker=worker, controller=controller) as client:
        await client.complete("Warm up.", max_tokens=8)
        for name, prompts in workloads.items():
            for burst in modes:
                for repeat in range(args.repeats):
                    order = policies[repeat % len(policies):] + policies[:repeat % len(policies)]
                    for spec in order:
                        policy_name, params = parse_policy_spec(spec)
                        await client.set_policy(policy_name, **params)
                        await wait_idle(client)
                        wait_before, steps_before = metric_totals(metrics_url)
                        cell = await run_cell(client, prompts, burst, args.max_tokens)
                        wait_after, steps_after = metric_totals(metrics_url)
                        cell.update(workload=name, burst=burst, repeat=repeat, policy=spec,
                                    plan_wait_ms_per_step=1000 * (wait_after - wait_before)
                                    / max(1.0, steps_after - steps_before))
                        rows.append(cell)
                        print(f"{name:10s} burst={burst:2d} r{repeat} {spec:10s} latency {cell['mean_latency_s']:6.2f} s "
                              f"throughput {cell['throughput_tok_s']:6.1f} tok/s plan wait "
                              f"{cell['plan_wait_ms_per_step']:.2f} ms/step", file=sys.stderr, flush=True)
    return rows


def summarise(rows: list[dict], policies: list[str]) -> list[dict]:
    """Per (workload, burst, policy): median over repeats of latency and throughput vs `off`."""
    table = []
    cells = sorted({(r["workload"], r["burst"]) for r in rows}, key=lambda c: (c[1], c[0]))
    for workload, burst in cells:
        by = {(r["policy"], r["repeat"]): r for r in rows if r["workload"] == workload and r["burst"] == burst}
        repeats = sorted({rep for _, rep in by})
        for policy in policies:
            lat, thr, equal, wait = [], [], True, []
            for rep in repeats:
                base, row = by.get(("off", rep)), by.get((policy, rep))
                if base is None or row is None:
                    continue
                lat.append(row["mean_latency_s"] / base["mean_latency_s"])
                thr.append(row["throughput_tok_s"] / base["throughput_tok_s"])
                equal &= row["texts"] == base["texts"]
                wait.append(row["plan_wait_ms_per_step"])
            table.append({"workload": workload, "burst": burst, "policy": policy,
                          "latency_vs_off": statistics.median(lat), "throughput_vs_off": statistics.median(thr),
                          "outputs_equal_off": equal, "plan_wait_ms_per_step": statistics.median(wait)})
    return table


def combined_table(paths: list[str]) -> list[dict]:
    """One table over several runs of the same cells: run j's repeat r becomes a repeat of its own."""
    rows, policies = [], None
    for run, path in enumerate(paths):
        data = json.loads(Path(path).read_text())
        policies = policies or split_policy_list(data["args"]["policies"])
        rows += [{**row, "repeat": (run, row["repeat"])} for row in data["rows"]]
    return summarise(rows, policies)


def markdown(table: list[dict]) -> str:
    lines = ["| workload | requests at once | policy | mean latency vs off | throughput vs off | "
             "outputs = off | plan wait (ms/step) |", "|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['workload']} | {t['burst']} | {t['policy']} | {t['latency_vs_off']:.3f}x | "
                     f"{t['throughput_vs_off']:.3f}x | {'yes' if t['outputs_equal_off'] else 'NO'} | "
                     f"{t['plan_wait_ms_per_step']:.2f} |")
    return "\n".join(lines)


@contextlib.contextmanager
def local_stack(redis_url: str):
    """A private Redis (unless given), a controller and a worker process, as `smartspec up` starts them."""
    host = "127.0.0.1"
    log_dir = Path(tempfile.mkdtemp(prefix="smartspec-unseen-"))
    ports = Ports(*(free_port(host) for _ in range(4)))
    children = []
    try:
        if not redis_url:
            child, redis_url = start_redis(log_dir)
            children.append(child)
        children.append(start_child("controller", controller_argv(host, ports, redis_url, "smartspec-unseen:"), log_dir))
        wait_serving(children[-1], f"{host}:{ports.controller}", 120, "connecting to Redis")
        children.append(start_child("worker", worker_argv(host, ports, "", "ngram"), log_dir))
        wait_serving(children[-1], f"{host}:{ports.worker}", 900, "loading the model, profiling")
        print(f"stack up (logs in {log_dir})", file=sys.stderr)
        yield f"{host}:{ports.worker}", f"{host}:{ports.controller}", ports
    finally:
        stop_all(children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="off,fixed:3,fixed:5,goodput")
    parser.add_argument("--workloads", default="summaries,code-edits,chat")
    parser.add_argument("--modes", default="1,12,32", help="1 = one at a time; N = a burst of N at once")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per workload (bursts cycle them)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redis", default="", help="Redis URL (default: a private redis-server)")
    parser.add_argument("--json", default="")
    parser.add_argument("--from-json", default="",
                        help="measure nothing: the table of earlier runs' JSON files (comma-separated; "
                             "each run's repeats become further repeats)")
    args = parser.parse_args()
    if args.from_json:
        print(markdown(combined_table(args.from_json.split(","))))
        return
    policies = split_policy_list(args.policies)
    if "off" not in policies:
        raise SystemExit("--policies must include off (every ratio is against it)")
    try:
        parse_policy_list(args.policies)   # a typo is a usage error now, not after the stack has started
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    started = time.time()
    with local_stack(args.redis) as (worker, controller, ports):
        rows = asyncio.run(bench(worker, controller, f"http://127.0.0.1:{ports.worker_metrics}/metrics", args))
    table = summarise(rows, policies)
    print(markdown(table))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "started_unix_s": started, "table": table,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

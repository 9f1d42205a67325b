"""`smartspec bench`: open-loop load across policies and rates on one running stack.

    smartspec bench --worker 127.0.0.1:50061 --controller 127.0.0.1:50051 \\
        --dataset summarise --rates 0.1,0.2,0.4,0.8 --policies off,fixed:1,fixed:3,fixed:5,goodput \\
        --requests 40 --json bench.json --markdown bench.md --plot bench.png
    smartspec bench --start ...        # start Redis, a controller and a worker first (as `smartspec up`)

For each policy (switched through the controller's admin API, workers keep running), for each rate,
the same prompts are sent at the same seeded arrival times, so points differ only by policy and load.
Requests are greedy (unless --temperature) and ignore EOS, so every one generates exactly its
max_tokens and points compare equal work.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from smartspec.core.config import add_flag, add_option

DEFAULT_POLICIES = "off,fixed:1,fixed:3,fixed:5,goodput"


def configure(parser) -> None:
    add_option(parser, "--worker", default="", help="worker HOST:PORT (with --controller; else use --start)")
    add_option(parser, "--controller", default="", help="controller HOST:PORT (its admin API switches policies)")
    add_flag(parser, "--start", help="start Redis (unless --redis), a controller and a worker, as `smartspec up`")
    add_option(parser, "--redis", default="", help="with --start: use this Redis URL instead of a private one")
    add_option(parser, "--redis-prefix", default="smartspec-bench:", help="with --start: the controller's Redis key prefix")
    add_option(parser, "--model", default="", help="with --start: worker model (default: the worker's default)")
    add_option(parser, "--proposer", default="ngram", help="with --start: worker proposer")
    add_option(parser, "--startup-timeout", default=900.0, type=float, help="with --start: seconds to wait for health")
    add_option(parser, "--dataset", default="summarise",
               help="summarise, code-edit, chat, mixed, multi-turn-edit, templated or no-repeat (bench/datasets.py)")
    add_option(parser, "--max-tokens", default=0, type=int, help="completion tokens per request (0: dataset default)")
    add_option(parser, "--rates", default="0.1,0.2,0.4,0.8", help="request rates (req/s), comma-separated")
    add_option(parser, "--policies", default=DEFAULT_POLICIES,
               help="policy specs NAME[:ARGS], comma-separated (fixed:3, goodput:max_k=6,min_gain=0.05)")
    add_option(parser, "--requests", default=40, type=int, help="measured requests per point")
    add_option(parser, "--repeats", default=1, type=int,
               help="measure every point this many times (same prompts and arrivals) and keep the median "
                    "repeat by mean latency as the point's row (the claim table uses the mean over all "
                    "repeats): a shared machine's slow stretches then hit no policy alone")
    add_option(parser, "--warmup", default=2, type=int, help="unmeasured requests before the first point")
    add_option(parser, "--arrival", default="poisson", choices=["poisson", "gamma"], help="arrival process")
    add_option(parser, "--cv", default=1.0, type=float, help="gamma arrivals: CV of the gaps")
    add_option(parser, "--phases", default="", help="phased trace DURATION_S:RATE,... (replaces --rates)")
    add_option(parser, "--temperature", default=0.0, type=float, help="sampling temperature (0 = greedy)")
    add_option(parser, "--seed", default=0, type=int, help="seed for prompts and arrivals")
    add_option(parser, "--json", default="bench.json", help="write records here ('' = no JSON)")
    add_option(parser, "--markdown", default="", help="write the markdown table here")
    add_option(parser, "--plot", default="", help="write the latency/speedup PNG here")
    add_option(parser, "--from-json", default="",
               help="measure nothing: print the tables of an earlier run's JSON and write --markdown/--plot from it")


@contextmanager
def _stack(args) -> Iterator[tuple[str, str]]:
    """(worker, controller) addresses: given, or of children started like `smartspec up` does."""
    if not args.start:
        if not (args.worker and args.controller):
            raise ValueError("give --worker and --controller, or --start")
        yield args.worker, args.controller
        return
    from smartspec.core.processes import free_port, start_child, stop_all
    from smartspec.core.launch import Ports, controller_argv, start_redis, wait_serving, worker_argv

    host = "127.0.0.1"
    log_dir = Path(tempfile.mkdtemp(prefix="smartspec-bench-"))
    ports = Ports(*(free_port(host) for _ in range(4)))
    children = []
    try:
        redis_url = args.redis
        if not redis_url:
            child, redis_url = start_redis(log_dir)
            children.append(child)
        controller = start_child("controller", controller_argv(host, ports, redis_url, args.redis_prefix), log_dir)
        children.append(controller)
        wait_serving(controller, f"{host}:{ports.controller}", args.startup_timeout, "connecting to Redis")
        worker = start_child("worker", worker_argv(host, ports, args.model, args.proposer), log_dir)
        children.append(worker)
        wait_serving(worker, f"{host}:{ports.worker}", args.startup_timeout, "loading the model, profiling")
        print(f"stack up (logs in {log_dir})", file=sys.stderr)
        yield f"{host}:{ports.worker}", f"{host}:{ports.controller}"
    finally:
        stop_all(children)


async def wait_idle(client, timeout_s: float = 600.0) -> None:
    """Let the previous point drain (no running or queued request) before the next starts."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = await client.worker_info()
        if info.running_requests == 0 and info.queued_requests == 0:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the worker did not become idle between points")


def schedule(policies: int, points: int, repeats: int) -> list[tuple[int, int, int]]:
    """(point, repeat, policy) indices in run order.

    Rate by rate; within a rate, `repeats` rounds over every policy, each round starting one policy
    later. On a shared machine whose speed drifts, policies measured back to back at the same rate
    see the same machine, and no policy always runs first after a rate change.
    """
    order = []
    for point in range(points):
        for repeat in range(repeats):
            for offset in range(policies):
                order.append((point, repeat, (repeat + offset) % policies))
    return order


def median_repeat(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median mean latency (the lower one for an even count), as measured,
    plus every repeat's mean latency: one real point rather than a blend of several."""
    ranked = sorted(records, key=lambda r: r["mean_latency_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["repeats"] = len(records)
    chosen["repeat_mean_latency_s"] = [r["mean_latency_s"] for r in records]
    return chosen


async def bench(client, *, dataset, policies, rates, phases, requests: int, warmup: int, arrival: str, cv: float,
                temperature: float, seed: int, set_policy=None,
                snapshot=None, repeats: int = 1) -> list[dict[str, Any]]:
    """Run every (policy, rate) point `repeats` times and return one record per point (the median
    repeat, see `median_repeat`), ordered by policy then rate.

    `set_policy(name, params)` switches the policy (default: the client's admin API);
    `snapshot()` (optional, async) returns extra fields stored with each record after its point,
    e.g. the cost model the controller has fitted by then.
    """
    from tqdm import tqdm

    from smartspec.bench.arrivals import make_arrivals, mean_rate
    from smartspec.bench.loadgen import run_point, summarise_point

    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    set_policy = set_policy or (lambda name, params: client.set_policy(name, **params))
    prompts = list(dataset.prompts[:requests])
    points = [None] if phases else list(rates)
    bar = tqdm(total=len(policies) * len(points) * len(prompts) * repeats, desc="bench", unit="req", file=sys.stderr)
    measured: dict[tuple[int, int], list[dict[str, Any]]] = {}
    if warmup:
        await set_policy(policies[0][1], policies[0][2])
        await asyncio.gather(*(client.chat(p.as_message_dicts(), max_tokens=8).collect() for p in prompts[:warmup]))
    active = None
    for point, repeat, which in schedule(len(policies), len(points), repeats):
        label, name, params = policies[which]
        if which != active:
            await set_policy(name, params)
            active = which
        rate = points[point]
        await wait_idle(client)
        arrivals = make_arrivals(len(prompts), rate, process=arrival, cv=cv, phases=phases, seed=seed)
        offered = mean_rate(phases) if phases else rate
        bar.set_postfix_str(f"{label} @ {offered:g} req/s" + (f" ({repeat + 1}/{repeats})" if repeats > 1 else ""))
        started = time.time()
        outcomes = await run_point(client, prompts, arrivals, temperature=temperature, seed=seed,
                                   on_done=lambda _o: bar.update(1))
        record = {"policy": label, "rate": offered, "group": dataset.name, **summarise_point(outcomes),
                  "arrivals": "phased" if phases else arrival, "started_unix_s": started}
        if snapshot is not None:
            record.update(await snapshot())
        measured.setdefault((which, point), []).append(record)
        bar.write(f"{label:>16} @ {offered:g} req/s: mean latency {record['mean_latency_s']:.2f} s, "
                  f"accept {record['acceptance_rate']:.2f}, mean k {record['mean_k']:.2f}, "
                  f"failed {record['failed']}" + (f" (repeat {repeat + 1})" if repeats > 1 else ""))
    bar.close()
    return [median_repeat(measured[(which, point)]) if repeats > 1 else measured[(which, point)][0]
            for which in range(len(policies)) for point in range(len(points))]


@dataclass(frozen=True)
class BenchInputs:
    """What a bench run measures, read and checked from its flags before anything starts."""

    policies: list[tuple[str, str, dict[str, Any]]]   # (label, name, params), see core.policy_spec
    rates: list[float]
    phases: Any
    dataset: Any


def read_inputs(args) -> BenchInputs:
    """The run's policies, rates or phases and prompts; ValueError (PolicyError among them)
    naming what is wrong."""
    from smartspec.bench.arrivals import parse_phases
    from smartspec.bench.datasets import load_dataset
    from smartspec.core.policy_spec import parse_policy_list

    policies = parse_policy_list(args.policies)
    phases = parse_phases(args.phases) if args.phases else None
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    dataset = load_dataset(args.dataset, args.requests, seed=args.seed, max_tokens=args.max_tokens or None)
    if args.requests < 1:
        raise ValueError("--requests must be >= 1")
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    return BenchInputs(policies, rates, phases, dataset)


def stack_facts(info, cost: dict[str, float] | None) -> dict[str, Any]:
    """What the measured stack runs (from the worker's info and the controller's fitted cost model)."""
    return {
        "worker_id": info.worker_id, "model": info.model, "proposer": info.proposer,
        "device": info.device, "dtype": info.dtype,
        "worker": {"max_batch_size": info.max_batch_size,
                   "max_k": info.max_speculation_length,
                   # the worker reports what it can offer next step (proposable_tokens)
                   "lookahead": info.reports_proposable_tokens},
        "cost_model": cost,
    }


async def measure(args, inputs: BenchInputs, worker: str, controller: str) -> tuple[list, dict]:
    """Every point's record against the running stack, and the stack's facts."""
    from smartspec.clients.client import AsyncClient

    async with AsyncClient(worker=worker, controller=controller, stream_timeout=3600) as client:
        info = await client.worker_info()

        async def fitted_cost_model() -> dict[str, Any]:
            status = await client.status()
            cost = next((w.cost_model for w in status.workers if w.worker_id == info.worker_id), None)
            return {"cost_model": _as_dict(cost)}

        records = await bench(client, dataset=inputs.dataset, policies=inputs.policies, rates=inputs.rates,
                              phases=inputs.phases, requests=args.requests, warmup=args.warmup,
                              arrival=args.arrival, cv=args.cv, temperature=args.temperature, seed=args.seed,
                              snapshot=fitted_cost_model, repeats=args.repeats)
        return records, stack_facts(info, (await fitted_cost_model())["cost_model"])


def run_meta(args, inputs: BenchInputs, stack: dict[str, Any], commit: str | None, wall_s: float) -> dict[str, Any]:
    from smartspec.bench.report import machine_meta

    dataset = inputs.dataset
    return {
        "kind": "bench",
        **stack,
        "dataset": dataset.meta() | {"max_tokens": dataset.prompts[0].max_tokens},
        "policies": [label for label, _, _ in inputs.policies],
        "rates": inputs.rates, "arrival": args.arrival, "cv": args.cv, "phases": args.phases or None,
        "requests": args.requests, "repeats": args.repeats, "warmup": args.warmup, "temperature": args.temperature,
        "seed": args.seed, "machine": machine_meta(), "git_commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": wall_s,
    }


def run(args) -> int:
    from smartspec.bench.report import git_commit, write_outputs
    from smartspec.clients.errors import SmartspecError

    if args.from_json:
        return rerender(args)
    try:
        inputs = read_inputs(args)
    except ValueError as exc:   # PolicyError (a FieldError) is a ValueError too
        print(f"smartspec bench: error: {exc}", file=sys.stderr)
        return 2
    commit = git_commit()  # what the stack runs: read before, as the checkout may move during a long run
    started = time.perf_counter()
    try:
        with _stack(args) as (worker, controller):
            records, stack = asyncio.run(measure(args, inputs, worker, controller))
    except (SmartspecError, ValueError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"smartspec bench: error: {exc}", file=sys.stderr)
        return 1
    meta = run_meta(args, inputs, stack, commit, time.perf_counter() - started)
    # each record names what produced it too, so records from several files can be pooled
    provenance = {"model": stack.get("model"), "proposer": stack.get("proposer"), "machine": meta["machine"]["cpu"],
                  "git_commit": meta["git_commit"]}
    records = [{**record, **provenance} for record in records]
    title = run_title(stack, inputs.dataset.name)
    print(write_outputs(meta, records, json_path=args.json or None, markdown_path=args.markdown or None,
                        plot_path=args.plot or None, title=title))
    return 0


def rerender(args) -> int:
    """Tables and plot again from a finished run's JSON (e.g. after the report gained a column)."""
    from smartspec.bench.report import read_json, write_outputs

    try:
        meta, records = read_json(args.from_json)
    except (OSError, ValueError, KeyError) as exc:
        print(f"smartspec bench: error: {args.from_json}: {exc}", file=sys.stderr)
        return 2
    title = run_title(meta, (meta.get("dataset") or {}).get("name", "?"))
    print(write_outputs(meta, records, markdown_path=args.markdown or None, plot_path=args.plot or None, title=title))
    return 0


def run_title(stack: dict[str, Any], dataset: str) -> str:
    """The tables' and plot's title: what was measured (model, proposer, dataset)."""
    return f"bench: {stack.get('model', '?')} + {stack.get('proposer', '?')}, {dataset}"


def _as_dict(cost: Any) -> dict[str, float] | None:
    if cost is None:
        return None
    from dataclasses import asdict, is_dataclass

    return asdict(cost) if is_dataclass(cost) else dict(cost)

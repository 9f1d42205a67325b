"""Plan staleness (simulated): what one-step-stale plans and the controller round trip cost.

    python -m smartspec.bench.staleness --json docs/bench/sim-staleness.json \\
        --markdown docs/bench/sim-staleness.md

The workload, step model and worker of docs/bench/sim-h100.* (BENCHMARKS.md section 2, first
command: h100-llama8b, prompts 100-400, outputs 64-128, max batch 32, max k 8, Poisson arrivals,
2,000 requests per point, seed 0), the `goodput` policy only; every point of one (alpha, rate)
sees the same arrivals and lengths as its fresh baseline.

Part `modes`: fresh vs stale-replan vs stale-ks at a round trip shorter than every step (so the
only difference is the staleness), every alpha and rate of that figure. Part `round-trip`: one
alpha, the round trip swept, stale-replan and stale-ks with the worker's adaptive deadline,
stale-replan with a deadline of 0 (never wait) and of 1 s (always wait) to separate what waiting
and what falling back cost, and the what-if fallback "older-plan" (never wait; re-solve the newest
basis in hand, however old) against which the worker's last-k fallback can be judged.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict
import sys
import time
from typing import Any, Mapping, Sequence

from smartspec.bench.report import git_commit, machine_meta, write_json
from smartspec.bench.simulate_cli import sweep
from smartspec.bench.sim_link import ControllerLinkSpec, LinkFallback, PlanMode
from smartspec.bench.simulator import StepModel, WorkerSpec
from smartspec.bench.step_models import parse_step_model
from smartspec.core.policies import get

STEP_MODEL = "h100-llama8b"
WORKLOAD = {"prompt_tokens": "100:400", "output_tokens": "64:128"}
LOSS_THRESHOLD = 0.01  # the claim: one-step-stale plans lose at most 1% goodput against fresh ones
STALE_REPLAN, STALE_KS = PlanMode.STALE_REPLAN, PlanMode.STALE_KS


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def relative(value: float, base: float) -> float:
    """value / base - 1 (nan when there is no base)."""
    return value / base - 1.0 if base and math.isfinite(base) else math.nan


def run_points(links: Sequence[ControllerLinkSpec], alphas: Sequence[str], rates: Sequence[float], *,
               requests: int, seed: int, part: str) -> list[dict[str, Any]]:
    """One record per (link, alpha, rate) for the goodput policy, tagged with `part`."""
    step_model = StepModel(parse_step_model(STEP_MODEL))
    goodput = get("goodput")
    policies = [("goodput", "goodput", goodput.validate({}))]
    records = []
    for link in links:
        started = time.perf_counter()
        points = sweep(step_model=step_model, alphas=alphas, rates=rates, policies=policies, requests=requests,
                       worker=WorkerSpec(), seed=seed, link=link, **WORKLOAD)
        records += [{**r, "part": part, "plan_mode": link.mode, "round_trip_ms": link.round_trip_ms,
                     "plan_deadline_ms": link.deadline_ms, "plan_fallback": link.fallback} for r in points]
        print(f"{part}: {link.mode} rt={link.round_trip_ms:g} ms deadline={link.deadline_ms}: "
              f"{len(points)} points in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return records


def with_deltas(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each record with its goodput and mean-latency change against the fresh point of its
    (part, alpha, rate)."""
    fresh = {(r["part"], r["group"], r["rate"]): r for r in records if r["plan_mode"] == PlanMode.FRESH}
    out = []
    for r in records:
        base = fresh.get((r["part"], r["group"], r["rate"]))
        out.append({**r, "goodput_vs_fresh": relative(r["goodput_tok_s"], base["goodput_tok_s"]) if base else math.nan,
                    "latency_vs_fresh": relative(r["mean_latency_s"], base["mean_latency_s"]) if base else math.nan})
    return out


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.2f}%"


def _share(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.0f}%"


def modes_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Part `modes`: per (alpha, rate), fresh goodput and latency, and each stale mode's change."""
    rows = [r for r in records if r["part"] == "modes"]
    modes = [STALE_REPLAN, STALE_KS]
    head = ("| alpha | rate (req/s) | fresh goodput (tok/s) | " + " | ".join(f"{m} goodput" for m in modes)
            + " | fresh mean lat (s) | " + " | ".join(f"{m} latency" for m in modes) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    keys = dict.fromkeys((r["group"], r["rate"]) for r in rows)
    for group, rate in keys:
        point = {r["plan_mode"]: r for r in rows if (r["group"], r["rate"]) == (group, rate)}
        fresh = point[PlanMode.FRESH]
        lines.append(f"| {group.removeprefix('alpha=')} | {rate:g} | {fresh['goodput_tok_s']:.1f} | "
                     + " | ".join(_pct(point[m]["goodput_vs_fresh"]) for m in modes if m in point)
                     + f" | {fresh['mean_latency_s']:.4f} | "
                     + " | ".join(_pct(point[m]["latency_vs_fresh"]) for m in modes if m in point) + " |")
    return "\n".join(lines) + "\n"


def variant_rows(records: Sequence[Mapping[str, Any]], mode: PlanMode, deadline: float | None,
                 fallback: LinkFallback = LinkFallback.LAST_K) -> list[Mapping[str, Any]]:
    """Part `round-trip` records of one link variant (mode, deadline, fallback)."""
    return [r for r in records if r["part"] == "round-trip" and r["plan_mode"] == mode
            and r["plan_deadline_ms"] == deadline and r["plan_fallback"] == fallback]


def round_trip_table(records: Sequence[Mapping[str, Any]], mode: PlanMode, deadline: float | None,
                     fallback: LinkFallback = LinkFallback.LAST_K) -> str:
    """Part `round-trip`, one link variant: per round trip, the goodput change at every rate, the
    worst latency change, and the range over rates of the shares of steps that waited / fell back."""
    rows = variant_rows(records, mode, deadline, fallback)
    rates = sorted({r["rate"] for r in rows})
    head = ("| round trip (ms) | " + " | ".join(f"goodput @ {x:g}/s" for x in rates)
            + " | worst goodput | worst mean latency | steps waited | steps fell back | mean wait (ms) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for rtt in sorted({r["round_trip_ms"] for r in rows}):
        at = sorted((r for r in rows if r["round_trip_ms"] == rtt), key=lambda r: r["rate"])
        waited = [r.get("waited_share", 0.0) for r in at]
        fell = [r.get("fallback_share", 0.0) for r in at]
        waits = [r.get("mean_plan_wait_ms", 0.0) for r in at]
        lines.append(f"| {rtt:g} | " + " | ".join(_pct(r["goodput_vs_fresh"]) for r in at)
                     + f" | {_pct(min(r['goodput_vs_fresh'] for r in at))} | {_pct(max(r['latency_vs_fresh'] for r in at))}"
                     + f" | {_share(min(waited))}-{_share(max(waited))} | {_share(min(fell))}-{_share(max(fell))}"
                     + f" | {min(waits):.2f}-{max(waits):.2f} |")
    return "\n".join(lines) + "\n"


def first_costly_round_trip(records: Sequence[Mapping[str, Any]], mode: PlanMode = STALE_REPLAN,
                            deadline: float | None = None, metric: str = "goodput_vs_fresh") -> float | None:
    """The smallest swept round trip at which some rate loses more than LOSS_THRESHOLD (goodput
    down, or latency up) against fresh plans; None if none does."""
    rows = variant_rows(records, mode, deadline)
    sign = -1.0 if metric == "goodput_vs_fresh" else 1.0
    costly = [r["round_trip_ms"] for r in rows if sign * r[metric] > LOSS_THRESHOLD]
    return min(costly) if costly else None


def points_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Every point, for the record."""
    head = ("| part | alpha | rate | mode | round trip (ms) | deadline (ms) | fallback | goodput tok/s | vs fresh "
            "| mean lat (s) | vs fresh | p99 (s) | mean k | waited | fell back | mean wait (ms) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        deadline = "adaptive" if r["plan_deadline_ms"] is None else f"{r['plan_deadline_ms']:g}"
        stale = r["plan_mode"] != PlanMode.FRESH
        lines.append(
            f"| {r['part']} | {r['group'].removeprefix('alpha=')} | {r['rate']:g} | {r['plan_mode']} "
            f"| {r['round_trip_ms']:g} | {deadline if stale else '-'} | {r['plan_fallback'] if stale else '-'} "
            f"| {r['goodput_tok_s']:.1f} | {_pct(r['goodput_vs_fresh'])} "
            f"| {r['mean_latency_s']:.4f} | {_pct(r['latency_vs_fresh'])} | {r['p99_latency_s']:.4f} | {r['mean_k']:.2f} "
            f"| {_share(r.get('waited_share')) if stale else '-'} | {_share(r.get('fallback_share')) if stale else '-'} "
            f"| {r.get('mean_plan_wait_ms', 0.0):.2f} |")
    return "\n".join(lines) + "\n"


def report(records: Sequence[Mapping[str, Any]], sweep_alpha: str) -> str:
    parts = ["# Plan staleness (simulated)", "",
             f"Step model {STEP_MODEL}, goodput policy; changes are against fresh plans at the same point "
             "(same arrivals and lengths). goodput = completion tokens per second with a request in the system: "
             "at 16-32 req/s the worker is almost never idle, so it follows the arrival rate and hides a slower "
             "worker until it saturates; mean latency shows it.", "",
             "## Fresh vs one-step-stale plans (round trip below every step)", "", modes_table(records)]
    last_k, older = LinkFallback.LAST_K, LinkFallback.OLDER_PLAN
    variants = [(STALE_REPLAN, None, last_k,
                 "stale-replan, the worker's adaptive deadline max(5 ms, 25% of the last step)"),
                (STALE_KS, None, last_k, "stale-ks, adaptive deadline"),
                (STALE_REPLAN, 0.0, last_k, "stale-replan, deadline 0 (never wait: fall back at once)"),
                (STALE_REPLAN, 1000.0, last_k, "stale-replan, deadline 1 s (always wait, never fall back)"),
                (STALE_REPLAN, 0.0, older,
                 "what-if: stale-replan, deadline 0, a late plan replaced by the newest basis in hand (older-plan)")]
    for mode, deadline, fallback, title in variants:
        if variant_rows(records, mode, deadline, fallback):
            parts += [f"## Round trip, alpha {sweep_alpha}: {title}", "",
                      round_trip_table(records, mode, deadline, fallback)]
    for metric, what in (("goodput_vs_fresh", "goodput loss"), ("latency_vs_fresh", "mean latency increase")):
        rtt = first_costly_round_trip(records, metric=metric)
        parts.append(f"- stale-replan, adaptive deadline: first swept round trip with a {what} over "
                     f"{100 * LOSS_THRESHOLD:g}% at some rate: {'none' if rtt is None else f'{rtt:g} ms'}")
    parts += ["", "## Every point", "", points_table(records)]
    return "\n".join(parts)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m smartspec.bench.staleness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", default="0.5,0.7,0.9")
    parser.add_argument("--rates", default="1,2,4,8,16,32")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes-round-trip-ms", type=float, default=5.0,
                        help="round trip of part `modes` (below the model's shortest step, 6.94 ms)")
    parser.add_argument("--sweep-alpha", default="0.7")
    parser.add_argument("--round-trips", default="0,2,5,7,8,10,15,20,40")
    parser.add_argument("--deadline-round-trips", default="10,15,20,40",
                        help="round trips at which deadlines 0 and 1000 ms, and the older-plan what-if, are also run")
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="")
    parser.add_argument("--from-json", default="", help="re-render the markdown of an earlier run's JSON")
    return parser.parse_args(argv)


def sweep_links(round_trips: Sequence[float], deadline_round_trips: Sequence[float]) -> list[ControllerLinkSpec]:
    """Part `round-trip`: both stale modes with the adaptive deadline at every round trip, and
    stale-replan with deadlines 0 and 1 s and the older-plan what-if at the longer ones."""
    links = [ControllerLinkSpec(mode, x) for mode in (STALE_REPLAN, STALE_KS) for x in round_trips]
    return links + [ControllerLinkSpec(STALE_REPLAN, x, deadline, fallback=fallback)
                    for deadline, fallback in ((0.0, LinkFallback.LAST_K), (1000.0, LinkFallback.LAST_K),
                                               (0.0, LinkFallback.OLDER_PLAN))
                    for x in deadline_round_trips]


def run_experiment(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Both parts' records, with their changes against fresh plans."""
    alphas = [a.strip() for a in args.alphas.split(",") if a.strip()]
    rates = _floats(args.rates)
    common = {"requests": args.requests, "seed": args.seed}
    rt = args.modes_round_trip_ms
    records = run_points([ControllerLinkSpec(), ControllerLinkSpec(STALE_REPLAN, rt), ControllerLinkSpec(STALE_KS, rt)],
                         alphas, rates, part="modes", **common)
    sweep_fresh = [dict(r, part="round-trip") for r in records if r["plan_mode"] == PlanMode.FRESH
                   and r["group"] == f"alpha={args.sweep_alpha}"]
    if not sweep_fresh:  # the sweep alpha is not among part 1's: run its fresh baseline
        sweep_fresh = run_points([ControllerLinkSpec()], [args.sweep_alpha], rates, part="round-trip", **common)
    links = sweep_links(_floats(args.round_trips), _floats(args.deadline_round_trips))
    records += sweep_fresh + run_points(links, [args.sweep_alpha], rates, part="round-trip", **common)
    return with_deltas(records)


def write_text(path: str, text: str) -> None:
    if path:
        with open(path, "w") as f:
            f.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.from_json:
        from smartspec.bench.report import read_json

        meta, records = read_json(args.from_json)
        text = report(records, meta["sweep_alpha"])
    else:
        started = time.perf_counter()
        records = run_experiment(args)
        meta = {"kind": "simulation", "experiment": "plan staleness",
                "step_model": parse_step_model(STEP_MODEL).to_dict(), **WORKLOAD, "worker": asdict(WorkerSpec()),
                "arrival": "poisson", "requests": args.requests, "seed": args.seed, "policy": "goodput",
                "modes_round_trip_ms": args.modes_round_trip_ms, "sweep_alpha": args.sweep_alpha,
                "command": " ".join(["python -m smartspec.bench.staleness", *argv]),
                "machine": machine_meta(), "git_commit": git_commit(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": time.perf_counter() - started}
        text = report(records, args.sweep_alpha)
        if args.json:
            write_json(args.json, meta, records)
    write_text(args.markdown, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

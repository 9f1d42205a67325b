"""`smartspec simulate`: sweep policies x rates (x acceptance models) through the simulator.

    smartspec simulate --step-model c_fixed=6.94,c_tok=0.0184,c_kv=4.86e-5 --alpha 0.7 \\
        --rates 1,2,4,8,16,32 --policies off,fixed:1,fixed:3,fixed:5,goodput --requests 2000 \\
        --json out.json --markdown out.md --plot out.png [--phases 60:2,60:24,60:2]
    smartspec simulate --calibrate-from bench.json     # predicted vs measured mean latency
    smartspec simulate --calibrate-from bench.json --positions positions.json   # prompt lookup replayed
    smartspec simulate --plan-mode stale-replan --round-trip-ms 5 ...   # plans one step stale, 5 ms away

Every (policy, rate) point of one acceptance model sees the same arrivals and lengths (paired).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from smartspec.core.config import add_flag, add_option

DEFAULT_POLICIES = "off,fixed:1,fixed:3,fixed:5,goodput"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def sweep(*, step_model, alphas: Sequence[str], rates: Sequence[float], policies: Sequence[tuple[str, str, dict]],
          requests: int, prompt_tokens: str, output_tokens: str, worker, arrival: str = "poisson",
          cv: float = 1.0, phases=None, seed: int = 0, progress: bool = False,
          fill: Sequence[float] | None = None, link=None) -> list[dict[str, Any]]:
    """One record per (acceptance model, rate, policy); `group` names the acceptance model.

    fill: the proposer's fill rate per request (cycled), None: it always fills (a draft model).
    link: a ControllerLinkSpec (None: fresh plans); non-fresh records name it (plan_mode, round_trip_ms,
    plan_deadline_ms, plan_fallback)."""
    from smartspec.bench.acceptance_models import parse_acceptance, with_fill
    from smartspec.bench.arrivals import make_arrivals, mean_rate
    from smartspec.bench.simulator import ControllerLinkSpec, simulate
    from smartspec.bench.workload import make_workload
    from smartspec.core.policies import get

    points = [(a, r) for a in alphas for r in (rates if not phases else [None])]
    total = len(points) * len(policies)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="simulating", unit="point", file=sys.stderr)
    link = link or ControllerLinkSpec()
    link_fields = {} if link.mode == "fresh" else {"plan_mode": link.mode, "round_trip_ms": link.round_trip_ms,
                                                   "plan_deadline_ms": link.deadline_ms, "plan_fallback": link.fallback}
    records = []
    for alpha_spec, rate in points:
        factory = parse_acceptance(alpha_spec)
        if fill is not None:
            factory = with_fill(factory, fill)
        arrivals = make_arrivals(requests, rate, process=arrival, cv=cv, phases=phases, seed=seed)
        workload = make_workload(arrivals, prompt_tokens, output_tokens, seed=seed)
        offered = mean_rate(phases) if phases else rate
        for label, name, params in policies:
            started = time.perf_counter()
            result = simulate(workload, get(name), params, step_model=step_model, acceptance=factory,
                              worker=worker, link=link, seed=seed)
            group = f"alpha={alpha_spec}" + ("" if fill is None else f" fill={'/'.join(f'{f:g}' for f in fill)}")
            record = {"policy": label, "rate": offered, "group": group, **result.metrics(),
                      "arrivals": "phased" if phases else arrival, **link_fields, "wall_s": time.perf_counter() - started}
            records.append(record)
            if bar:
                bar.update(1)
                bar.set_postfix_str(f"{label} @ {offered:g}/s: {record['mean_latency_s']:.3f}s")
    if bar:
        bar.close()
    return records


def configure(parser) -> None:
    add_option(parser, "--step-model", default="",
               help="step-time model: c_fixed=6.94,c_tok=0.0184,c_kv=4.86e-5 (ms), a preset "
                    "(h100-llama8b, h100x4-llama70b, cpu-smollm2) or a JSON file with a cost model; default h100-llama8b, "
                    "or with --calibrate-from the bench's fitted model")
    add_option(parser, "--alpha", default="0.7",
               help="acceptance model(s), comma-separated: ALPHA, beta:MEAN/CONC, choice:A/B, trace:FILE.json, "
                    "replay:FILE.json (a positions file from scripts/record_positions.py: prompt lookup's "
                    "offers and matches replayed exactly, position by position; not with --fill; lengths still "
                    "come from --prompt-tokens/--output-tokens, so match them to the recording)")
    add_option(parser, "--fill", default="",
               help="proposer fill rate: F or F1/F2/... cycled over requests; a request's k is offered in "
                    "full with probability F, else nothing (prompt lookup without a match); default: always")
    add_option(parser, "--rates", default="1,2,4,8,16,32", help="request rates (req/s), comma-separated")
    add_option(parser, "--policies", default=DEFAULT_POLICIES,
               help="policy specs NAME[:ARGS], comma-separated (fixed:3, goodput:max_k=6,min_gain=0.05)")
    add_option(parser, "--requests", default=2000, type=int, help="requests per point")
    add_option(parser, "--arrival", default="poisson", choices=["poisson", "gamma"], help="arrival process")
    add_option(parser, "--cv", default=1.0, type=float, help="gamma arrivals: coefficient of variation of the gaps")
    add_option(parser, "--phases", default="", help="phased trace DURATION_S:RATE,... (replaces --rates)")
    add_option(parser, "--prompt-tokens", default="100:400", help="prompt length: N or LOW:HIGH (uniform)")
    add_option(parser, "--output-tokens", default="64:128", help="completion length: N or LOW:HIGH (uniform)")
    add_option(parser, "--max-batch-size", default=32, type=int, help="worker slots")
    add_option(parser, "--max-k", default=8, type=int, help="worker's largest speculation length")
    add_option(parser, "--token-budget", default=2048, type=int, help="target query tokens per step")
    add_option(parser, "--prefill-row-ms", default=0.0, type=float, help="extra ms per prefill chunk forward")
    add_option(parser, "--step-overhead-ms", default=0.0, type=float,
               help="extra ms per step outside the cost model (controller round trip, streaming); "
                    "with --calibrate-from, -1 fits it on the lowest-rate `off` point")
    add_flag(parser, "--no-lookahead",
             help="the worker does not report what prompt lookup can offer next step (workers before "
                  "proposable_tokens): the planner uses each request's average fill rate")
    add_flag(parser, "--padded-verify",
             help="time each decode row at the batch's widest k + 1 tokens (right-padded verify batch)")
    add_option(parser, "--noise-cv", default=0.0, type=float, help="multiplicative step-time noise (CV)")
    add_option(parser, "--plan-mode", default="fresh", choices=["fresh", "stale-replan", "stale-ks"],
               help="how plans reach the worker: fresh (from the step just run, free: the ideal), stale-replan "
                    "(the worker re-solves the controller's answer to the report before last with its own "
                    "fresh history, as it does now), stale-ks (that answer's ks applied as sent)")
    add_option(parser, "--round-trip-ms", default=0.0, type=float,
               help="with a stale --plan-mode: ms from a step's report to the controller's answer at the worker")
    add_option(parser, "--plan-deadline-ms", default=None, type=float,
               help="with a stale --plan-mode: the worker's wait for a late plan at most (unset: the worker's "
                    "default, max(5 ms, 25%% of the last step)); past it the step falls back to the last k")
    add_option(parser, "--plan-fallback", default="last-k", choices=["last-k", "older-plan"],
               help="with --plan-mode stale-replan, a step without a recent enough plan: last-k (what the "
                    "worker does: each request keeps its last k, 0 if never planned) or older-plan (what-if: "
                    "re-solve the newest basis in hand, however old)")
    add_option(parser, "--seed", default=0, type=int, help="seed for arrivals, lengths and acceptance draws")
    add_option(parser, "--json", default="", help="write records here")
    add_option(parser, "--markdown", default="", help="write the markdown table here")
    add_option(parser, "--plot", default="", help="write the latency/speedup PNG here")
    add_option(parser, "--calibrate-from", default="",
               help="a bench JSON: simulate each of its points and print predicted vs measured mean latency")
    add_option(parser, "--positions", default="",
               help="with --calibrate-from: replay this positions file (scripts/record_positions.py, recorded "
                    "on the bench's dataset) instead of each prompt's measured acceptance and fill rates")


@dataclass(frozen=True)
class SweepInputs:
    """What a sweep simulates, read and checked from its flags before any point runs."""

    cost: Any                  # the step-time cost model
    policies: list[tuple[str, str, dict[str, Any]]]   # (label, name, params), see core.policy_spec
    phases: Any
    rates: list[float]
    alphas: list[str]
    fill: list[float] | None
    worker: Any                # WorkerSpec
    step_model: Any            # StepModel
    link: Any                  # ControllerLinkSpec


def check_alphas(alphas: Sequence[str], max_k: int) -> None:
    """A bad acceptance spec or file is a usage error now, not a traceback mid-sweep."""
    from smartspec.bench.acceptance_models import parse_acceptance

    for alpha in alphas:
        parse_acceptance(alpha)
        if alpha.startswith("replay:"):
            from smartspec.bench.positions import load_positions

            recorded_k = int(load_positions(alpha.partition(":")[2])["max_k"])
            if max_k > recorded_k:
                raise ValueError(f"{alpha}: recorded with max_k={recorded_k}, below --max-k {max_k}")


def read_inputs(args) -> SweepInputs:
    """The sweep's inputs from its flags; ValueError (PolicyError among them) or OSError naming
    what is wrong."""
    from smartspec.bench.acceptance_models import parse_fill
    from smartspec.bench.arrivals import parse_phases
    from smartspec.bench.simulator import ControllerLinkSpec, StepModel, WorkerSpec
    from smartspec.bench.step_models import parse_step_model
    from smartspec.core.policy_spec import parse_policy_list

    cost = parse_step_model(args.step_model or "h100-llama8b")
    policies = parse_policy_list(args.policies)
    phases = parse_phases(args.phases) if args.phases else None
    rates = _floats(args.rates)
    alphas = [a.strip() for a in args.alpha.split(",") if a.strip()]
    check_alphas(alphas, args.max_k)
    fill = parse_fill(args.fill) if args.fill else None
    if fill is not None and any(a.startswith("replay:") for a in alphas):
        raise ValueError("--fill does not apply to replay: (the positions say when prompt lookup fills)")
    worker = WorkerSpec(args.max_batch_size, args.max_k, args.token_budget, lookahead=not args.no_lookahead)
    step_model = StepModel(cost, prefill_row_ms=args.prefill_row_ms, step_overhead_ms=max(0.0, args.step_overhead_ms),
                           noise_cv=args.noise_cv, padded_verify=args.padded_verify)
    link = ControllerLinkSpec(args.plan_mode, args.round_trip_ms, args.plan_deadline_ms, fallback=args.plan_fallback)
    return SweepInputs(cost, policies, phases, rates, alphas, fill, worker, step_model, link)


def sweep_meta(args, inputs: SweepInputs, wall_s: float) -> dict[str, Any]:
    from smartspec.bench.report import git_commit, machine_meta

    link = inputs.link
    return {
        "kind": "simulation",
        "step_model": inputs.cost.to_dict(),
        "prefill_row_ms": args.prefill_row_ms,
        "step_overhead_ms": args.step_overhead_ms,
        "padded_verify": args.padded_verify,
        "plan": {"mode": link.mode, "round_trip_ms": link.round_trip_ms, "deadline_ms": link.deadline_ms,
                 "fallback": link.fallback},
        "noise_cv": args.noise_cv,
        "acceptance": inputs.alphas,
        "fill": inputs.fill,
        "arrival": args.arrival, "cv": args.cv, "phases": args.phases or None,
        "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
        "worker": {"max_batch_size": args.max_batch_size, "max_k": args.max_k, "token_budget": args.token_budget,
                   "lookahead": not args.no_lookahead},
        "requests": args.requests, "seed": args.seed,
        "machine": machine_meta(), "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": wall_s,
    }


def run(args) -> int:
    from smartspec.bench.report import write_outputs

    try:
        if args.positions and not args.calibrate_from:
            raise ValueError("--positions goes with --calibrate-from (to simulate a positions file, "
                             "use --alpha replay:FILE)")
        if args.calibrate_from and args.plan_mode != "fresh":
            raise ValueError("--plan-mode applies to sweeps; --calibrate-from simulates with fresh plans")
        if args.calibrate_from:
            from smartspec.bench.calibrate import calibrate_cli
            return calibrate_cli(args)
        inputs = read_inputs(args)
    except (ValueError, OSError) as exc:   # PolicyError (a FieldError) is a ValueError too
        print(f"smartspec simulate: error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    records = sweep(step_model=inputs.step_model, alphas=inputs.alphas, rates=inputs.rates, policies=inputs.policies,
                    requests=args.requests, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                    worker=inputs.worker, arrival=args.arrival, cv=args.cv, phases=inputs.phases, seed=args.seed,
                    progress=True, fill=inputs.fill, link=inputs.link)
    meta = sweep_meta(args, inputs, time.perf_counter() - started)
    table = write_outputs(meta, records, json_path=args.json or None, markdown_path=args.markdown or None,
                          plot_path=args.plot or None, title=f"simulation: {args.step_model or 'h100-llama8b'}")
    print(table)
    print(f"{len(records)} points, {args.requests} requests each, in {meta['wall_s']:.1f} s", file=sys.stderr)
    return 0

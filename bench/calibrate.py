"""Does the simulator predict a real run? Replay a bench JSON's points in simulation and compare.

For every measured (policy, rate) point we rebuild what the worker faced: the same seeded arrival
times, each request's measured prompt and completion lengths, each prompt's acceptance rate
(pooled over the points where it speculated), the worker's limits and the cost model the controller
fitted on it (from the bench meta, or --step-model), and each prompt's fill rate (proposals offered per
proposal asked for, where the JSON records it). Then the simulator runs the same policy code,
and we report predicted / measured mean latency (the issue asks for within 15%).

With a positions file (`--positions`, `bench.positions`) each request instead replays its prompt's
recorded prompt-lookup table exactly (`PositionReplay`) in place of iid draws at those rates; the
lengths, arrivals and warm prior are built as above.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np

from smartspec.bench.acceptance_models import per_request, replay
from smartspec.bench.arrivals import make_arrivals, parse_phases
from smartspec.core.policy_spec import parse_policy_spec
from smartspec.bench.positions import check_dataset, load_positions
from smartspec.bench.simulator import StepModel, WorkerSpec, simulate
from smartspec.bench.step_models import cost_model_from_mapping
from smartspec.bench.workload import Workload
from smartspec.core.acceptance import PooledPrior
from smartspec.core.policies import get

TOLERANCE = 0.15


def per_prompt_ratio(records: Sequence[Mapping[str, Any]], numerator: str, denominator: str,
                     default: float) -> dict[int, float]:
    """Prompt index -> sum(numerator) / sum(denominator) over every point's per-request detail
    (`default` where the denominator is 0 or the detail lacks the columns)."""
    top: dict[int, float] = defaultdict(float)
    bottom: dict[int, float] = defaultdict(float)
    for record in records:
        detail = record.get("detail") or {}
        for i, n, d in zip(detail.get("index", []), detail.get(numerator, []), detail.get(denominator, [])):
            top[i] += n
            bottom[i] += d
    indices = {i for r in records for i in (r.get("detail") or {}).get("index", [])}
    return {i: (top[i] / bottom[i] if bottom[i] > 0 else default) for i in indices}


def per_prompt_acceptance(records: Sequence[Mapping[str, Any]], default: float = 0.0) -> dict[int, float]:
    """Prompt index -> accepted / tested summed over every point where it was tested."""
    return per_prompt_ratio(records, "accepted", "tested", default)


def per_prompt_fill(records: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Prompt index -> proposed / requested: how often the proposer filled what it was asked (1 if unknown)."""
    return per_prompt_ratio(records, "proposed", "requested", 1.0)


def predict_points(meta: Mapping[str, Any], records: Sequence[Mapping[str, Any]], step_model: StepModel,
                   worker: WorkerSpec, seed: int = 0, per_point_cost: bool = False,
                   acceptance_from: Sequence[Mapping[str, Any]] | None = None,
                   positions: Mapping[str, Any] | str | None = None) -> list[dict[str, Any]]:
    """One row per measured point: measured and predicted mean latency and their ratio.

    per_point_cost: use the cost model recorded with each point (what the controller had fitted
    by the end of it) instead of `step_model.cost`, where a record carries one.
    acceptance_from: the records to pool per-prompt acceptance over (default: `records`).
    positions: a positions file (path or `bench.positions.load_positions` table): request j replays
    the recorded table of its dataset prompt (the detail's "index") instead of iid draws at that
    prompt's measured rates. Checked against meta["dataset"] when both name their prompts.
    """
    table = None
    if positions is not None:
        table = load_positions(positions)
        check_dataset(table, meta.get("dataset"))
    alphas = per_prompt_acceptance(acceptance_from or records)
    fills = per_prompt_fill(acceptance_from or records)
    pooled = np.mean(list(alphas.values())) if alphas else 0.0
    pooled_fill = np.mean(list(fills.values())) if fills else 1.0
    phases = parse_phases(meta["phases"]) if meta.get("phases") else None
    # the controller's pooled prior outlives a point (it lives in Redis): start warm, worth ~one
    # prior strength of evidence at the run's pooled rate, not cold at the default rate
    warm_prior = PooledPrior(8.0 * pooled, 8.0, 8.0 * pooled_fill, 8.0) if alphas else None
    rows = []
    for record in records:
        detail = record.get("detail")
        if not detail:
            raise ValueError(f"record {record['policy']} @ {record['rate']} has no per-request detail")
        n_sent = int(meta.get("requests", len(detail["index"])))
        arrivals = make_arrivals(n_sent, None if phases else float(record["rate"]),
                                 process=meta.get("arrival", "poisson"), cv=float(meta.get("cv", 1.0)),
                                 phases=phases, seed=int(meta.get("seed", 0)))
        index = np.array(detail["index"], dtype=np.int64)  # the requests that succeeded
        workload = Workload(arrivals[index], np.maximum(1, np.array(detail["prompt_tokens"])),
                            np.maximum(1, np.array(detail["completion_tokens"])))
        rates = [alphas.get(int(i), pooled) for i in index]
        request_fills = [fills.get(int(i), pooled_fill) for i in index]
        name, params = parse_policy_spec(record["policy"])
        model = step_model
        if per_point_cost and record.get("cost_model"):
            model = replace(step_model, cost=cost_model_from_mapping(record["cost_model"]))
        acceptance = per_request(rates, request_fills) if table is None else replay(table, index.tolist())
        result = simulate(workload, get(name), params, step_model=model, acceptance=acceptance,
                          worker=worker, initial_prior=warm_prior, seed=seed)
        predicted = result.metrics()
        measured = float(record["mean_latency_s"])
        rows.append({
            "policy": record["policy"], "rate": record["rate"], "group": record.get("group"),
            "measured_mean_latency_s": measured,
            "predicted_mean_latency_s": predicted["mean_latency_s"],
            "ratio": predicted["mean_latency_s"] / measured if measured > 0 else float("nan"),
            "measured_mean_k": record.get("mean_k"), "predicted_mean_k": predicted["mean_k"],
        })
    return rows


def fit_step_overhead(meta: Mapping[str, Any], records: Sequence[Mapping[str, Any]], step_model: StepModel,
                      worker: WorkerSpec, seed: int = 0, per_point_cost: bool = False,
                      iterations: int = 14, positions: Mapping[str, Any] | str | None = None
                      ) -> tuple[float, Mapping[str, Any]]:
    """The per-step overhead (ms) that makes the simulator match the lowest-rate `off` point.

    One free parameter, fitted on one point (the least queued, least speculative one); every other
    point is then a prediction. Bisection: predicted latency grows with the overhead.
    """
    candidates = [r for r in records if r["policy"] == "off"] or list(records)
    anchor = min(candidates, key=lambda r: float(r["rate"]))
    low, high = 0.0, max(1.0, 2000.0 * float(anchor["mean_tpot_s"]))
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        (row,) = predict_points(meta, [anchor], replace(step_model, step_overhead_ms=mid), worker, seed,
                                per_point_cost, acceptance_from=records, positions=positions)
        low, high = (mid, high) if row["ratio"] < 1.0 else (low, mid)
    return 0.5 * (low + high), anchor


def calibration_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| policy | rate (req/s) | measured mean (s) | predicted mean (s) | predicted/measured "
             "| measured k | predicted k |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = "" if abs(r["ratio"] - 1) <= TOLERANCE else " (!)"
        lines.append(f"| {r['policy']} | {r['rate']:g} | {r['measured_mean_latency_s']:.3f} "
                     f"| {r['predicted_mean_latency_s']:.3f} | {r['ratio']:.2f}{flag} "
                     f"| {r['measured_mean_k'] or 0:.2f} | {r['predicted_mean_k']:.2f} |")
    within = sum(abs(r["ratio"] - 1) <= TOLERANCE for r in rows)
    lines.append(f"\n{within}/{len(rows)} points within {TOLERANCE:.0%}")
    return "\n".join(lines) + "\n"


def calibrate_cli(args) -> int:
    """`smartspec simulate --calibrate-from bench.json [--step-model ...] [--json out.json]`."""
    import json
    from pathlib import Path

    from smartspec.bench.report import read_json
    from smartspec.bench.step_models import parse_step_model

    meta, records = read_json(args.calibrate_from)
    if args.step_model:
        cost = parse_step_model(args.step_model)
    elif meta.get("cost_model"):
        cost = cost_model_from_mapping(meta["cost_model"])
    else:
        print("smartspec simulate: error: the bench JSON has no cost_model; pass --step-model", file=sys.stderr)
        return 2
    limits = meta.get("worker") or {}
    worker = WorkerSpec(max_batch_size=int(limits.get("max_batch_size") or args.max_batch_size),
                        max_k=int(limits.get("max_k") or args.max_k), token_budget=args.token_budget,
                        # runs recorded before workers reported proposable_tokens have no "lookahead"
                        lookahead=bool(limits.get("lookahead", False)) and not args.no_lookahead)
    step_model = StepModel(cost, prefill_row_ms=args.prefill_row_ms, step_overhead_ms=max(0.0, args.step_overhead_ms),
                           noise_cv=args.noise_cv, padded_verify=args.padded_verify)
    positions = None
    if getattr(args, "positions", ""):
        positions = load_positions(args.positions)
        check_dataset(positions, meta.get("dataset"))
        if worker.max_k > int(positions["max_k"]):
            raise ValueError(f"{args.positions}: recorded with max_k={positions['max_k']}, the bench worker's "
                             f"max_k is {worker.max_k}")
        if meta.get("model") and positions.get("model") and meta["model"] != positions["model"]:
            print(f"smartspec simulate: warning: positions recorded with model {positions['model']!r}, "
                  f"the bench ran {meta['model']!r}", file=sys.stderr)
    per_point = not args.step_model
    note = ""
    if args.step_overhead_ms < 0:
        overhead, anchor = fit_step_overhead(meta, records, step_model, worker, args.seed, per_point,
                                             positions=positions)
        step_model = replace(step_model, step_overhead_ms=overhead)
        note = (f"step overhead {overhead:.1f} ms fitted on {anchor['policy']} @ {anchor['rate']:g} req/s "
                "(that point matches by construction; the others are predictions)\n")
    rows = predict_points(meta, records, step_model, worker, seed=args.seed, per_point_cost=per_point,
                          positions=positions)
    table = note + calibration_table(rows)
    source = "--step-model" if args.step_model else "each point's fitted model (else the run's final fit)"
    acceptance = f"positions replayed from {args.positions}" if positions else "per-prompt measured rates (iid)"
    print(f"cost model: {source}; final: {cost.to_dict()}\nacceptance: {acceptance}\n")
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": {"calibrated_from": str(args.calibrate_from),
                                                         "cost_model": cost.to_dict(),
                                                         "step_overhead_ms": step_model.step_overhead_ms,
                                                         "padded_verify": step_model.padded_verify,
                                                         "positions": str(args.positions) if positions else None},
                                                "rows": rows}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0

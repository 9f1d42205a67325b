"""Per-point metrics and the three output formats shared by `bench` and `simulate`.

One record per (policy, rate) point; the file is `{"meta": {...}, "records": [...]}`. The metric
definitions live here once, so a simulated point and a measured one mean the same thing:

- latency: finish - arrival (end to end, queueing included); TTFT: first token - arrival;
  TPOT: (finish - first token) / (completion tokens - 1), over requests with >= 2 tokens.
- throughput_tok_s: completion tokens / (last finish - first arrival).
- goodput_tok_s: completion tokens / busy seconds, where busy = the union of the intervals in
  which at least one request was in the system; so an idle gap between arrivals does not dilute it.
- acceptance_rate: accepted / tested positions (see controller.acceptance); mean_k: mean
  speculation length over decode request-steps.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

REQUIRED_FIELDS = (
    "policy", "rate", "requests", "mean_latency_s", "p50_latency_s", "p99_latency_s", "mean_ttft_s",
    "mean_tpot_s", "throughput_tok_s", "goodput_tok_s", "acceptance_rate", "mean_k",
)

DEFINITIONS = {
    "latency": "finish - arrival, seconds (queueing included)",
    "ttft": "first token - arrival",
    "tpot": "(finish - first token) / (completion tokens - 1), requests with >= 2 tokens",
    "throughput_tok_s": "completion tokens / (last finish - first arrival)",
    "goodput_tok_s": "completion tokens / seconds with at least one request in the system",
    "acceptance_rate": "accepted / tested positions",
    "mean_k": "mean speculation length over decode request-steps",
}


def busy_seconds(arrival_s: np.ndarray, finish_s: np.ndarray) -> float:
    """Length of the union of [arrival_i, finish_i] intervals."""
    if arrival_s.size == 0:
        return 0.0
    order = np.argsort(arrival_s, kind="stable")
    start = arrival_s[order]  # [N]
    end = np.maximum.accumulate(finish_s[order])  # [N]: latest finish so far
    idle = np.clip(start[1:] - end[:-1], 0.0, None)  # gaps with nothing in the system
    return float(end[-1] - start[0] - idle.sum())


def point_metrics(*, arrival_s, first_token_s, finish_s, completion_tokens, accepted, tested,
                  k_sum, decode_steps) -> dict[str, float]:
    """Metrics of one point from per-request arrays (all [N], times in seconds on one clock)."""
    arrival = np.asarray(arrival_s, dtype=np.float64)
    first = np.asarray(first_token_s, dtype=np.float64)
    finish = np.asarray(finish_s, dtype=np.float64)
    tokens = np.asarray(completion_tokens, dtype=np.float64)
    n = int(arrival.size)
    if n == 0:
        raise ValueError("a point needs at least one finished request")
    latency = finish - arrival  # [N]
    multi = tokens >= 2
    tpot = (finish[multi] - first[multi]) / (tokens[multi] - 1)
    span = float(finish.max() - arrival.min())
    busy = busy_seconds(arrival, finish)
    total_tokens = float(tokens.sum())
    tested_sum = float(np.sum(tested))
    steps = float(np.sum(decode_steps))
    return {
        "requests": n,
        "mean_latency_s": float(latency.mean()),
        "p50_latency_s": float(np.percentile(latency, 50)),
        "p99_latency_s": float(np.percentile(latency, 99)),
        "mean_ttft_s": float((first - arrival).mean()),
        "mean_tpot_s": float(tpot.mean()) if tpot.size else math.nan,
        "throughput_tok_s": total_tokens / span if span > 0 else math.nan,
        "goodput_tok_s": total_tokens / busy if busy > 0 else math.nan,
        "acceptance_rate": float(np.sum(accepted)) / tested_sum if tested_sum > 0 else 0.0,
        "mean_k": float(np.sum(k_sum)) / steps if steps > 0 else 0.0,
        "completion_tokens": int(total_tokens),
        "duration_s": span,
    }


# --- meta --------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(repo: Path | None = None) -> str:
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_meta() -> dict[str, Any]:
    import os
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


# --- output ------------------------------------------------------------------------------------

def check_records(records: Iterable[Mapping[str, Any]]) -> None:
    for i, record in enumerate(records):
        missing = [f for f in REQUIRED_FIELDS if f not in record]
        if missing:
            raise ValueError(f"record {i} lacks {', '.join(missing)}")


def write_json(path: str | Path, meta: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> None:
    check_records(records)
    payload = {"meta": {**meta, "definitions": DEFINITIONS}, "records": list(records)}
    Path(path).write_text(json.dumps(payload, indent=2, default=_json_default, allow_nan=True) + "\n")


def read_json(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "records" not in data:
        raise ValueError(f"{path}: expected {{'meta': ..., 'records': [...]}}")
    check_records(data["records"])
    return data.get("meta", {}), data["records"]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _policies_in_order(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["policy"] for r in records))


def _baseline(records: Sequence[Mapping[str, Any]], rate: Any, group: Any) -> Mapping[str, Any] | None:
    for r in records:
        if r["policy"] == "off" and r["rate"] == rate and r.get("group") == group:
            return r
    return None


def markdown_table(records: Sequence[Mapping[str, Any]], title: str | None = None) -> str:
    """One row per point, with speedup vs `off` at the same rate (mean latency ratio)."""
    check_records(records)
    grouped = any(r.get("group") for r in records)
    head = ("| " + ("group | " if grouped else "") + "policy | rate (req/s) | requests | mean lat (s) | p50 (s) | p99 (s) | TTFT (s) | TPOT (ms) "
            "| tok/s | goodput tok/s | accept | mean k | speedup vs off |")
    lines = [f"### {title}", ""] if title else []
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(records, key=lambda r: (str(r.get("group", "")), float(r["rate"]),
                                            _policies_in_order(records).index(r["policy"]))):
        base = _baseline(records, r["rate"], r.get("group"))
        speedup = base["mean_latency_s"] / r["mean_latency_s"] if base and r["mean_latency_s"] > 0 else math.nan
        lines.append(
            ("| " + str(r.get("group", "")) + " " if grouped else "") +
            f"| {r['policy']} | {_num(r['rate'])} | {r['requests']} | {r['mean_latency_s']:.3f} "
            f"| {r['p50_latency_s']:.3f} | {r['p99_latency_s']:.3f} | {r['mean_ttft_s']:.3f} "
            f"| {1000 * r['mean_tpot_s']:.1f} | {r['throughput_tok_s']:.1f} | {r['goodput_tok_s']:.1f} "
            f"| {r['acceptance_rate']:.2f} | {r['mean_k']:.2f} | {_num(speedup, 2)}x |"
        )
    return "\n".join(lines) + "\n"


def latency_over_repeats(record: Mapping[str, Any]) -> float:
    """A point's mean latency over every request measured for it: the mean of its repeats' means
    (every repeat sends the same requests), else its one measurement. More requests than the median
    repeat, and with the rotating schedule no policy owns the machine's slow stretches."""
    repeats = record.get("repeat_mean_latency_s")
    return float(np.mean(repeats)) if repeats else float(record["mean_latency_s"])


def claim_rows(records: Sequence[Mapping[str, Any]], policy: str = "goodput") -> list[dict[str, Any]]:
    """Per (group, rate): `policy`'s mean latency against the best of the others (`off` included).

    The SmartSpec claim in one line per load: goodput / best <= 1 (matches the best fixed k) and
    goodput / off <= 1 (never worse than not speculating). Latencies are over all repeats
    (`latency_over_repeats`); `rounds_won` counts the rounds in which `policy` was no slower than the
    best other policy measured in the same round (repeat i of each policy at a rate ran back to back).
    """
    rows = []
    keys = dict.fromkeys((r.get("group"), r["rate"]) for r in records)
    for group, rate in keys:
        point = {r["policy"]: r for r in records if r.get("group") == group and r["rate"] == rate}
        if policy not in point or len(point) < 2:
            continue
        ours = latency_over_repeats(point[policy])
        best_name, best = min(((name, latency_over_repeats(r)) for name, r in point.items() if name != policy),
                              key=lambda item: item[1])
        off = point.get("off")
        off_latency = latency_over_repeats(off) if off else math.nan
        ours_rounds = point[policy].get("repeat_mean_latency_s") or []
        best_rounds = point[best_name].get("repeat_mean_latency_s") or []
        paired = len(ours_rounds) == len(best_rounds) and len(ours_rounds) > 1
        rows.append({"group": group, "rate": rate, "policy": policy, "mean_latency_s": ours,
                     "best_other": best_name, "best_other_mean_latency_s": best,
                     "vs_best": ours / best if best > 0 else math.nan,
                     "vs_off": ours / off_latency if off_latency > 0 else math.nan,
                     "rounds": len(ours_rounds) if paired else None,
                     "rounds_won": sum(o <= b for o, b in zip(ours_rounds, best_rounds)) if paired else None})
    return rows


def claim_table(records: Sequence[Mapping[str, Any]], policy: str = "goodput") -> str:
    """`claim_rows` as markdown ('' when the records do not hold `policy` and another policy)."""
    rows = claim_rows(records, policy)
    if not rows:
        return ""
    rounds = any(r["rounds"] for r in rows)
    lines = [f"| group | rate (req/s) | {policy} mean (s) | best other | its mean (s) | {policy} / best | {policy} / off |"
             + (" rounds won |" if rounds else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if rounds else "")]
    for r in rows:
        won = (f" {r['rounds_won']}/{r['rounds']} |" if r["rounds"] else " n/a |") if rounds else ""
        lines.append(f"| {r['group'] or ''} | {_num(r['rate'])} | {r['mean_latency_s']:.3f} | {r['best_other']} "
                     f"| {r['best_other_mean_latency_s']:.3f} | {_num(r['vs_best'], 2)} | {_num(r['vs_off'], 2)} |" + won)
    if rounds:
        lines += ["", "Means over all repeats of each point; rounds won: repeats in which "
                      f"{policy} was no slower than that best other policy measured back to back with it."]
    return "\n".join(lines) + "\n"


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}" if digits != 2 else f"{value:.2f}"
    return str(value)


def plot_series(records: Sequence[Mapping[str, Any]]) -> dict[Any, dict[str, tuple[list, list, list]]]:
    """What `plot` draws: group -> policy -> (rates, mean latencies, speedups vs `off`), rates ascending.

    Means over all of a point's repeats (`latency_over_repeats`), as the claim table scores them."""
    series: dict[Any, dict[str, tuple[list, list, list]]] = {}
    for group in dict.fromkeys(r.get("group") for r in records):
        rows = [r for r in records if r.get("group") == group]
        series[group] = {}
        for policy in _policies_in_order(rows):
            points = sorted((r for r in rows if r["policy"] == policy), key=lambda r: float(r["rate"]))
            latencies = [latency_over_repeats(r) for r in points]
            bases = [_baseline(rows, r["rate"], group) for r in points]
            speedups = [latency_over_repeats(b) / lat if b and lat > 0 else math.nan for b, lat in zip(bases, latencies)]
            series[group][policy] = ([float(r["rate"]) for r in points], latencies, speedups)
    return series


def plot(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> None:
    """Mean latency vs rate (one line per policy) and speedup vs `off`, one row per group (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_records(records)
    series = plot_series(records)
    fig, axes = plt.subplots(len(series), 2, figsize=(12, 4.2 * len(series)), squeeze=False)
    for (ax_lat, ax_speed), (group, lines) in zip(axes, series.items()):
        for policy, (rates, latencies, speedups) in lines.items():
            ax_lat.plot(rates, latencies, marker="o", label=policy)
            ax_speed.plot(rates, speedups, marker="o", label=policy)
        suffix = f" ({group})" if group else ""
        ax_lat.set_xlabel("request rate (req/s)")
        ax_lat.set_ylabel("mean latency (s)")
        ax_lat.set_yscale("log")
        ax_lat.set_title("mean end-to-end latency" + suffix)
        ax_speed.axhline(1.0, color="grey", linewidth=0.8)
        ax_speed.set_xlabel("request rate (req/s)")
        ax_speed.set_ylabel("speedup vs off (latency ratio)")
        ax_speed.set_title("speedup vs no speculation" + suffix)
        for ax in (ax_lat, ax_speed):
            if len({rate for rates, _, _ in lines.values() for rate in rates}) > 1:
                ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
        ax_speed.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(meta: Mapping[str, Any], records: Sequence[Mapping[str, Any]], *, json_path=None,
                  markdown_path=None, plot_path=None, title: str = "") -> str:
    """Write whichever outputs were asked for; return the markdown table (also for stdout)."""
    table = markdown_table(records, title or None)
    claim = claim_table(records)
    if claim:
        table += "\n" + claim
    if json_path:
        write_json(json_path, meta, records)
    if markdown_path:
        Path(markdown_path).write_text(table)
    if plot_path:
        plot(records, plot_path, title)
    return table

"""Point metrics, the JSON/markdown/PNG outputs, the simulate CLI end to end, and calibration."""

import json

import jsonschema
import numpy as np
import pytest

from smartspec.bench.calibrate import fit_step_overhead, predict_points
from smartspec.bench.report import (REQUIRED_FIELDS, busy_seconds, claim_rows, claim_table, markdown_table, plot,
                                    plot_series, point_metrics, read_json, write_json)
from smartspec.bench.simulator import StepModel, WorkerSpec, simulate
from smartspec.bench.acceptance_models import per_request
from smartspec.bench.arrivals import make_arrivals
from smartspec.bench.step_models import PRESETS
from smartspec.bench.workload import Workload
from smartspec.cli import main
from smartspec.core.policies import get

RECORD_SCHEMA = {
    "type": "object",
    "required": ["meta", "records"],
    "properties": {
        "meta": {"type": "object", "required": ["machine", "git_commit", "date", "definitions"]},
        "records": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object", "required": list(REQUIRED_FIELDS),
                "properties": {"policy": {"type": "string"}, "rate": {"type": "number"},
                               "requests": {"type": "integer", "minimum": 1},
                               **{f: {"type": "number"} for f in REQUIRED_FIELDS[3:]}},
            },
        },
    },
}


def test_busy_seconds_is_the_union_of_intervals():
    # [0, 1] and [0.5, 2] overlap -> 2 s; [3, 4] after an idle second -> 1 s
    assert busy_seconds(np.array([0.0, 0.5, 3.0]), np.array([1.0, 2.0, 4.0])) == pytest.approx(3.0)
    assert busy_seconds(np.array([3.0, 0.0]), np.array([4.0, 10.0])) == pytest.approx(10.0)  # nested


def test_point_metrics_by_hand():
    m = point_metrics(arrival_s=[0.0, 1.0], first_token_s=[0.5, 1.2], finish_s=[2.0, 1.6],
                      completion_tokens=[4, 5], accepted=[3, 0], tested=[4, 2], k_sum=[6, 2], decode_steps=[3, 4])
    assert m["mean_latency_s"] == pytest.approx((2.0 + 0.6) / 2)
    assert m["mean_ttft_s"] == pytest.approx((0.5 + 0.2) / 2)
    assert m["mean_tpot_s"] == pytest.approx((1.5 / 3 + 0.4 / 4) / 2)
    assert m["throughput_tok_s"] == pytest.approx(9 / 2.0)
    assert m["goodput_tok_s"] == pytest.approx(9 / 2.0)
    assert m["acceptance_rate"] == pytest.approx(3 / 6)
    assert m["mean_k"] == pytest.approx(8 / 7)


def _record(policy, rate, latency, group="g"):
    return {"policy": policy, "rate": rate, "requests": 3, "mean_latency_s": latency, "p50_latency_s": latency,
            "p99_latency_s": latency, "mean_ttft_s": 0.1, "mean_tpot_s": 0.01, "throughput_tok_s": 10.0,
            "goodput_tok_s": 12.0, "acceptance_rate": 0.5, "mean_k": 1.0, "group": group}


def test_outputs_round_trip_and_speedup(tmp_path):
    records = [_record("off", 1.0, 2.0), _record("goodput", 1.0, 0.8), _record("off", 4.0, 3.0),
               _record("goodput", 4.0, 3.0)]
    path = tmp_path / "r.json"
    write_json(path, {"machine": {}, "git_commit": "x", "date": "d"}, records)
    meta, back = read_json(path)
    jsonschema.validate(json.loads(path.read_text()), RECORD_SCHEMA)
    assert back == records and "goodput_tok_s" in meta["definitions"]
    table = markdown_table(records)
    assert "| g | goodput | 1 | 3 | 0.800 |" in table and "2.50x" in table and "1.00x" in table
    plot(records, tmp_path / "r.png")
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with pytest.raises(ValueError, match="mean_k"):
        write_json(path, {}, [{k: v for k, v in records[0].items() if k != "mean_k"}])


def test_simulate_cli_writes_valid_outputs(tmp_path, capsys):
    out = tmp_path / "s.json"
    code = main(["simulate", "--step-model", "c_fixed=6.94,c_tok=0.0184,c_kv=4.86e-5", "--alpha", "0.6,0.9",
                 "--rates", "2,8", "--policies", "off,fixed:3,goodput", "--requests", "40", "--json", str(out),
                 "--markdown", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png")])
    assert code == 0
    data = json.loads(out.read_text())
    jsonschema.validate(data, RECORD_SCHEMA)
    assert len(data["records"]) == 2 * 2 * 3
    assert data["meta"]["step_model"]["c_fixed_ms"] == 6.94
    by = {(r["group"], r["policy"], r["rate"]): r for r in data["records"]}
    assert by[("alpha=0.9", "fixed:3", 2.0)]["acceptance_rate"] > by[("alpha=0.6", "fixed:3", 2.0)]["acceptance_rate"]
    assert (tmp_path / "s.png").stat().st_size > 10_000
    assert "| alpha=0.9 | goodput |" in capsys.readouterr().out


def test_simulate_cli_rejects_bad_policy(capsys):
    assert main(["simulate", "--policies", "off,warp:9", "--requests", "5"]) == 2
    assert "unknown policy 'warp'" in capsys.readouterr().err


def _measured_run(cost, alphas, rate, policy, seed, overhead_ms=0.0):
    """A 'bench' point produced by the simulator itself: the calibration must recover it."""
    n = len(alphas)
    arrivals = make_arrivals(n, rate, seed=seed)
    rng = np.random.default_rng(seed)
    wl = Workload(arrivals, rng.integers(80, 250, n), rng.integers(40, 90, n))
    name, params = (policy.split(":")[0], {"k": int(policy.split(":")[1])}) if ":" in policy else (policy, {})
    r = simulate(wl, get(name), get(name).validate(params), step_model=StepModel(cost, step_overhead_ms=overhead_ms),
                 acceptance=per_request(alphas), worker=WorkerSpec(max_batch_size=8, max_k=6), seed=seed + 99)
    return {"policy": policy, "rate": rate, **r.metrics(), "detail": r.detail(wl.prompt_tokens)}


def test_calibration_recovers_a_known_system_and_flags_a_wrong_cost_model():
    cost = PRESETS["cpu-smollm2"]
    alphas = list(np.random.default_rng(0).uniform(0.1, 0.9, 60))
    meta = {"requests": 60, "seed": 3, "arrival": "poisson", "cv": 1.0}
    records = [_measured_run(cost, alphas, rate, policy, seed=3) for rate in (0.1, 0.3)
               for policy in ("off", "fixed:3", "goodput")]
    rows = predict_points(meta, records, StepModel(cost), WorkerSpec(max_batch_size=8, max_k=6), seed=7)
    assert [r["policy"] for r in rows] == [r["policy"] for r in records]
    for row in rows:  # same system, other random draws: close
        assert row["ratio"] == pytest.approx(1.0, abs=0.1)
    slow = StepModel(cost.replace(c_fixed_ms=2 * cost.c_fixed_ms, c_tok_ms=2 * cost.c_tok_ms))
    wrong = predict_points(meta, records, slow, WorkerSpec(max_batch_size=8, max_k=6), seed=7)
    assert all(r["ratio"] > 1.5 for r in wrong)
    # a cost model recorded with each point wins over the given one only when asked for
    tagged = [{**r, "cost_model": slow.cost.to_dict()} for r in records[:2]]
    ignored = predict_points(meta, tagged, StepModel(cost), WorkerSpec(max_batch_size=8, max_k=6), seed=7)
    used = predict_points(meta, tagged, StepModel(cost), WorkerSpec(max_batch_size=8, max_k=6), seed=7,
                          per_point_cost=True)
    assert all(abs(r["ratio"] - 1) < 0.1 for r in ignored) and all(r["ratio"] > 1.5 for r in used)


def test_step_overhead_fitted_on_one_point_predicts_the_others():
    cost = PRESETS["cpu-smollm2"]
    alphas = list(np.random.default_rng(1).uniform(0.3, 0.9, 40))
    meta = {"requests": 40, "seed": 4}
    records = [_measured_run(cost, alphas, rate, policy, seed=4, overhead_ms=60.0)
               for policy in ("off", "fixed:3") for rate in (0.1, 0.4)]
    worker = WorkerSpec(max_batch_size=8, max_k=6)
    overhead, anchor = fit_step_overhead(meta, records, StepModel(cost), worker, seed=9)
    assert (anchor["policy"], anchor["rate"]) == ("off", 0.1)
    assert overhead == pytest.approx(60.0, rel=0.15)
    rows = predict_points(meta, records, StepModel(cost, step_overhead_ms=overhead), worker, seed=9)
    assert all(abs(r["ratio"] - 1) < 0.1 for r in rows)


def test_claim_rows_compare_goodput_with_the_best_other_policy():
    def rec(policy, rate, mean, group="g"):
        return {"policy": policy, "rate": rate, "group": group, "mean_latency_s": mean}

    records = [rec("off", 1, 10.0), rec("fixed:3", 1, 8.0), rec("goodput", 1, 8.4),
               rec("off", 2, 10.0), rec("fixed:3", 2, 12.0), rec("goodput", 2, 9.0),
               rec("off", 3, 5.0)]  # no goodput at rate 3: no row
    rows = claim_rows(records)
    assert [(r["rate"], r["best_other"]) for r in rows] == [(1, "fixed:3"), (2, "off")]
    assert rows[0]["vs_best"] == pytest.approx(8.4 / 8.0) and rows[0]["vs_off"] == pytest.approx(0.84)
    assert rows[1]["vs_best"] == pytest.approx(0.9) and rows[1]["vs_off"] == pytest.approx(0.9)
    assert "| g | 1 | 8.400 | fixed:3 | 8.000 | 1.05 | 0.84 |" in claim_table(records)
    assert claim_table([rec("off", 1, 3.0)]) == ""


def test_claim_rows_pool_repeats_and_count_the_rounds_won_back_to_back():
    def rec(policy, repeats):
        # the record's own mean is the median repeat; the claim must use every repeat
        return {"policy": policy, "rate": 0.5, "group": "g", "mean_latency_s": sorted(repeats)[(len(repeats) - 1) // 2],
                "repeat_mean_latency_s": repeats}

    records = [rec("off", [10.0, 12.0, 14.0]), rec("fixed:5", [5.0, 9.0, 6.0]), rec("goodput", [5.5, 6.0, 6.5])]
    # median repeats alone: goodput 6.0 vs fixed:5 6.0; over all repeats: 6.0 vs 6.667
    (row,) = claim_rows(records)
    assert row["best_other"] == "fixed:5" and row["best_other_mean_latency_s"] == pytest.approx(20.0 / 3)
    assert row["vs_best"] == pytest.approx(6.0 / (20.0 / 3)) and row["vs_off"] == pytest.approx(0.5)
    assert (row["rounds_won"], row["rounds"]) == (1, 3)  # round 2 only (6.0 <= 9.0)
    table = claim_table(records)
    assert "| g | 0.5 | 6.000 | fixed:5 | 6.667 | 0.90 | 0.50 | 1/3 |" in table
    # one repeat: no rounds column at all
    single = [{**r, "repeat_mean_latency_s": None} for r in records]
    assert "rounds won" not in claim_table(single)


def test_bench_from_json_rerenders_tables_without_measuring(tmp_path, capsys):
    records = [_record("off", 1.0, 2.0), _record("goodput", 1.0, 0.8)]
    path = tmp_path / "r.json"
    write_json(path, {"machine": {}, "git_commit": "x", "date": "d", "model": "m", "proposer": "ngram",
                      "dataset": {"name": "g"}}, records)
    md = tmp_path / "r.md"
    # no worker, controller or --start: it must not try to reach anything
    assert main(["bench", "--from-json", str(path), "--markdown", str(md), "--json", ""]) == 0
    out = capsys.readouterr().out
    assert "bench: m + ngram, g" in out and "2.50x" in out and md.read_text() in out
    assert main(["bench", "--from-json", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_plot_draws_means_over_all_repeats_in_rate_order():
    records = [_record("off", 2.0, 4.0), _record("off", 1.0, 3.0), _record("goodput", 1.0, 2.0),
               {**_record("goodput", 2.0, 1.0), "repeat_mean_latency_s": [1.0, 3.0, 2.0]}]  # row 1.0, all repeats 2.0
    records[0] = {**records[0], "repeat_mean_latency_s": [4.0, 5.0, 9.0]}           # row 4.0, all repeats 6.0
    lines = plot_series(records)["g"]
    assert lines["off"][0] == [1.0, 2.0] and lines["off"][1] == [3.0, 6.0]
    assert lines["goodput"][1] == [2.0, 2.0]
    assert lines["goodput"][2] == pytest.approx([1.5, 3.0]) and lines["off"][2] == [1.0, 1.0]

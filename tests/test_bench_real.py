"""`bench` end to end on the real stack, in-process: a WorkerServer with the real SmolLM2 model and
the ngram proposer following a real ControllerServer on the real Redis. Policies go through the
real admin API; the records must show what each policy did on the worker."""

from __future__ import annotations

import pytest

from smartspec import Client
from smartspec.bench.calibrate import predict_points
from smartspec.bench.report import read_json
from smartspec.bench.simulator import StepModel, WorkerSpec
from smartspec.bench.step_models import cost_model_from_mapping
from smartspec.cli import main

pytestmark = pytest.mark.slow

MAX_TOKENS = 10
REQUESTS = 3


@pytest.fixture(scope="module")
def stack(start_real_stack):
    with start_real_stack(max_context_tokens=512) as addresses:
        yield addresses


def test_bench_cli_on_the_real_stack_switches_policies_and_reports_what_ran(stack, tmp_path):
    worker, controller = stack
    out = tmp_path / "bench.json"
    code = main(["bench", "--worker", worker, "--controller", controller, "--dataset", "code-edit",
                 "--requests", str(REQUESTS), "--max-tokens", str(MAX_TOKENS), "--rates", "2",
                 "--policies", "off,fixed:3", "--warmup", "1", "--json", str(out), "--plot", str(tmp_path / "b.png")])
    assert code == 0
    meta, records = read_json(out)
    with Client(controller=controller) as client:
        active = client.get_policy()
    assert (active.name, dict(active.parameters)) == ("fixed", {"k": 3})  # the last policy benchmarked

    assert meta["model"] == "SmolLM2-135M-Instruct" and meta["proposer"] == "ngram"
    assert meta["dataset"]["name"] == "code-edit" and meta["git_commit"] and meta["machine"]["cores"]
    off, fixed3 = records
    for record in records:
        assert record["failed"] == 0 and record["requests"] == REQUESTS
        assert record["completion_tokens"] == REQUESTS * MAX_TOKENS  # ignore_eos: every token asked for
        assert 0 < record["mean_ttft_s"] < record["mean_latency_s"]
        assert record["cost_model"]["c_fixed_ms"] > 0 and record["model"] == meta["model"]
    assert off["mean_k"] == 0.0 and off["acceptance_rate"] == 0.0
    assert 0.0 < fixed3["mean_k"] <= 3.0  # the worker ran the switched policy (clamped near max_tokens)
    assert (tmp_path / "b.png").stat().st_size > 10_000

    # the calibration tool takes the real run's records and the controller's fitted cost model
    rows = predict_points(meta, records, StepModel(cost_model_from_mapping(meta["cost_model"])),
                          WorkerSpec(max_batch_size=4, max_k=4, token_budget=512), per_point_cost=True)
    assert [r["policy"] for r in rows] == ["off", "fixed:3"]
    assert all(r["predicted_mean_latency_s"] > 0 for r in rows)

"""`bench` end to end on the real stack, in-process: a WorkerServer with the real SmolLM2 model and
the ngram proposer following a real ControllerServer on the real Redis. Policies go through the
real admin API; the records must show what each policy did on the worker."""

from __future__ import annotations

import asyncio

import pytest
import redis

from smartspec import AsyncClient
from smartspec.bench.calibrate import predict_points
from smartspec.bench.cli import bench
from smartspec.bench.datasets import load_dataset
from smartspec.bench.policy_spec import parse_policy_list
from smartspec.bench.simulator import StepModel, WorkerSpec
from smartspec.bench.step_models import cost_model_from_mapping
from smartspec.controller.server import ControllerServer
from smartspec.worker.engine import EngineConfig
from smartspec.worker.model import load_model
from smartspec.worker.proposers import make_proposer
from smartspec.worker.server import WorkerOptions, WorkerServer

pytestmark = pytest.mark.slow

MAX_TOKENS = 10
REQUESTS = 3


@pytest.fixture(scope="module")
def stack(redis_url):
    import uuid

    prefix = f"smartspec-test:{uuid.uuid4().hex[:12]}:"
    controller = ControllerServer(port=0, redis_url=redis_url, prefix=prefix)
    controller.start()
    options = WorkerOptions(
        engine=EngineConfig(max_batch_size=4, max_context_tokens=512, max_queue=8, token_budget=512, max_k=4),
        controller=controller.address, profile_steps=0, default_max_tokens=16, proposer_name="ngram",
    )
    worker = WorkerServer(load_model(), make_proposer("ngram"), options)
    port = worker.start()
    yield f"127.0.0.1:{port}", controller.address
    worker.stop(0)
    controller.stop(grace=0)
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_bench_on_the_real_stack_switches_policies_and_reports_what_ran(stack):
    worker, controller = stack
    dataset = load_dataset("code-edit", REQUESTS, seed=0, max_tokens=MAX_TOKENS, min_prompt_tokens=60,
                           max_prompt_tokens=150)

    async def go():
        async with AsyncClient(worker=worker, controller=controller, stream_timeout=600) as client:
            records = await bench(client, dataset=dataset, policies=parse_policy_list("off,fixed:3"),
                                     rates=[2.0], phases=None, requests=REQUESTS, warmup=1, arrival="poisson",
                                     cv=1.0, temperature=0.0, seed=0)
            active = await client.get_policy()
            status = await client.status()
            return records, active, status

    records, active, status = asyncio.run(go())
    off, fixed3 = records
    assert (active.name, dict(active.parameters)) == ("fixed", {"k": 3})
    for record in records:
        assert record["failed"] == 0 and record["requests"] == REQUESTS
        assert record["completion_tokens"] == REQUESTS * MAX_TOKENS  # ignore_eos: every token asked for
        assert 0 < record["mean_ttft_s"] < record["mean_latency_s"]
    assert off["mean_k"] == 0.0 and off["acceptance_rate"] == 0.0
    assert 0.0 < fixed3["mean_k"] <= 3.0  # the worker ran the switched policy (clamped near max_tokens)

    # the calibration tool accepts a real run's records and the controller's fitted cost model
    cost = cost_model_from_mapping(status.workers[0].cost_model.__dict__)
    rows = predict_points({"requests": REQUESTS, "seed": 0, "arrival": "poisson"}, records, StepModel(cost),
                          WorkerSpec(max_batch_size=4, max_k=4, token_budget=512))
    assert [r["policy"] for r in rows] == ["off", "fixed:3"]
    assert all(r["predicted_mean_latency_s"] > 0 for r in rows)

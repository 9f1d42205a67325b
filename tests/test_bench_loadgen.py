"""The load generator against a real grpc.aio Generation server whose *model* is faked by timing.

The fake server sleeps instead of computing (that is the only fake: gRPC, the SDK, the dispatcher
and the aggregation are the real ones), so open-loop timing and the per-point numbers can be checked.
"""

import asyncio
import time

import grpc
import numpy as np
import pytest

from smartspec.bench.cli import bench
from smartspec.bench.datasets import load_dataset
from smartspec.bench import loadgen
from smartspec.bench.loadgen import run_point, summarise_point
from smartspec.bench.report import REQUIRED_FIELDS
from smartspec.clients.client import AsyncClient
from smartspec.v1 import generation_pb2, generation_pb2_grpc

FIRST_TOKEN_S = 0.1
SERVICE_S = 0.4
SPEC_KS = [3, 3, 2]  # k per decode step reported for every request
ACCEPTED = 6
RATE = 0.75  # accepted / tested -> 8 tested positions


class TimedGeneration(generation_pb2_grpc.GenerationServicer):
    """Answers every request after fixed delays, whatever the concurrency: an infinitely wide model."""

    def __init__(self) -> None:
        self.received: list[float] = []

    async def Generate(self, request, context):
        self.received.append(time.perf_counter())
        if "REJECT" in request.messages[-1].content:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        await asyncio.sleep(FIRST_TOKEN_S)
        yield generation_pb2.GenerateResponse(delta=generation_pb2.TokenDelta(text="a", token_ids=[1]))
        await asyncio.sleep(SERVICE_S - FIRST_TOKEN_S)
        yield generation_pb2.GenerateResponse(result=generation_pb2.GenerationResult(
            request_id=request.request_id or "r",
            text="a" * request.max_tokens,
            finish_reason=generation_pb2.FINISH_REASON_LENGTH,
            usage=generation_pb2.Usage(prompt_tokens=len(request.messages[-1].content) // 4,
                                       completion_tokens=request.max_tokens),
            speculation=generation_pb2.SpeculationStats(
                proposed_tokens=sum(SPEC_KS), accepted_tokens=ACCEPTED, acceptance_rate=RATE,
                steps=len(SPEC_KS), speculation_lengths=SPEC_KS),
            total_ms=SERVICE_S * 1000,
        ))

    async def GetWorkerInfo(self, request, context):
        return generation_pb2.WorkerInfo(worker_id="fake", model="timed", max_batch_size=1000)


def _run(coro):
    return asyncio.run(coro)


def test_open_loop_sends_on_schedule_while_earlier_requests_are_still_running():
    async def go():
        server = grpc.aio.server()
        servicer = TimedGeneration()
        generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            prompts = load_dataset("chat", 10, seed=0, max_tokens=16).prompts
            arrivals = np.arange(10) * 0.05  # 20 req/s against a 0.4 s service: a closed loop would need 4 s
            async with AsyncClient(worker=f"127.0.0.1:{port}") as client:
                started = time.perf_counter()
                outcomes = await run_point(client, prompts, arrivals)
                wall = time.perf_counter() - started
            return outcomes, wall, np.array(servicer.received) - started
        finally:
            await server.stop(grace=None)

    outcomes, wall, received = _run(go())
    assert wall < 2.0  # last send at 0.45 s, then one service time; a closed loop needs >= 4 s
    lag = np.array([o.sent_s - o.scheduled_s for o in outcomes])
    assert np.all(lag >= 0) and lag.max() < 0.2  # generous for a loaded CI machine
    # the server saw them arrive on schedule, not one after another
    assert np.allclose(np.sort(received), np.arange(10) * 0.05, atol=0.25)
    latency = np.array([o.finish_s - o.scheduled_s for o in outcomes])
    assert np.all(latency >= SERVICE_S) and latency.mean() < SERVICE_S + 0.3
    ttft = np.array([o.first_token_s - o.scheduled_s for o in outcomes])
    assert np.all(ttft >= FIRST_TOKEN_S) and ttft.mean() < FIRST_TOKEN_S + 0.25


def test_point_aggregation_from_the_results():
    async def go():
        server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServicer_to_server(TimedGeneration(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            prompts = list(load_dataset("chat", 6, seed=1, max_tokens=20).prompts)
            prompts[2] = type(prompts[2])(**{**prompts[2].__dict__,
                                            "messages": (("user", "REJECT me"),)})
            async with AsyncClient(worker=f"127.0.0.1:{port}") as client:
                return await run_point(client, prompts, np.arange(6) * 0.02)
        finally:
            await server.stop(grace=None)

    outcomes = _run(go())
    point = summarise_point(outcomes)
    assert point["failed"] == 1 and "ResourceExhausted" in point["errors"][0]
    assert point["requests"] == 5
    assert point["completion_tokens"] == 5 * 20
    assert point["acceptance_rate"] == pytest.approx(RATE)
    assert point["mean_k"] == pytest.approx(sum(SPEC_KS) / len(SPEC_KS))
    assert SERVICE_S <= point["mean_latency_s"] < SERVICE_S + 0.3
    assert point["mean_tpot_s"] == pytest.approx((SERVICE_S - FIRST_TOKEN_S) / 19, rel=0.5)
    assert point["detail"]["tested"] == [8] * 5


def test_tested_positions_from_stats():
    assert loadgen.tested_positions(6, 0.75, [3, 3, 2]) == 8
    assert loadgen.tested_positions(0, 0.0, [2, 0, 4]) == 2  # each speculating step rejected its first proposal


def test_bench_switches_policy_before_each_policys_points_and_keeps_arrivals_paired():
    calls = []

    async def go():
        server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServicer_to_server(TimedGeneration(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with AsyncClient(worker=f"127.0.0.1:{port}") as client:
                async def set_policy(name, params):
                    calls.append((name, dict(params)))

                from smartspec.core.policy_spec import parse_policy_list

                records = await bench(
                    client, dataset=load_dataset("summarise", 4, seed=0, max_tokens=8),
                    policies=parse_policy_list("off,fixed:3"), rates=[10.0, 40.0], phases=None, requests=4,
                    warmup=1, arrival="poisson", cv=1.0, temperature=0.0, seed=0, set_policy=set_policy)
                return records
        finally:
            await server.stop(grace=None)

    records = _run(go())
    # warm-up, then rate by rate: every policy at 10 req/s, then every policy at 40 req/s
    assert calls == [("off", {}), ("off", {}), ("fixed", {"k": 3}), ("off", {}), ("fixed", {"k": 3})]
    assert [(r["policy"], r["rate"]) for r in records] == [("off", 10.0), ("off", 40.0), ("fixed:3", 10.0),
                                                          ("fixed:3", 40.0)]
    for r in records:
        assert set(REQUIRED_FIELDS) <= set(r) and r["group"] == "summarise" and r["requests"] == 4


def test_schedule_interleaves_policies_per_rate_and_rotates_who_goes_first():
    from smartspec.bench.cli import schedule

    order = schedule(policies=3, points=2, repeats=2)
    assert order[:6] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 1), (0, 1, 2), (0, 1, 0)]
    assert order[6:] == [(1, 0, 0), (1, 0, 1), (1, 0, 2), (1, 1, 1), (1, 1, 2), (1, 1, 0)]
    assert sorted(order) == sorted({(p, r, q) for p in range(2) for r in range(2) for q in range(3)})


def test_median_repeat_keeps_one_measured_repeat_and_lists_them_all():
    from smartspec.bench.cli import median_repeat

    runs = [{"mean_latency_s": 9.0, "p99_latency_s": 20.0}, {"mean_latency_s": 5.0, "p99_latency_s": 7.0},
            {"mean_latency_s": 6.0, "p99_latency_s": 30.0}]
    chosen = median_repeat(runs)
    assert chosen["mean_latency_s"] == 6.0 and chosen["p99_latency_s"] == 30.0  # that repeat's own figures
    assert chosen["repeats"] == 3 and chosen["repeat_mean_latency_s"] == [9.0, 5.0, 6.0]
    assert median_repeat(runs[:2])["mean_latency_s"] == 5.0  # even count: the lower median


def test_bench_cli_names_bad_input_and_unreachable_servers(capsys):
    from smartspec.cli import main

    assert main(["bench", "--worker", "127.0.0.1:1", "--controller", "127.0.0.1:2", "--policies", "off,fixed:x"]) == 2
    assert "policies[1].k: expected int, got 'x'" in capsys.readouterr().err   # the spec and field at fault
    assert main(["bench", "--worker", "127.0.0.1:1", "--controller", "127.0.0.1:2", "--dataset", "nope"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert main(["bench", "--worker", "127.0.0.1:1", "--controller", "127.0.0.1:2", "--requests", "2",
                 "--warmup", "0", "--json", ""]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err

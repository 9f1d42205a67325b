"""`smartspec worker` as a user runs it: a subprocess that serves, answers, and stops on SIGTERM;
and the startup profile it sends in its hello."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from smartspec.v1 import generation_pb2 as pb
from smartspec.v1 import generation_pb2_grpc


def worker_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "smartspec.cli", "worker", "--host", "127.0.0.1", "--port", "0",
            "--max-batch-size", "2", "--context-window", "256", "--token-budget", "256", "--max-k", "4",
            *extra]


def test_bad_local_policy_exits_2_before_loading_the_model():
    done = subprocess.run(worker_command("--local-policy", "fixed:many"), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "k:" in done.stderr and "fixed:many" not in done.stdout


def test_controller_none_is_no_controller_from_the_command_line_on(monkeypatch):
    from smartspec.cli import build_parser
    from smartspec.worker.server import WorkerOptions

    def controller(*argv: str):
        return build_parser(only="worker").parse_args(["worker", *argv]).controller

    assert controller() is None                                  # the default: plan with --local-policy
    assert controller("--controller", "none") is None and controller("--controller", "None") is None
    assert controller("--controller", "127.0.0.1:50051") == "127.0.0.1:50051"
    monkeypatch.setenv("SMARTSPEC_CONTROLLER", "none")
    assert controller() is None
    monkeypatch.setenv("SMARTSPEC_CONTROLLER", "dns:///controller:50051")
    assert controller() == "dns:///controller:50051" and controller("--controller", "none") is None
    assert WorkerOptions().controller is None


def test_bad_engine_limits_exit_2():
    done = subprocess.run(worker_command("--token-budget", "4"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "token_budget" in done.stderr


@pytest.mark.slow
def test_worker_subprocess_serves_and_stops_on_sigterm():
    env = dict(os.environ, SMARTSPEC_LOCAL_POLICY="fixed:2", SMARTSPEC_PROFILE_STEPS="0")
    process = subprocess.Popen(worker_command(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=env)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "worker listening on" not in line:
            assert time.monotonic() < deadline and process.poll() is None, "worker did not start"
            line = process.stdout.readline()
        address = line.strip().rsplit(" ", 1)[-1]
        with grpc.insecure_channel(address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            assert stub.GetWorkerInfo(pb.GetWorkerInfoRequest(), timeout=10).local_policy.name == "fixed"
            responses = list(stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=4, ignore_eos=True),
                                           timeout=60))
            result = responses[-1].result
            assert result.usage.completion_tokens == 4
            assert all(k <= 2 for k in result.speculation.speculation_lengths)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_startup_profile_covers_the_grid_and_reaches_the_hello():
    from smartspec.worker.engine import EngineConfig
    from smartspec.worker.model import load_model
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.server import WorkerOptions, WorkerServer

    model = load_model()
    options = WorkerOptions(engine=EngineConfig(max_batch_size=8, max_context_tokens=256, token_budget=256, max_k=4),
                            local_policy="goodput", profile_steps=1)
    server = WorkerServer(model, make_proposer("ngram"), options)
    server.start()
    try:
        grid = {(s.batch_size, s.speculation_length) for s in server.profile}
        # batch {1, 4, 8, 16} capped at the 8 slots, x k {0, 2, 4, 8}; one (median) sample per point
        assert grid == {(b, k) for b in (1, 4, 8) for k in (0, 2, 4, 8)} and len(server.profile) == len(grid)
        assert all(s.verify_ms > 0 and s.draft_ms >= 0 and s.context_tokens == 128 for s in server.profile)
        assert list(server.hello().profile) == server.profile
        # The local goodput policy plans with the cost model fitted from this profile, not the prior.
        from smartspec.core.cost_model import DEFAULT_COST_MODEL

        assert server.engine.planner.cost != DEFAULT_COST_MODEL
    finally:
        server.stop(0)

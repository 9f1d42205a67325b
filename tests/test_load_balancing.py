"""One client, two real worker processes: gRPC's round robin spreads the calls, and when one worker
is killed (SIGKILL, mid-run) the other serves everything that follows.

What happens when a worker dies, exactly (asserted below):
- a Generate stream running on it fails with UnavailableError (the connection is gone); the deltas
  it already delivered stay with the caller, and the SDK does not re-send it (a generation is not
  idempotent: a second run would stream its text again). Re-submitted by the caller, it completes on
  the surviving worker, with the same greedy tokens;
- streams running on the surviving worker finish normally;
- idempotent calls (worker_info) made around the kill all succeed: the channel drops the dead
  worker's connection and retries of an UNAVAILABLE answer go to the next server;
- new generations after the kill all land on the surviving worker and succeed.

Workers run a tiny random-weight Llama (written by tests/test_model_tiny.py's helper) with
`--controller none`, started as a user would (`python -m smartspec.cli worker ...`).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import threading
import time
import urllib.request

import pytest

from smartspec import AsyncClient, Client, UnavailableError
from smartspec.core.launch import wait_serving
from smartspec.core.processes import free_port, start_child, stop_child
from tiny_model import write_tiny_model

pytestmark = pytest.mark.slow

PROMPT = "t5 t6 t7 t8 t5 t6 t7"
LONG_TOKENS = 1500       # streams that are still running when a worker is killed (long enough that none
                         # can finish between starting and the kill, even on a loaded machine)
SHORT_TOKENS = 4


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Two workers on free ports: [(address, metrics port, Child)]."""
    folder = tmp_path_factory.mktemp("tiny-model")
    logs = tmp_path_factory.mktemp("worker-logs")
    write_tiny_model(folder, max_positions=2048)
    started = []
    for index in range(2):
        port, metrics = free_port(), free_port()
        argv = [sys.executable, "-m", "smartspec.cli", "worker", "--host", "127.0.0.1", "--port", str(port),
                "--metrics-port", str(metrics), "--worker-id", f"lb-{index}", "--controller", "none",
                "--model", str(folder), "--local-policy", "fixed:2", "--profile-steps", "0",
                "--max-batch-size", "8", "--max-queue", "16", "--context-window", "2048",
                "--token-budget", "256", "--grace-s", "1"]
        started.append((f"127.0.0.1:{port}", metrics, start_child(f"worker-{index}", argv, logs)))
    try:
        for address, _, child in started:
            wait_serving(child, address, timeout_s=180, what="tiny model")
        yield started
    finally:
        for _, _, child in started:
            stop_child(child, grace_s=5)


def finished_requests(metrics_port: int) -> float:
    """smartspec_worker_requests_total over every finish reason, from the worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(r"^smartspec_worker_requests_total\{[^}]*\} (\S+)$", text, re.M))


def test_requests_spread_then_the_survivor_serves_everything_after_a_kill(workers):
    (a, a_metrics, a_child), (b, b_metrics, _) = workers
    addresses = [a, b]

    # --- both up: round robin -----------------------------------------------------------------------
    with Client(worker=addresses) as client:
        # A new channel sends its first calls to the first worker that is READY (connected and
        # SERVING); round robin covers both once both are: warm up until both have answered.
        seen, deadline = set(), time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.add(client.worker_info().worker_id)
        answered = [client.worker_info().worker_id for _ in range(10)]
        before = [finished_requests(a_metrics), finished_requests(b_metrics)]
        results = [client.complete(PROMPT, max_tokens=SHORT_TOKENS, temperature=0, ignore_eos=True)
                   for _ in range(10)]
        served = [finished_requests(a_metrics) - before[0], finished_requests(b_metrics) - before[1]]
    print(f"worker_info answered by: lb-0 {answered.count('lb-0')}, lb-1 {answered.count('lb-1')}; "
          f"generations finished: lb-0 {served[0]:.0f}, lb-1 {served[1]:.0f}")
    assert answered.count("lb-0") >= 4 and answered.count("lb-1") >= 4, answered   # 5/5: strict turns
    assert served[0] >= 4 and served[1] >= 4 and sum(served) == 10, served
    assert all(r.usage.completion_tokens == SHORT_TOKENS for r in results)
    assert len({r.text for r in results}) == 1   # greedy: the same text whichever worker ran it

    # --- kill lb-0 mid-run --------------------------------------------------------------------------
    probe_errors: list[BaseException] = []
    probe_answers: list[str] = []
    stop_probing = threading.Event()

    def probe() -> None:   # idempotent calls all through the kill, on their own client
        with Client(worker=addresses, initial_backoff_s=0.05) as prober:
            while not stop_probing.is_set():
                try:
                    probe_answers.append(prober.worker_info().worker_id)
                except BaseException as exc:   # noqa: BLE001 - counted, asserted below
                    probe_errors.append(exc)
                time.sleep(0.01)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()

    async def run() -> dict:
        async with AsyncClient(worker=addresses, initial_backoff_s=0.05) as client, \
                AsyncClient(worker=a) as only_a, AsyncClient(worker=b) as only_b:
            answered, deadline = set(), time.monotonic() + 10   # warm up, as above
            while len(answered) < 2 and time.monotonic() < deadline:
                answered.add((await client.worker_info()).worker_id)
            assert answered == {"lb-0", "lb-1"}, answered
            streams = [client.generate(PROMPT, max_tokens=LONG_TOKENS, temperature=0, ignore_eos=True,
                                       request_id=f"long-{i}") for i in range(8)]
            firsts = await asyncio.gather(*(s.__anext__() for s in streams))   # all started, all running
            running = [(await only_a.worker_info()).running_requests, (await only_b.worker_info()).running_requests]
            os.kill(a_child.process.pid, signal.SIGKILL)
            killed_at = time.monotonic()

            async def finish(stream, first):
                tokens = list(first.token_ids)
                try:
                    async for delta in stream:
                        tokens.extend(delta.token_ids)
                    return "completed", tokens, stream.result
                except UnavailableError as exc:
                    ended.append(time.monotonic() - killed_at)
                    return "unavailable", tokens, exc

            ended: list[float] = []
            outcomes = await asyncio.gather(*(finish(s, f) for s, f in zip(streams, firsts)))
            failed_within_s = max(ended, default=0.0)
            after = [await client.complete(PROMPT, max_tokens=SHORT_TOKENS, temperature=0, ignore_eos=True)
                     for _ in range(6)]
            # the caller re-submits what failed: same request ids, now free again
            redone = {i: await client.complete(PROMPT, max_tokens=LONG_TOKENS, temperature=0, ignore_eos=True,
                                               request_id=f"long-{i}")
                      for i, (kind, _, _) in enumerate(outcomes) if kind == "unavailable"}
            return dict(running=running, outcomes=outcomes, after=after, redone=redone,
                        failed_within_s=failed_within_s)

    b_before = finished_requests(b_metrics)
    try:
        got = asyncio.run(run())
    finally:
        stop_probing.set()
        prober.join(10)
    assert a_child.process.wait(10) == -signal.SIGKILL

    outcomes, running = got["outcomes"], got["running"]
    failed = [tokens for kind, tokens, _ in outcomes if kind == "unavailable"]
    errors = {str(exc) for kind, _, exc in outcomes if kind == "unavailable"}
    completed = [(tokens, result) for kind, tokens, result in outcomes if kind == "completed"]
    print(f"in flight at the kill: lb-0 {running[0]}, lb-1 {running[1]}; failed UNAVAILABLE {len(failed)} "
          f"(within {got['failed_within_s']:.2f} s of the kill: {sorted(errors)}), completed {len(completed)}; "
          f"worker_info probes {len(probe_answers)} ok ({probe_answers.count('lb-1')} on lb-1), "
          f"{len(probe_errors)} failed")

    assert sum(running) == 8 and running[0] >= 1 and running[1] >= 1, running
    # exactly the streams on the killed worker fail, with UNAVAILABLE; the others run to their end
    assert len(failed) == running[0] and len(completed) == running[1]
    assert all(len(tokens) < LONG_TOKENS for tokens in failed)
    assert all(len(tokens) == LONG_TOKENS == result.usage.completion_tokens for tokens, result in completed)
    # nothing lost: re-submitted, each completes on the survivor, its delivered prefix unchanged (greedy)
    assert len(got["redone"]) == len(failed)
    reference_text, reference_tokens = completed[0][1].text, completed[0][0]
    assert all(r.usage.completion_tokens == LONG_TOKENS and r.text == reference_text for r in got["redone"].values())
    assert all(tokens == reference_tokens[:len(tokens)] for tokens in failed)
    # after the kill everything lands on lb-1 and succeeds
    assert all(r.usage.completion_tokens == SHORT_TOKENS for r in got["after"])
    assert finished_requests(b_metrics) - b_before == running[1] + len(got["after"]) + len(failed)
    assert not probe_errors, probe_errors[:3]
    assert "lb-1" in probe_answers and probe_answers[-1] == "lb-1"

"""`smartspec up`: the process plumbing (real redis-server, process groups) and, end to end (slow),
Redis + controller + worker started as children, a demo, a generation through the SDK, and a clean
stop on SIGINT."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from smartspec import Client
from smartspec.cli.demo import compact_ks, demo_prompts, k_range, report_table
from smartspec.core.processes import start_child, stop_all, stop_child
from smartspec.clients.types import GenerationResult, SpeculationStats, Usage
from smartspec.core.launch import start_redis


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_private_redis_starts_answers_and_stops(tmp_path):
    child, url = start_redis(tmp_path)
    try:
        client = redis.Redis.from_url(url)
        assert client.ping() and client.config_get("save")["save"] == ""  # no persistence
        client.close()
    finally:
        stop_all([child], grace_s=5)
    assert not alive(child.process.pid)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()


def test_stop_child_ends_the_whole_process_group(tmp_path):
    # a shell that ignores SIGTERM and leaves a grandchild: both must be gone afterwards
    pid_file = tmp_path / "grandchild.pid"
    script = f"trap '' TERM; sleep 300 & echo $! > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; wait"
    child = start_child("stubborn", ["bash", "-c", script], tmp_path)
    deadline = time.monotonic() + 10
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    started = time.monotonic()
    stop_child(child, grace_s=0.5)
    assert time.monotonic() - started < 5
    assert not alive(child.process.pid)
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def test_demo_prompts_come_from_the_standard_library():
    import inspect
    import textwrap

    prompts = {p.name: p for p in demo_prompts()}
    assert set(prompts) == {"summarise", "code-edit", "chat"}
    assert inspect.getsource(textwrap.indent) in prompts["code-edit"].prompt
    assert isinstance(prompts["chat"].prompt, list) and prompts["chat"].prompt[0]["role"] == "user"


def test_compact_k_history_and_range():
    assert compact_ks([0, 0, 3, 3, 3, 2]) == "0*2 3*3 2"
    assert compact_ks(list(range(12)), limit=3) == "0 1 2 ..."
    assert compact_ks([]) == "" and k_range([]) == "-"
    assert k_range([4, 0, 2]) == "0/2/4"


def _result(text: str, total_ms: float, ks: tuple[int, ...] = ()) -> GenerationResult:
    spec = SpeculationStats(0, 0, 0.5, 1.0, len(ks), 0.0, ks)
    return GenerationResult("r", text, "length", Usage(1, 2), spec, 1.0, total_ms, 0.0)


def test_report_table_shows_speedup_and_flags_differing_text():
    prompts = demo_prompts()
    off = [_result("a", 300.0), _result("b", 100.0), _result("c", 100.0)]
    on = [_result("a", 100.0, (3, 3)), _result("B", 200.0), _result("c", 100.0)]
    table = report_table(prompts, off, on)
    rows = {line.split()[0]: line for line in table.splitlines()[2:5]}
    assert "3.00x" in rows["summarise"] and rows["summarise"].rstrip().endswith("yes")
    assert "0.50x" in rows["code-edit"] and rows["code-edit"].rstrip().endswith("NO")
    assert "(1.25x)" in table  # 500 ms off / 400 ms goodput


class LineReader:
    """Collects a subprocess's output lines on a thread, so the test can wait with a timeout."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)  # EOF: the process is gone

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} (within {timeout_s} s, before EOF); output:\n"
                             + "".join(self.seen))


@pytest.mark.slow
def test_up_demo_serve_generate_then_sigint_stops_every_child(redis_url, redis_prefix, tmp_path):
    argv = [sys.executable, "-m", "smartspec.cli", "up", "--redis", redis_url, "--redis-prefix", redis_prefix,
            "--controller-port", "0", "--worker-port", "0", "--controller-metrics-port", "0",
            "--worker-metrics-port", "0", "--log-dir", str(tmp_path), "--demo", "--serve",
            "--demo-max-tokens", "8", "--grace", "5"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = LineReader(proc.stdout)
    try:
        controller = output.wait_for(r"^controller\s+listening on (\S+) \(gRPC\)\s+metrics (\S+)\s+pid (\d+)", 300)
        worker = output.wait_for(r"^worker\s+listening on (\S+) \(gRPC\)\s+metrics (\S+)\s+pid (\d+)", 10)
        output.wait_for(r"^serving; Ctrl-C", 300)
        demo = "".join(output.seen)
        for name in ("summarise", "code-edit", "chat"):
            row = next(line for line in demo.splitlines() if line.startswith(name))
            assert row.rstrip().endswith("yes"), f"greedy output changed with speculation: {row}"

        with Client(worker=worker[1], controller=controller[1]) as client:
            result = client.complete("def add(a, b):", max_tokens=6, temperature=0)
            assert 0 < result.usage.completion_tokens <= 6 and result.text
            assert client.get_policy().name == "goodput"  # the demo's last setting, stored in Redis
            assert any(w.steps > 0 for w in client.status().workers)
        for metrics_url in (controller[2], worker[2]):
            with urllib.request.urlopen(metrics_url, timeout=5) as response:
                assert response.status == 200
        child_pids = [int(controller[3]), int(worker[3])]
        assert all(alive(pid) for pid in child_pids)

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not any(alive(pid) for pid in child_pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_refuses_a_busy_port_before_starting_anything(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "smartspec.cli", "up", "--controller-port", str(port), "--log-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1
    assert "--controller-port" in done.stderr and str(port) in done.stderr
    assert list(tmp_path.iterdir()) == []  # no child was started (no logs)

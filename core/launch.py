"""Starting the stack's parts as local child processes: ports, command lines, readiness.

Used by `smartspec up`, the benchmarks that run a real stack, and the end-to-end tests, so that all
of them start each part exactly as a user would by hand (`python -m smartspec.cli ...`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from smartspec.core.healthcheck import check as health_status
from smartspec.core.processes import Child, free_port, start_child, wait_port_open
from smartspec.core.redis_launcher import find_redis_server, redis_server_argv


@dataclass(frozen=True)
class Ports:
    controller: int
    worker: int
    controller_metrics: int
    worker_metrics: int


def resolve_port(port: int, host: str) -> int:
    """0 means "any free port": chosen here, because `up` must know it to wait and to print it."""
    return port if port else free_port(host)


def controller_argv(host: str, ports: Ports, redis_url: str, redis_prefix: str) -> list[str]:
    return [sys.executable, "-m", "smartspec.cli", "controller", "--host", host, "--port", str(ports.controller),
            "--metrics-port", str(ports.controller_metrics), "--redis", redis_url, "--redis-prefix", redis_prefix]


def worker_argv(host: str, ports: Ports, model: str, proposer: str) -> list[str]:
    argv = [sys.executable, "-m", "smartspec.cli", "worker", "--host", host, "--port", str(ports.worker),
            "--metrics-port", str(ports.worker_metrics), "--controller", f"{host}:{ports.controller}",
            "--proposer", proposer]
    return argv + (["--model", model] if model else [])


def wait_serving(child: Child, address: str, timeout_s: float, what: str) -> None:
    """Poll grpc.health.v1 until SERVING, with a spinner on a terminal; fail fast if the child dies."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    if not interactive:
        print(f"waiting for {child.name} ({what})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout_s
    with tqdm(desc=f"waiting for {child.name} ({what})", total=None, leave=False, file=sys.stderr,
              bar_format="{desc}: {elapsed}", disable=not interactive) as spinner:
        while True:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with status {child.process.returncode}; "
                                   f"last log lines ({child.log_path}):\n{child.log_tail()}")
            if health_status(address, timeout_s=1.0) == "SERVING":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} at {address} not SERVING after {timeout_s:.0f} s; "
                                   f"see {child.log_path}")
            time.sleep(0.25)
            spinner.update(0)  # redraw the elapsed time


def start_redis(log_dir: Path) -> tuple[Child, str]:
    port = free_port("127.0.0.1")
    child = start_child("redis", redis_server_argv(find_redis_server(), port), log_dir)
    if not wait_port_open("127.0.0.1", port, timeout_s=10):
        raise RuntimeError(f"redis-server did not open port {port}:\n{child.log_tail()}")
    return child, f"redis://127.0.0.1:{port}/0"

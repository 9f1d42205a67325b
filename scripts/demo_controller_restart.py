"""A worker keeps serving while its controller is killed (SIGKILL) and restarted on the same port.

    python scripts/demo_controller_restart.py [--phase-s 8] [--clients 3]

Starts a real `smartspec controller` (fixed free port, private Redis prefix) and a real
`smartspec worker` process (default model, ngram proposer) connected to it. Client loops stream
generations through the SDK the whole time. Phases: `before` (controller up), `during` (controller
killed with SIGKILL: the worker plans locally, counting fallback steps), `after` (controller
restarted on the same port; the worker reconnects by itself). Prints, per phase, requests
completed and the worker's WorkerInfo.fallback_steps / controller_connected, then stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from demo_support import SMARTSPEC, REDIS_URL, Child, DemoFailure, check, main_wrapper, private_prefix, wipe_prefix
from smartspec import AsyncClient
from smartspec.core.processes import free_port

PROMPT = "Write a short list of tips for writing clear Python code:\n1."


class Workload:
    """Client loops that stream generations and tally completions by the phase they ended in."""

    def __init__(self, address: str, clients: int) -> None:
        self.address = address
        self.clients = clients
        self.phase = "before"
        self.completed: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self._stop = asyncio.Event()

    async def _loop(self, client: AsyncClient, index: int) -> None:
        while not self._stop.is_set():
            try:
                stream = client.generate(PROMPT, max_tokens=24, temperature=0.0, ignore_eos=True)
                async for _ in stream:
                    pass
                self.completed[self.phase] = self.completed.get(self.phase, 0) + 1
            except Exception as exc:          # any failure is the demo's point: count and show it
                self.failed[self.phase] = self.failed.get(self.phase, 0) + 1
                print(f"  client {index}: {type(exc).__name__}: {exc}", file=sys.stderr)
                await asyncio.sleep(0.2)

    async def run(self, client: AsyncClient) -> None:
        await asyncio.gather(*(self._loop(client, i) for i in range(self.clients)))

    def stop(self) -> None:
        self._stop.set()


def start_controller(port: int, prefix: str, log_dir: Path, name: str) -> Child:
    child = Child(name, [*SMARTSPEC, "controller", "--host", "127.0.0.1", "--port", str(port),
                         "--redis", REDIS_URL, "--redis-prefix", prefix], log_dir)
    child.wait_for(r"controller listening on", 60)
    return child


async def wait_connected(client: AsyncClient, want: bool, timeout_s: float) -> float:
    """Seconds until WorkerInfo.controller_connected == want."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if (await client.worker_info()).controller_connected == want:
            return time.monotonic() - began
        await asyncio.sleep(0.1)
    raise DemoFailure(f"worker's controller_connected did not become {want} within {timeout_s:.0f} s")


async def scenario(args, controller_port: int, prefix: str, log_dir: Path, children: dict[str, Child]) -> None:
    worker = children["worker"]
    address = worker.wait_for(r"worker listening on (\S+)", 600).group(1)
    print(f"controller 127.0.0.1:{controller_port} (pid {children['controller'].pid}), "
          f"worker {address} (pid {worker.pid}), redis prefix {prefix!r}")
    async with AsyncClient(worker=address, stream_timeout=120) as client:
        await wait_connected(client, True, 30)
        workload = Workload(address, args.clients)
        running = asyncio.create_task(workload.run(client))
        rows = []

        async def phase_end(phase: str) -> None:
            info = await client.worker_info()
            rows.append((phase, workload.completed.get(phase, 0), workload.failed.get(phase, 0),
                         info.fallback_steps, info.controller_connected))

        start_info = await client.worker_info()
        await asyncio.sleep(args.phase_s)
        await phase_end("before")

        workload.phase = "during"
        await asyncio.to_thread(children["controller"].kill9)
        print(f"kill -9 controller pid {children['controller'].pid}")
        await wait_connected(client, False, 30)
        await asyncio.sleep(args.phase_s)
        await phase_end("during")

        workload.phase = "after"
        children["controller"] = await asyncio.to_thread(
            start_controller, controller_port, prefix, log_dir, "controller-restarted")
        print(f"controller restarted on 127.0.0.1:{controller_port} (pid {children['controller'].pid})")
        reconnect_s = await wait_connected(client, True, 30)
        print(f"worker reconnected {reconnect_s:.1f} s after the restart")
        fallbacks_at_reconnect = (await client.worker_info()).fallback_steps
        await asyncio.sleep(args.phase_s)
        await phase_end("after")
        workload.stop()
        await running

    print("\n| phase | requests completed | failed | fallback_steps at end (cumulative) | controller_connected |")
    print("|---|---:|---:|---:|---|")
    print(f"| start | - | - | {start_info.fallback_steps} | {start_info.controller_connected} |")
    for phase, done, failed, fallbacks, connected in rows:
        print(f"| {phase} | {done} | {failed} | {fallbacks} | {connected} |")
    before, during, after = rows
    print(f"fallback steps: before {before[3] - start_info.fallback_steps}, during {during[3] - before[3]}, "
          f"after {after[3] - during[3]} (of which {fallbacks_at_reconnect - during[3]} before the reconnect)")
    check(all(r[1] > 0 for r in rows), "some phase completed no request")
    check(sum(r[2] for r in rows) == 0, "some generations failed")
    check(during[3] > before[3], "no fallback steps counted while the controller was down")
    check(after[4], "worker not connected after the restart")
    check(after[3] - fallbacks_at_reconnect <= (during[3] - before[3]) // 4,
          "fallbacks kept growing after the reconnect")
    print("OK: generations completed in every phase, fallbacks only while the controller was away, reconnected")


def demo(args) -> None:
    prefix = private_prefix("restart")
    log_dir = Path(tempfile.mkdtemp(prefix="smartspec-demo-restart-"))
    controller_port = free_port()
    children: dict[str, Child] = {}
    try:
        children["controller"] = start_controller(controller_port, prefix, log_dir, "controller")
        children["worker"] = Child("worker", [*SMARTSPEC, "worker", "--host", "127.0.0.1", "--port", "0",
                                              "--controller", f"127.0.0.1:{controller_port}", "--proposer", "ngram",
                                              "--max-batch-size", "4", "--worker-id", f"demo-{prefix[-9:-1]}"],
                                   log_dir)
        asyncio.run(scenario(args, controller_port, prefix, log_dir, children))
    finally:
        codes = {name: child.stop() for name, child in reversed(children.items())}
        print(f"stopped {codes}; logs in {log_dir}")
        wipe_prefix(prefix)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-s", type=float, default=8.0, help="seconds per phase")
    parser.add_argument("--clients", type=int, default=3, help="concurrent generate loops")
    args = parser.parse_args()
    return main_wrapper(lambda: demo(args))


if __name__ == "__main__":
    sys.exit(main())

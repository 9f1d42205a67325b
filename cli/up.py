"""`smartspec up`: Redis, one controller and one worker as local child processes, in one command.

    smartspec up                 # serve until Ctrl-C
    smartspec up --demo          # then run a small workload without and with speculation, and exit
    smartspec up --redis redis://127.0.0.1:6379/0 --controller-port 0 --worker-port 0

Without --redis a private redis-server (no persistence) runs on a free port. Each part is started
as `python -m smartspec.cli ...`, exactly as a user would start it by hand; `up` waits for the gRPC
health of each, prints where every part listens, and on Ctrl-C (or SIGTERM) stops them all:
SIGTERM to each process group, SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

from smartspec.clients.errors import SmartspecError
from smartspec.core.config import add_flag, add_option
from smartspec.core.launch import Ports, controller_argv, resolve_port, start_redis, wait_serving, worker_argv
from smartspec.core.processes import Child, check_ports_free, start_child, stop_all


def listening_lines(host: str, ports: Ports, redis_url: str, children: dict[str, Child]) -> list[str]:
    """What `up` prints once everything is healthy (tests and scripts wait for these lines)."""
    redis = children.get("redis")
    return [
        f"redis       {'listening on' if redis else 'using'} {redis_url}" + (f"  pid {redis.process.pid}" if redis else ""),
        f"controller  listening on {host}:{ports.controller} (gRPC)  metrics "
        f"http://{host}:{ports.controller_metrics}/metrics  pid {children['controller'].process.pid}",
        f"worker      listening on {host}:{ports.worker} (gRPC)  metrics "
        f"http://{host}:{ports.worker_metrics}/metrics  pid {children['worker'].process.pid}",
    ]


def _interrupt_on_signals() -> None:
    """SIGINT and SIGTERM both raise KeyboardInterrupt once (start-up, demo and serving all stop
    the same way); later signals are ignored so they cannot cut the children's shutdown short."""

    def handle(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def serve_until_stopped(children: list[Child]) -> int:
    """Block until a signal (exit 0) or until a child dies on its own (exit 1)."""
    try:
        while True:
            dead = next((c for c in children if not c.alive()), None)
            if dead is not None:
                print(f"{dead.name} exited with status {dead.process.returncode}; stopping the rest\n"
                      f"{dead.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0


def run_demo(host: str, ports: Ports, max_tokens: int) -> None:
    from smartspec.clients.client import AsyncClient
    from smartspec.cli.demo import run_demo as demo

    async def go() -> str:
        async with AsyncClient(worker=f"{host}:{ports.worker}", controller=f"{host}:{ports.controller}",
                               stream_timeout=1800) as client:
            return (await demo(client, max_tokens=max_tokens))["table"]

    print(f"\ndemo: 3 requests at once, max {max_tokens} tokens each, greedy; first with policy `off`, "
          "then with `goodput`", flush=True)
    print(asyncio.run(go()), flush=True)


def configure(parser) -> None:
    add_option(parser, "--host", default="127.0.0.1", help="address the controller and worker listen on")
    add_option(parser, "--controller-port", default=50051, type=int, help="controller gRPC port (0 = any free)")
    add_option(parser, "--worker-port", default=50061, type=int, help="worker gRPC port (0 = any free)")
    add_option(parser, "--controller-metrics-port", default=9101, type=int,
               help="controller Prometheus port (0 = any free)")
    add_option(parser, "--worker-metrics-port", default=9102, type=int, help="worker Prometheus port (0 = any free)")
    add_option(parser, "--model", default="", help="worker's target model (default: the worker's default model)")
    add_option(parser, "--proposer", default="ngram", help="worker's proposer")
    add_option(parser, "--redis", default="", help="use this Redis URL instead of starting a private redis-server")
    add_option(parser, "--redis-prefix", default="smartspec:", help="prefix of the controller's Redis keys")
    add_flag(parser, "--demo", help="after start-up, run a small workload with policy off, then goodput; then exit")
    add_flag(parser, "--serve", help="with --demo: keep serving after the demo")
    add_option(parser, "--demo-max-tokens", default=64, type=int, help="tokens per demo request")
    add_option(parser, "--startup-timeout", default=900.0, type=float,
               help="seconds to wait for each part to become healthy (model load + profile)")
    add_option(parser, "--log-dir", default="", help="where the children's logs go (default: a new temp dir)")
    add_option(parser, "--grace", default=10.0, type=float, help="seconds between SIGTERM and SIGKILL at shutdown")


def run(args) -> int:
    _interrupt_on_signals()
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="smartspec-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    requested = {"--controller-port": args.controller_port, "--worker-port": args.worker_port,
                 "--controller-metrics-port": args.controller_metrics_port,
                 "--worker-metrics-port": args.worker_metrics_port}
    children: list[Child] = []
    try:
        check_ports_free(args.host, {option: port for option, port in requested.items() if port})
        ports = Ports(*(resolve_port(port, args.host) for port in requested.values()))
        redis_url = args.redis
        if not redis_url:
            redis_child, redis_url = start_redis(log_dir)
            children.append(redis_child)
        controller = start_child("controller", controller_argv(args.host, ports, redis_url, args.redis_prefix), log_dir)
        children.append(controller)
        wait_serving(controller, f"{args.host}:{ports.controller}", args.startup_timeout, "connecting to Redis")
        worker = start_child("worker", worker_argv(args.host, ports, args.model, args.proposer), log_dir)
        children.append(worker)
        wait_serving(worker, f"{args.host}:{ports.worker}", args.startup_timeout, "loading the model, profiling")
        for line in listening_lines(args.host, ports, redis_url, {c.name: c for c in children}):
            print(line, flush=True)
        print(f"logs in {log_dir}", flush=True)
        if args.demo:
            run_demo(args.host, ports, args.demo_max_tokens)
            if not args.serve:
                return 0
        print("serving; Ctrl-C stops everything", flush=True)
        return serve_until_stopped(children)
    except (RuntimeError, TimeoutError, OSError, SmartspecError) as exc:
        print(f"smartspec up: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if children:
            print("stopping " + ", ".join(c.name for c in reversed(children)), file=sys.stderr, flush=True)
        stop_all(children, grace_s=args.grace)

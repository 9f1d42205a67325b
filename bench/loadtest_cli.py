"""`smartspec loadtest`: how many worker steps per second controller replicas plan, and how fast.

    smartspec loadtest                                   # start 2 controllers, run the default grid
    smartspec loadtest --batches 256 --streams 20 --replicas 1 --rate 40 --duration-s 10
    smartspec loadtest --controller 127.0.0.1:50051 --batches 64 --streams 4   # a running controller

Simulated workers (`bench.controller_load`) stream realistic step reports over real gRPC to real
controllers sharing one Redis; each point runs `--duration-s` seconds for every (replicas, streams,
batch) of the grid, streams spread round-robin over the replicas. `--rate 0` (default) sends each
report as soon as the previous plan is back (the most steps/s); `--rate R` sends R reports/s per
stream, as a GPU worker stepping R times/s would. Without --controller, the controllers are started
here (`smartspec controller`, one process each) on a private key prefix of --redis that is wiped
afterwards, and their CPU time per planned step is reported too. Exit status 1 when any report
went unanswered or a plan did not match its report.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from smartspec.core.config import add_flag, add_option


def configure(parser) -> None:
    add_option(parser, "--controller", default="",
               help="HOST:PORT[,HOST:PORT...] of running controllers (default: start --replicas of them)")
    add_option(parser, "--redis", default="redis://127.0.0.1:6379/0", help="Redis URL for started controllers")
    add_option(parser, "--batches", default="1,64,256", help="requests per report, comma-separated")
    add_option(parser, "--streams", default="1,4,16", help="simulated workers, comma-separated")
    add_option(parser, "--replicas", default="1,2", help="controller replicas the streams spread over")
    add_option(parser, "--duration-s", default=5.0, type=float, help="seconds per point")
    add_option(parser, "--rate", default=0.0, type=float,
               help="reports per second per stream; 0 = the next as soon as the plan is back")
    add_option(parser, "--step-ms", default=25.0, type=float,
               help="one worker step (25 ms = 40 steps/s): round trips longer than this are counted")
    add_option(parser, "--max-k", default=8, type=int, help="the simulated workers' max speculation length")
    add_flag(parser, "--own-cost-profiles",
             help="give every stream its own cost profile (default: all share one, as identical workers do)")
    add_option(parser, "--json", default="", help="write every point's figures here")
    add_option(parser, "--markdown", default="", help="write the table here")


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def _process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _controllers(args, count: int) -> Iterator[tuple[list[str], list[int]]]:
    """(addresses, pids): the given controllers (pids unknown), or `count` started here."""
    if args.controller:
        yield [a.strip() for a in args.controller.split(",") if a.strip()], []
        return
    import redis

    from smartspec.core.processes import free_port, start_child, stop_all
    from smartspec.core.launch import wait_serving

    prefix = f"smartspec-loadtest:{uuid.uuid4().hex[:8]}:"
    log_dir = Path(tempfile.mkdtemp(prefix="smartspec-loadtest-"))
    host = "127.0.0.1"
    children = []
    try:
        addresses = []
        for index in range(count):
            port = free_port(host)
            argv = [sys.executable, "-m", "smartspec.cli", "controller", "--host", host, "--port", str(port),
                    "--redis", args.redis, "--redis-prefix", prefix, "--log-level", "WARNING"]
            children.append(start_child(f"controller-{index}", argv, log_dir))
            addresses.append(f"{host}:{port}")
        for child, address in zip(children, addresses):
            wait_serving(child, address, 60.0, "gRPC health")
        yield addresses, [c.process.pid for c in children]
    finally:
        stop_all(children, grace_s=5.0)
        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def run_grid(addresses: Sequence[str], pids: Sequence[int], *, batches: Sequence[int], streams: Sequence[int],
             replicas: Sequence[int], duration_s: float, rate: float, step_ms: float, max_k: int,
             shared_cost_profile: bool, progress=None) -> list:
    """Every (replicas, streams, batch) point, in that nesting order."""
    from smartspec.bench.controller_load import run_point
    from smartspec.bench.controller_trace import build_trace

    traces = {batch: build_trace(batch, max_k=max_k) for batch in batches}
    points = []
    run_id = uuid.uuid4().hex[:6]
    for replica_count in replicas:
        used = list(addresses[:replica_count])
        used_pids = list(pids[:replica_count])
        cpu_clock = (lambda: sum(_process_cpu_s(p) for p in used_pids)) if used_pids else None
        for stream_count in streams:
            for batch in batches:
                point = run_point(used, batch=batch, streams=stream_count, duration_s=duration_s, rate=rate,
                                  step_ms=step_ms, max_k=max_k, trace=traces[batch],
                                  worker_prefix=f"load-{run_id}-r{replica_count}s{stream_count}b{batch}",
                                  shared_cost_profile=shared_cost_profile, cpu_clock=cpu_clock)
                points.append(point)
                if progress:
                    progress(point)
    return points


def run(args) -> int:
    from smartspec.bench.controller_load import markdown_table

    replicas = _ints(args.replicas)
    given = len([a for a in args.controller.split(",") if a.strip()]) if args.controller else 0
    if given:
        replicas = [r for r in replicas if r <= given] or [given]

    def progress(point) -> None:
        s = point.summary()
        print(f"replicas={s['replicas']} streams={s['streams']} batch={s['batch']}: {s['steps_per_s']} steps/s, "
              f"rtt p50/p99 {s['rtt_p50_ms']}/{s['rtt_p99_ms']} ms, cpu/step {s['cpu_ms_per_step']} ms, "
              f"answered {s['answered']}/{s['sent']}", file=sys.stderr, flush=True)

    with _controllers(args, max(replicas)) as (addresses, pids):
        points = run_grid(addresses, pids, batches=_ints(args.batches), streams=_ints(args.streams),
                          replicas=replicas, duration_s=args.duration_s, rate=args.rate, step_ms=args.step_ms,
                          max_k=args.max_k, shared_cost_profile=not args.own_cost_profiles, progress=progress)
    table = markdown_table(points)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([p.summary() for p in points], indent=1) + "\n")
    consistent = all(p.answered == p.sent and not p.mismatches and not p.failures for p in points)
    if not consistent:
        print("some reports were not answered, or plans did not match their reports", file=sys.stderr)
    return 0 if consistent else 1

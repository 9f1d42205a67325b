"""Where one controller step's CPU goes: a Connect stream's step, in process, at batch B.

    python scripts/profile_controller_step.py [--batch 256] [--steps 300] [--cprofile 25]

Runs `Decider.plan` + `Decider.persist` (what a stream does per report, less gRPC) on a realistic
trace (`bench.controller_trace`) against the Redis at --redis under a private prefix, and prints the
thread CPU time per step of each phase (parse, columns, validation, Redis read, the plan's parts,
the plan proto, Redis write). Phases are timed by wrapping the functions named below, so the sum of
the indented lines is part of the line above them. With --cprofile N, also the N functions with the
most own CPU time (cProfile on the thread CPU clock: slower, but not counting time spent waiting).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import time
import uuid

import redis

from smartspec.bench.controller_trace import build_trace, hello_message, worker_message
from smartspec.controller import decider as decider_module
from smartspec.controller import planner as planner_module
from smartspec.controller import plans as plans_module
from smartspec.core.cost_fit import OnlineCostFit
from smartspec.controller.decider import Decider
from smartspec.controller.metrics import ControllerMetrics
from smartspec.core.policies import default_registry
from smartspec.controller.report_columns import ReportColumns
from smartspec.controller.store import ControllerStore
from smartspec.controller.stream_memory import StreamMemory
from smartspec.v1 import controller_pb2

spent: dict[str, float] = collections.defaultdict(float)
clock = time.thread_time


def timed(owner, name: str, label: str, method: bool = False) -> None:
    """Replace owner.name by a wrapper adding its thread CPU time to spent[label]."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] += clock() - start

    setattr(owner, name, wrapper)


def instrument() -> None:
    timed(decider_module.validation, "validate_report_totals", "validation")
    timed(decider_module.validation, "validate_outcomes", "validation")
    timed(ControllerStore, "read_step", "Redis read (client side)")
    timed(decider_module, "plan_step", "plan_step")
    timed(planner_module.decision, "guarded_decide", "  policy (guarded_decide: optimiser, probes)")
    timed(planner_module, "predict_step", "  predict_step")
    timed(OnlineCostFit, "observe", "  cost fit observe")
    timed(OnlineCostFit, "model", "  cost fit model() (NNLS)")
    timed(plans_module, "plan_basis_proto", "basis proto")
    timed(Decider, "_observe", "metrics")
    timed(ControllerStore, "write_step", "Redis write (client side)")
    original = ReportColumns.from_report.__func__

    def from_report(cls, report):
        start = clock()
        try:
            return original(cls, report)
        finally:
            spent["report columns"] += clock() - start

    ReportColumns.from_report = classmethod(from_report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cprofile", type=int, default=0, help="also print the top N functions")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    prefix = f"profile-step:{uuid.uuid4().hex[:8]}:"
    store = ControllerStore(args.redis, prefix)
    decider = Decider(store, default_registry(), ControllerMetrics())
    trace = build_trace(args.batch, max(args.steps + 60, 64))
    messages = [worker_message(i, step) for i, step in enumerate(trace)]
    session = decider.connect(controller_pb2.WorkerMessage.FromString(hello_message("w0", args.batch, 8)).hello)
    memory = StreamMemory()

    def step(index: int) -> None:
        start = clock()
        report = controller_pb2.WorkerMessage.FromString(messages[index % len(messages)]).report
        spent["parse report (protobuf)"] += clock() - start
        start = clock()
        planned = decider.plan(session, report, memory)
        spent["plan() (until the reply)"] += clock() - start
        start = clock()
        planned.plan.SerializeToString()
        spent["serialise plan (protobuf)"] += clock() - start
        start = clock()
        decider.persist(session, planned, memory)
        spent["persist() (after the reply)"] += clock() - start

    try:
        instrument()
        for index in range(60):  # warm up: memory loaded, caches filled
            step(index)
        spent.clear()
        start = clock()
        for index in range(60, 60 + args.steps):
            step(index)
        total = clock() - start
        print(f"batch {args.batch}, {args.steps} steps, thread CPU per step:")
        for label, seconds in spent.items():
            print(f"  {label:46s} {seconds / args.steps * 1e3:7.3f} ms")
        print(f"  {'total':46s} {total / args.steps * 1e3:7.3f} ms")
        if args.cprofile:
            profile = cProfile.Profile(clock)
            profile.enable()
            for index in range(60, 60 + args.steps):
                step(index)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(args.cprofile)
    finally:
        store.close()
        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


if __name__ == "__main__":
    main()

"""Two controller replicas on one Redis: a policy set through one is what the other plans with next.

    python scripts/demo_replicas.py

Starts two real `smartspec controller --port 0` processes (A, B) sharing a private Redis prefix,
sets `fixed k=2` through A with the real CLI (`smartspec policy set ... --controller A`), then asks B
for a unary Decide: it answers with policy `fixed`, the new version and k = 2. Then sets `goodput`
through B and asks A. Stops both replicas (SIGTERM) and deletes the prefix.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import grpc

from demo_support import SMARTSPEC, REDIS_URL, Child, check, main_wrapper, private_prefix, run_cli, wipe_prefix
from smartspec.v1 import common_pb2, controller_pb2, controller_pb2_grpc


def decide(address: str, step: int) -> controller_pb2.StepPlan:
    """A unary Decide for two requests with a good acceptance history so far."""
    hello = controller_pb2.WorkerHello(worker_id="demo-worker", proposer_kind=common_pb2.PROPOSER_KIND_NGRAM,
                                       max_speculation_length=8, max_batch_size=16)
    outcomes = [controller_pb2.RequestOutcome(request_id=r, proposed_tokens=3, accepted_tokens=3,
                                              tested_positions=3, context_tokens=100 + step)
                for r in ("req-1", "req-2")]
    report = controller_pb2.StepReport(step_index=step, requests=outcomes, draft_ms=1.0, verify_ms=30.0, total_ms=32.0)
    with grpc.insecure_channel(address) as channel:
        return controller_pb2_grpc.ControllerStub(channel).Decide(
            controller_pb2.DecideRequest(worker=hello, report=report), timeout=10)


def show_plan(who: str, plan: controller_pb2.StepPlan) -> None:
    print(f"  Decide via {who}: policy {plan.policy_name} v{plan.policy_version}, "
          f"k = {[r.speculation_length for r in plan.requests]}")


def policy_set(address: str, *args: str) -> dict:
    out = run_cli("policy", "set", *args, "--controller", address, "--json")
    return json.loads(out)


def demo() -> None:
    prefix = private_prefix("replicas")
    log_dir = Path(tempfile.mkdtemp(prefix="smartspec-demo-replicas-"))
    children: list[Child] = []
    try:
        for name in ("controller-A", "controller-B"):
            children.append(Child(name, [*SMARTSPEC, "controller", "--host", "127.0.0.1", "--port", "0",
                                         "--redis", REDIS_URL, "--redis-prefix", prefix], log_dir))
        a, b = (c.wait_for(r"controller listening on (\S+)", 60).group(1) for c in children)
        print(f"A = {a} (pid {children[0].pid}), B = {b} (pid {children[1].pid}), redis prefix {prefix!r}")

        before = decide(b, 0)
        show_plan("B (before any set)", before)

        active = policy_set(a, "fixed", "--param", "k=2")
        print(f"$ smartspec policy set fixed --param k=2 --controller {a}  -> "
              f"{active['name']} {active['parameters']} v{active['version']}")
        plan = decide(b, 1)
        show_plan("B", plan)
        check(plan.policy_name == "fixed" and plan.policy_version == active["version"],
              f"B planned with {plan.policy_name} v{plan.policy_version}, not fixed v{active['version']}")
        check(all(r.speculation_length == 2 for r in plan.requests), "B did not plan k = 2")

        active = policy_set(b, "goodput")
        print(f"$ smartspec policy set goodput --controller {b}  -> {active['name']} v{active['version']}")
        plan = decide(a, 2)
        show_plan("A", plan)
        check(plan.policy_name == "goodput" and plan.policy_version == active["version"],
              f"A planned with {plan.policy_name} v{plan.policy_version}, not goodput v{active['version']}")
        print("OK: each replica's next answer used the policy set through the other")
    finally:
        codes = [c.stop() for c in children]
        print(f"stopped both replicas (exit codes {codes}); logs in {log_dir}")
        wipe_prefix(prefix)


if __name__ == "__main__":
    sys.exit(main_wrapper(demo))

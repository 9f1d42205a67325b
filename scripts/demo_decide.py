"""One unary Controller.Decide with made-up facts, the two ends of the SmartSpec trade-off.

    python scripts/demo_decide.py

(a) Two requests whose every proposal has been accepted (each k planned, reported through Decide a few times
so their history builds up in Redis) on a lightly loaded worker: the goodput policy picks a large k.
(b) The same two requests among 128, planned with a costly verify model (`cost_model_override`:
every batched token is dear and any speculation adds a whole extra cost): k = 0 for all.
Runs an in-process controller on a free loopback port against the real Redis, under a private
key prefix that is deleted at the end.
"""

from __future__ import annotations

import sys

import grpc

from demo_support import REDIS_URL, check, main_wrapper, private_prefix, wipe_prefix
from smartspec.controller.server import ControllerServer
from smartspec.v1 import common_pb2, controller_pb2, controller_pb2_grpc

MAX_K = 8
HOT = ("hot-a", "hot-b")


def worker_hello() -> controller_pb2.WorkerHello:
    return controller_pb2.WorkerHello(worker_id="demo-worker", proposer_kind=common_pb2.PROPOSER_KIND_NGRAM,
                                      max_speculation_length=MAX_K, max_batch_size=256,
                                      model="made-up", proposer="ngram", device="cpu")


def outcome(request_id: str, proposed: int, accepted: int, context: int) -> controller_pb2.RequestOutcome:
    tested = accepted + (1 if accepted < proposed else 0)
    return controller_pb2.RequestOutcome(request_id=request_id, proposed_tokens=proposed,
                                         accepted_tokens=accepted, tested_positions=tested,
                                         context_tokens=context)


def step_report(step: int, outcomes: list) -> controller_pb2.StepReport:
    return controller_pb2.StepReport(step_index=step, requests=outcomes, draft_ms=1.0, verify_ms=30.0,
                                     total_ms=32.0, batched_tokens=sum(o.proposed_tokens + 1 for o in outcomes))


def show(label: str, plan: controller_pb2.StepPlan) -> None:
    ks = [r.speculation_length for r in plan.requests]
    hot = {r.request_id: r.speculation_length for r in plan.requests if r.request_id in HOT}
    summary = f"{len(ks)} requests, k of {list(hot)} = {list(hot.values())}"
    if len(ks) > len(hot):
        summary += f", all k in {{{', '.join(str(k) for k in sorted(set(ks)))}}}"
    print(f"{label}: {summary}; predicted step {plan.predicted_step_ms:.1f} ms, "
          f"{plan.predicted_tokens:.1f} tokens; policy {plan.policy_name} v{plan.policy_version}; "
          f"decided in {plan.decision_ms:.2f} ms")


def demo() -> None:
    prefix = private_prefix("decide")
    server = ControllerServer(0, REDIS_URL, prefix)
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            hello = worker_hello()
            print(f"controller {server.address}, redis {REDIS_URL} prefix {prefix!r}, worker max k = {MAX_K}")

            # (a) history: four steps in which both requests proposed the k they were planned
            # (4 at first, then the controller's) and had every proposal accepted.
            plan = None
            ks = {r: 4 for r in HOT}
            for step in range(4):
                outcomes = [outcome(r, ks[r], ks[r], context=200 + 5 * step) for r in HOT]
                plan = stub.Decide(controller_pb2.DecideRequest(worker=hello, report=step_report(step, outcomes)))
                ks = {p.request_id: p.speculation_length for p in plan.requests}
                print(f"  report {step}: 2 requests, every proposal accepted -> plan k = {list(ks.values())}")
            show("(a) batch of 2, high acceptance", plan)
            low_load_ks = [r.speculation_length for r in plan.requests]
            check(all(k >= MAX_K // 2 for k in low_load_ks), f"(a) expected a large k, got {low_load_ks}")

            # (b) the same two requests (same history) among 126 fresh ones, with a costly verifier.
            costly = common_pb2.CostModel(c_fixed_ms=10.0, c_spec_ms=400.0, c_tok_ms=20.0, c_kv_ms=0.0)
            outcomes = [outcome(r, ks[r], ks[r], context=220) for r in HOT]
            outcomes += [outcome(f"bg-{i}", 0, 0, context=200) for i in range(126)]
            plan = stub.Decide(controller_pb2.DecideRequest(worker=hello, report=step_report(4, outcomes),
                                                            cost_model_override=costly))
            print("  cost override: c_fixed 10 ms, c_spec 400 ms, c_tok 20 ms per batched token")
            show("(b) batch of 128, costly verify", plan)
            big_ks = [r.speculation_length for r in plan.requests]
            check(len(big_ks) == 128 and all(k == 0 for k in big_ks), f"(b) expected k = 0 for all, got {set(big_ks)}")
        print("OK: large k at low load with high acceptance; k = 0 for the same requests in a costly batch of 128")
    finally:
        server.stop(0)
        wipe_prefix(prefix)


if __name__ == "__main__":
    sys.exit(main_wrapper(demo))

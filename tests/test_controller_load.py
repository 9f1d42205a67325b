"""`smartspec loadtest`: realistic traces, and a short run against a real controller whose counts add up.

No timed assertions: a shared CI machine decides how fast it is; these check that every report was
answered, in order, with one plan entry per unfinished request.
"""

from __future__ import annotations

import json


from smartspec.bench.controller_load import run_point
from smartspec.bench.controller_trace import build_trace, worker_message
from smartspec.cli import main
from smartspec.v1 import controller_pb2


def test_trace_is_a_busy_worker_with_requests_finishing_and_joining():
    trace = build_trace(8, 200, seed=1)
    reports = [controller_pb2.WorkerMessage.FromString(worker_message(i, s)).report for i, s in enumerate(trace)]
    assert [r.step_index for r in reports] == list(range(200))
    finished: set[str] = set()
    joined = 0
    for step, (report, summary) in enumerate(zip(reports, trace)):
        ids = [o.request_id for o in report.requests]
        assert len(ids) == 8 == summary.requests and len(set(ids)) == 8
        assert not finished & set(ids), "a finished request came back"
        assert summary.unfinished == sum(not o.finished for o in report.requests)
        for o in report.requests:
            assert o.accepted_tokens <= o.proposed_tokens <= o.requested_tokens
            assert o.tested_positions == o.accepted_tokens + (o.accepted_tokens < o.proposed_tokens)
            joined += o.prefill_tokens > 0
        finished |= {o.request_id for o in report.requests if o.finished}
        assert report.verify_ms > 0 and report.total_ms > report.verify_ms
    assert joined > 8, "requests finished and new ones joined with their prompt prefilled"
    assert all(o.finished for o in reports[-1].requests), "the last step drains, so a trace can loop"


def test_closed_loop_run_answers_every_report_in_order(controller):
    point = run_point([controller.address], batch=16, streams=2, duration_s=1.0, trace=build_trace(16, 40))
    assert point.sent > 2 and point.answered == point.sent
    assert point.mismatches == 0 and not point.failures
    for stream in point.results:
        assert len(stream.rtt_ms) == len(stream.decision_ms) == stream.answered == stream.sent
        assert all(ms > 0 for ms in stream.decision_ms)
    assert point.steps_per_s > 0 and point.rtt_percentile(50) <= point.rtt_percentile(99)
    summary = point.summary()
    assert (summary["answered"], summary["sent"], summary["mismatches"]) == (point.answered, point.sent, 0)


def test_paced_run_sends_on_schedule_and_counts_late_round_trips(controller):
    point = run_point([controller.address], batch=4, streams=2, duration_s=1.0, rate=20.0, step_ms=25.0)
    # 20 reports/s for 1 s per stream, every one answered (the trace loops past its end)
    assert all(15 <= s.sent <= 21 for s in point.results), [s.sent for s in point.results]
    assert point.answered == point.sent and point.mismatches == 0 and not point.failures
    assert 0.0 <= point.late_fraction <= 1.0


def test_cli_runs_a_small_grid_and_writes_consistent_json(controller, tmp_path, capsys):
    out = tmp_path / "load.json"
    code = main(["loadtest", "--controller", controller.address, "--batches", "1,8", "--streams", "1",
                 "--replicas", "1", "--duration-s", "0.5", "--json", str(out)])
    assert code == 0
    points = json.loads(out.read_text())
    assert [(p["batch"], p["streams"], p["replicas"]) for p in points] == [(1, 1, 1), (8, 1, 1)]
    for p in points:
        assert p["answered"] == p["sent"] > 0 and p["mismatches"] == 0 and not p["failures"]
        assert p["cpu_ms_per_step"] is None  # a controller it did not start: its CPU is unknown
    assert "| replicas | streams | batch |" in capsys.readouterr().out

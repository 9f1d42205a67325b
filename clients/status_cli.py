"""`smartspec status`: connected workers, the active policy and their figures, from one controller.

    smartspec status --controller 127.0.0.1:50051
    smartspec status --controller 10.0.0.7:50051,10.0.0.8:50051   # any replica answers: all read one Redis
"""

from __future__ import annotations

import dataclasses
import json
import time

from smartspec.clients.client_options import add_connection_options, client_from_args, reports_errors
from smartspec.core.config import add_flag
from smartspec.clients.policy_cli import format_active
from smartspec.clients.table import format_table
from smartspec.clients.types import ControllerStatus

WORKER_COLUMNS = ("worker", "model", "proposer", "device", "max k", "steps", "generated", "acceptance",
                  "mean k", "goodput tok/s", "last seen")


def format_status(status: ControllerStatus, now_ms: int) -> str:
    lines = [
        f"controller {status.controller_id or '?'}  redis {'ok' if status.redis_ok else 'UNREACHABLE'}",
        f"policy     {format_active(status.policy)}",
        "",
    ]
    if not status.workers:
        lines.append("no workers connected")
        return "\n".join(lines)
    rows = [
        (w.worker_id, w.model, w.proposer, w.device, w.max_speculation_length, w.steps, w.generated_tokens,
         f"{w.acceptance_rate:.2f}", f"{w.mean_speculation_length:.2f}", f"{w.goodput_tok_s:.1f}",
         f"{max(0.0, (now_ms - w.last_seen_unix_ms) / 1000):.1f}s ago")
        for w in status.workers
    ]
    lines.append(format_table(WORKER_COLUMNS, rows))
    return "\n".join(lines)


def configure(parser) -> None:
    add_connection_options(parser, controller=True)
    add_flag(parser, "--json", help="print JSON instead of text")


@reports_errors
def run(args) -> int:
    with client_from_args(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(dataclasses.asdict(status), indent=2))
    else:
        print(format_status(status, now_ms=int(time.time() * 1000)))
    return 0

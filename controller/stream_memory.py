"""What one Connect stream keeps between its steps, so that a step reads only what others change.

A worker's request histories and its last figures have one writer, the worker's own stream. The
stream reads them from Redis once (its first step that reaches Redis), then plans from this copy
and stores it after every step, so Redis keeps what another replica needs to take the worker over.
The copy is always at least as new as Redis: each step's write is done before the stream reads the
next report (the write follows the plan on the stream's own thread), so no step ever needs Redis's
copy of this worker's state. Redis stays the place replicas share through: a new stream (after a
reconnect, possibly to another replica) starts from what is stored.

The cost fit is different: workers with one cost profile share it. The stream keeps the fit in
process (no JSON parse per step) with the token of its last write, and the read script sends the
stored fit back only when someone else wrote it since; then the stream continues from theirs, as a
per-step read-modify-write did. A fit nobody else writes is stored every `FIT_SAVE_EVERY` steps
and when the stream ends (serialising it is ~45 us); once another writer shows up, every step, so
that the workers sharing it keep pooling their steps.

While Redis is unreachable the stream plans from this copy and keeps it current; the next write
after the outage stores it. (A unary Decide has no memory: it reads everything, as before.)
"""

from __future__ import annotations

from dataclasses import dataclass

# Steps between two writes of a cost fit only this stream writes.
FIT_SAVE_EVERY = 8

from smartspec.core.cost_fit import OnlineCostFit
from smartspec.controller.history_table import HistoryTable
from smartspec.controller.store import WorkerFigures


@dataclass
class StreamMemory:
    histories: HistoryTable | None = None   # None: not read from Redis yet
    worker: WorkerFigures | None = None     # the worker's last prediction and goodput (None: not read yet)
    cost_fit: OnlineCostFit | None = None   # None: not loaded yet
    cost_fit_writer: str | None = None      # writer token of the stored fit this one continues ("": none stored)
    fit_unsaved_steps: int = 0              # steps observed into cost_fit since it was last stored
    fit_shared: bool = False                # another writer stored this profile's fit during the stream

    def should_save_fit(self) -> bool:
        return self.fit_shared or self.fit_unsaved_steps + 1 >= FIT_SAVE_EVERY

"""One worker's per-request acceptance histories as columns, stored as one Redis string.

The controller remembers, per unfinished request, the counters of `AcceptanceState`. At batch 256 a
step updates, estimates from and stores every one of them, so they live here as one int64 array
[rows, fields] with a request_id -> row index: a step is a few vector operations instead of 256
small objects, and the whole table is one value (`encode`/`decode`: fixed-width counters, then the
ids) written with one SET instead of 256 keys with a TTL each.

Per-request TTL, kept: every row remembers when it was last reported (`last_seen_s`), and rows not
reported for `ttl_s` are dropped when the table is encoded, as the per-key TTLs used to expire them.
The table is read as a `Mapping[str, AcceptanceState]` wherever a single request's history is
wanted (tests, status), so the dataclass stays the one definition of what a history means.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Iterable, Iterator, Sequence

import numpy as np

from smartspec.core.acceptance import AcceptanceState

# Column order of the counters array; the last one is bookkeeping, not part of AcceptanceState.
FIELDS = ("accepted", "tested", "proposed", "requested", "steps", "last_k", "last_fully_accepted",
          "steps_since_speculation", "last_seen_s")
ACCEPTED, TESTED, PROPOSED, REQUESTED, STEPS, LAST_K, LAST_FULL, SINCE_SPEC, LAST_SEEN = range(len(FIELDS))

_MAGIC = b"SSH1"                       # format tag and version
_HEADER = struct.Struct("<4sI")        # magic, row count
_COUNTER_DTYPE = np.dtype("<u4")       # counters on the wire (all non-negative, far below 2**32)
_LENGTH_DTYPE = np.dtype("<u2")        # request id lengths in bytes (ids are at most 256 bytes)


class HistoryError(ValueError):
    """A stored table could not be decoded."""


class HistoryTable(Mapping[str, AcceptanceState]):
    """request_id -> history of one worker's unfinished requests (a Mapping of AcceptanceState)."""

    def __init__(self, capacity: int = 16) -> None:
        self._ids: list[str] = []
        self._encoded_ids: list[bytes] = []
        self._row_of: dict[str, int] = {}
        self._counts = np.zeros((max(1, capacity), len(FIELDS)), dtype=np.int64)

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def from_states(cls, states: Mapping[str, AcceptanceState], seen_s: int = 0) -> "HistoryTable":
        """A table holding `states` (e.g. a dict written by hand), all last seen at `seen_s`."""
        if isinstance(states, HistoryTable):
            return states
        table = cls(len(states))
        rows = table.rows_for(list(states))
        for row, state in zip(rows.tolist(), states.values()):
            table._counts[row, :LAST_SEEN] = [
                state.accepted, state.tested, state.proposed, state.requested, state.steps, state.last_k,
                int(state.last_fully_accepted), state.steps_since_speculation,
            ]
            table._counts[row, LAST_SEEN] = seen_s
        return table

    def rows_for(self, request_ids: Sequence[str]) -> np.ndarray:
        """Row index of each id, adding a zeroed row (an empty history) for ids not yet held."""
        row_of = self._row_of
        rows = list(map(row_of.get, request_ids))
        if None in rows:
            for position, row in enumerate(rows):
                if row is None:
                    request_id = request_ids[position]
                    existing = row_of.get(request_id)  # an id repeated in one call gets one row
                    rows[position] = self._add(request_id) if existing is None else existing
        return np.array(rows, dtype=np.intp)

    def _add(self, request_id: str) -> int:
        row = len(self._ids)
        if row == self._counts.shape[0]:
            grown = np.zeros((2 * row, len(FIELDS)), dtype=np.int64)
            grown[:row] = self._counts
            self._counts = grown
        self._counts[row] = 0
        self._ids.append(request_id)
        self._encoded_ids.append(request_id.encode())
        self._row_of[request_id] = row
        return row

    # -- one step --------------------------------------------------------------------------------
    def record(self, rows: np.ndarray, proposed: np.ndarray, accepted: np.ndarray, tested: np.ndarray,
               requested: np.ndarray, seen_s: int) -> None:
        """`AcceptanceState.update` for every row at once (the outcomes were validated before)."""
        counts = self._counts
        counts[rows, ACCEPTED] += accepted
        counts[rows, TESTED] += tested
        counts[rows, PROPOSED] += proposed
        counts[rows, REQUESTED] += requested
        counts[rows, STEPS] += 1
        counts[rows, LAST_K] = requested
        counts[rows, LAST_FULL] = (proposed > 0) & (accepted == proposed)
        # A step asked for proposals counts as speculating even if the proposer ran dry.
        counts[rows, SINCE_SPEC] = np.where(requested > 0, 0, counts[rows, SINCE_SPEC] + 1)
        counts[rows, LAST_SEEN] = seen_s

    def column(self, field: int, rows: np.ndarray) -> np.ndarray:
        """One counter (ACCEPTED, TESTED, ...) of the given rows."""
        return self._counts[rows, field]

    def remove(self, request_ids: Iterable[str]) -> None:
        """Forget requests (finished): the last row moves into each freed one."""
        for request_id in request_ids:
            row = self._row_of.pop(request_id, None)
            if row is None:
                continue
            last = len(self._ids) - 1
            if row != last:
                moved = self._ids[last]
                self._ids[row] = moved
                self._encoded_ids[row] = self._encoded_ids[last]
                self._counts[row] = self._counts[last]
                self._row_of[moved] = row
            self._ids.pop()
            self._encoded_ids.pop()

    def expire(self, now_s: int, ttl_s: int) -> None:
        """Drop rows not reported for `ttl_s` seconds (a request whose end was never reported)."""
        size = len(self._ids)
        stale = np.flatnonzero(self._counts[:size, LAST_SEEN] < now_s - ttl_s)
        if stale.size:
            self.remove([self._ids[row] for row in stale.tolist()])

    # -- storage ---------------------------------------------------------------------------------
    def encode(self) -> bytes:
        """Header, counters [rows, fields] as little-endian uint32, id lengths as uint16, ids."""
        size = len(self._ids)
        counters = self._counts[:size].astype(_COUNTER_DTYPE)
        lengths = np.fromiter(map(len, self._encoded_ids), dtype=_LENGTH_DTYPE, count=size)
        return b"".join((_HEADER.pack(_MAGIC, size), counters.tobytes(), lengths.tobytes(), *self._encoded_ids))

    @classmethod
    def decode(cls, blob: bytes) -> "HistoryTable":
        """Inverse of `encode`; raises HistoryError for anything else."""
        if len(blob) < _HEADER.size:
            raise HistoryError("history table too short")
        magic, size = _HEADER.unpack_from(blob)
        if magic != _MAGIC:
            raise HistoryError(f"unknown history table format {magic!r}")
        counters_end = _HEADER.size + size * len(FIELDS) * _COUNTER_DTYPE.itemsize
        lengths_end = counters_end + size * _LENGTH_DTYPE.itemsize
        if len(blob) < lengths_end:
            raise HistoryError("history table truncated")
        table = cls(size)
        table._counts[:size] = np.frombuffer(blob, _COUNTER_DTYPE, size * len(FIELDS), _HEADER.size).reshape(
            size, len(FIELDS))
        lengths = np.frombuffer(blob, _LENGTH_DTYPE, size, counters_end)
        ends = (lengths_end + np.cumsum(lengths, dtype=np.int64)).tolist()
        if size and ends[-1] != len(blob):
            raise HistoryError("history table ids do not add up")
        start = lengths_end
        for end in ends:
            encoded = blob[start:end]
            request_id = encoded.decode()
            table._row_of[request_id] = len(table._ids)
            table._ids.append(request_id)
            table._encoded_ids.append(encoded)
            start = end
        return table

    def encoded_id(self, request_id: str) -> bytes:
        """The id's UTF-8 bytes (kept, so plans can be serialised without encoding ids again)."""
        return self._encoded_ids[self._row_of[request_id]]

    # -- Mapping[str, AcceptanceState] -----------------------------------------------------------
    def __getitem__(self, request_id: str) -> AcceptanceState:
        row = self._row_of[request_id]
        values = self._counts[row].tolist()
        return AcceptanceState(
            accepted=values[ACCEPTED], tested=values[TESTED], proposed=values[PROPOSED],
            requested=values[REQUESTED], steps=values[STEPS], last_k=values[LAST_K],
            last_fully_accepted=bool(values[LAST_FULL]), steps_since_speculation=values[SINCE_SPEC],
        )

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._row_of

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ids))

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"HistoryTable({len(self)} requests)"

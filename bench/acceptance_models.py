"""How many proposals the simulated proposer offers and the target accepts: the simulator's proposer.

Each model assigns every simulated request a true per-position acceptance rate (or a recorded
stream of verification outcomes) and a fill rate, and per step turns (request, k) first into
offered proposals, then into accepted counts. A proposer like prompt lookup offers all k tokens
when it finds a match and none when it does not: request i offers k with probability fill_i, else 0
(fill 1: a draft model). Verification stops at the first rejection, so with rate a the accepted
count is min(k, G) where P(G >= j) = a^j (a geometric run of successes).

`PositionReplay` (spec `replay:FILE`) draws nothing: it replays prompt lookup's recorded offers and
matches position by position along each request's greedy text (`bench.positions`), so the bursts
of a copied span (many positions matching in a row, then none) come back exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from smartspec.bench.positions import load_positions, walk


def accepted_runs(alphas: np.ndarray, ks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """min(k, G) with P(G >= j) = a^j, vectorised. alphas, ks: [B] -> accepted: [B] (int64)."""
    a = np.asarray(alphas, dtype=np.float64)  # [B], in [0, 1]
    k = np.asarray(ks, dtype=np.int64)  # [B]
    u = rng.random(a.shape)  # [B] in [0, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # inverse CDF: G = floor(log(1-u) / log a); a = 0 gives log a = -inf, so G = 0
        run = np.floor(np.log1p(-u) / np.log(a))
    run = np.where(a >= 1.0, k, run)  # a = 1: every proposal passes
    return np.minimum(run, k).astype(np.int64)


def offered_proposals(fills: np.ndarray, ks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All k with probability fill, else 0 (a lookup that matches or does not). [B], [B] -> [B]."""
    fills = np.asarray(fills, dtype=np.float64)  # [B]
    ks = np.asarray(ks, dtype=np.int64)  # [B]
    if np.all(fills >= 1.0):
        return ks.copy()
    return np.where(rng.random(ks.shape) < fills, ks, 0)


class RequestAcceptance(Protocol):
    """Proposer behaviour for the requests of one simulation (index = request number)."""

    def mean_rates(self) -> np.ndarray:  # [N] true mean rate per request (for reports)
        ...

    def proposable(self, requests: np.ndarray, max_k: int, rng: np.random.Generator) -> np.ndarray | None:
        """What the proposer could offer each row at the coming step, known before it (prompt lookup
        finds its match or not), or None when that is not known ahead (a draft model).
        requests: [B] -> [B]. `propose` in the same step offers min(k, this)."""
        ...

    def propose(self, requests: np.ndarray, ks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Proposals offered per row when k are asked for. requests, ks: [B] -> [B], each <= k."""
        ...

    def accept(self, requests: np.ndarray, ks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Accepted proposals per row, given the proposals offered. requests, ks: [B] -> [B]."""
        ...


class _FillDraws:
    """Prompt-lookup style filling: each step, request i has a match with probability fills[i]
    (then it can offer any k) or none (then it offers nothing). The draw is made when the worker
    looks ahead (`proposable`), before the policy decides, as the real worker does; a `propose`
    without a look-ahead that step draws then."""

    fills: np.ndarray | None
    _ready: np.ndarray | None = None  # [N] this step's drawn offer per request, -1 = not drawn

    def proposable(self, requests: np.ndarray, max_k: int, rng: np.random.Generator) -> np.ndarray | None:
        if self.fills is None:
            return None
        if self._ready is None:
            self._ready = np.full(self.fills.shape, -1, dtype=np.int64)
        offer = np.where(rng.random(requests.shape) < self.fills[requests], max_k, 0)  # [B]
        self._ready[requests] = offer
        return offer

    def propose(self, requests: np.ndarray, ks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ks = np.asarray(ks, dtype=np.int64)  # [B]
        if self.fills is None:
            return ks.copy()
        ready = None if self._ready is None else self._ready[requests]  # [B]
        if ready is None or np.any(ready < 0):
            return offered_proposals(self.fills[requests], ks, rng)
        self._ready[requests] = -1  # used up: the next step draws afresh
        return np.minimum(ks, ready)


@dataclass
class RateAcceptance(_FillDraws):
    """Every request has a constant true rate and fill rate (fixed, or drawn per request)."""

    rates: np.ndarray  # [N]
    fills: np.ndarray | None = None  # [N]; None: always fills (a draft model)

    def mean_rates(self) -> np.ndarray:
        return self.rates

    def accept(self, requests: np.ndarray, ks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return accepted_runs(self.rates[requests], ks, rng)

    def __post_init__(self) -> None:
        self.rates = np.clip(np.asarray(self.rates, dtype=np.float64), 0.0, 1.0)
        if self.fills is not None:
            self.fills = np.clip(np.broadcast_to(np.asarray(self.fills, dtype=np.float64), self.rates.shape), 0.0, 1.0)


class TraceAcceptance(_FillDraws):
    """Replays recorded verification outcomes, so a request's good and bad stretches come back in order.

    A recorded step (k, accepted) tested `accepted` positions that passed and, if accepted < k, one
    that failed. Concatenated, a request's steps are a stream of Bernoulli outcomes; a simulated step
    with k' consumes outcomes up to the first failure or k' successes. When a stream runs out, the
    request continues at its recorded mean rate.
    """

    def __init__(self, streams: Sequence[np.ndarray], rates: np.ndarray, fills: np.ndarray | None = None) -> None:
        self.streams = list(streams)  # per request: bool outcomes in order
        self.rates = rates  # [N]
        self.fills = fills  # [N] or None (always fills)
        self.cursor = np.zeros(len(self.streams), dtype=np.int64)

    def mean_rates(self) -> np.ndarray:
        return self.rates

    def accept(self, requests: np.ndarray, ks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = accepted_runs(self.rates[requests], ks, rng)  # fallback where a stream is spent
        for row, (req, k) in enumerate(zip(requests.tolist(), ks.tolist())):
            stream, pos = self.streams[req], int(self.cursor[req])
            if k <= 0 or pos >= stream.size:
                continue
            window = stream[pos:pos + k]
            fails = np.flatnonzero(~window)
            if fails.size:  # stopped at the first rejection
                out[row] = int(fails[0])
                self.cursor[req] = pos + fails[0] + 1
            elif window.size == k:
                out[row] = k
                self.cursor[req] = pos + k
            # a stream ending mid-step keeps the geometric fallback for this step
            else:
                self.cursor[req] = stream.size
        return out


def stream_from_steps(steps: Sequence[Sequence[int]]) -> np.ndarray:
    """[(k, accepted), ...] -> the tested outcomes in order (True = accepted)."""
    out: list[bool] = []
    for k, accepted in steps:
        if not 0 <= accepted <= k:
            raise ValueError(f"recorded step has accepted={accepted} outside 0..k={k}")
        out.extend([True] * accepted)
        if accepted < k:
            out.append(False)
    return np.array(out, dtype=bool)


class PositionReplay:
    """Exact replay of recorded prompt lookup under greedy decoding (see `bench.positions`).

    Simulated request j follows recorded table rows[j]: offered[r, c] / matched[r, c] are what
    prompt lookup offers (asked for the recorded max_k) and how many of those are right at cursor c
    = output position c + 1; the cursor starts at 0 (the first decode step comes after the prefill's
    token) and `advance` moves it by the tokens each step produced. Beyond the recorded length a
    request offers nothing. Nothing is drawn: `rng` is ignored, and the fill is whatever the table
    says (`fills` is None: `_FillDraws` and `with_fill` do not apply).

    One instance per simulation (the cursors are its state): pass the factory to `simulate`.
    """

    fills = None

    def __init__(self, offered: np.ndarray, matched: np.ndarray, lengths: np.ndarray, rows: np.ndarray,
                 max_k: int) -> None:
        # offered, matched: [R, L + 1] zero-padded (column L stays 0: reads past a row's end offer nothing)
        self.offered = np.asarray(offered, dtype=np.int64)
        self.matched = np.asarray(matched, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)  # [R] recorded completion tokens
        self.rows = np.asarray(rows, dtype=np.int64)  # [N] recorded row per simulated request
        self.max_k = int(max_k)
        self.cursor = np.zeros(self.rows.size, dtype=np.int64)  # [N]
        self._last = self.offered.shape[1] - 1

    @classmethod
    def from_table(cls, table: Mapping[str, Any], n: int, index: Sequence[int] | None = None) -> "PositionReplay":
        """n simulated requests over a positions table (`bench.positions.load_positions`): request j
        replays the entry whose "index" is index[j] (a bench request's dataset prompt), or, without
        `index`, the table's j mod R-th entry."""
        entries = table["requests"]
        width = max(len(e["offered"]) for e in entries) + 1
        offered = np.zeros((len(entries), width), np.int64)
        matched = np.zeros((len(entries), width), np.int64)
        for r, e in enumerate(entries):
            offered[r, :len(e["offered"])] = e["offered"]
            matched[r, :len(e["matched"])] = e["matched"]
        lengths = np.array([int(e["completion_tokens"]) for e in entries], np.int64)
        if index is None:
            rows = np.arange(n) % len(entries)
        else:
            where = {int(e["index"]): r for r, e in enumerate(entries)}
            missing = sorted({int(i) for i in index} - set(where))
            if missing:
                raise ValueError(f"positions table has no entry for prompt index(es) {missing[:10]}")
            rows = np.array([where[int(i)] for i in index], np.int64)
            if rows.size != n:
                raise ValueError(f"{rows.size} prompt indices for {n} simulated requests")
        return cls(offered, matched, lengths, rows, int(table["max_k"]))

    def _at(self, table: np.ndarray, requests: np.ndarray) -> np.ndarray:
        return table[self.rows[requests], np.minimum(self.cursor[requests], self._last)]  # [B]

    def _check_k(self, k: int) -> None:
        if k > self.max_k:
            raise ValueError(f"positions were recorded with max_k={self.max_k}; the simulated worker asks for "
                             f"k={k} (record with a max_k at least the worker's)")

    def mean_rates(self) -> np.ndarray:
        """[N] accepted / tested of each request's recorded walk at k = max_k over its recorded
        length (0 where nothing was tested): the rate a static max_k run would measure for it."""
        rates = np.zeros(len(self.lengths))
        for r, length in enumerate(self.lengths.tolist()):
            w = walk(self.offered[r].tolist(), self.matched[r].tolist(), length, self.max_k)
            rates[r] = w.accepted / w.tested if w.tested else 0.0
        return rates[self.rows]

    def proposable(self, requests: np.ndarray, max_k: int, rng: np.random.Generator) -> np.ndarray:
        self._check_k(max_k)
        return np.minimum(self._at(self.offered, requests), max_k)

    def propose(self, requests: np.ndarray, ks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ks = np.asarray(ks, dtype=np.int64)  # [B]
        if ks.size:
            self._check_k(int(ks.max()))
        return np.minimum(ks, self._at(self.offered, requests))

    def accept(self, requests: np.ndarray, ks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ks = np.asarray(ks, dtype=np.int64)  # [B] proposals offered
        return np.minimum(np.minimum(ks, self._at(self.offered, requests)), self._at(self.matched, requests))

    def advance(self, requests: np.ndarray, n: np.ndarray) -> None:
        """requests, n: [B] tokens each request gained this step (accepted + the target's one)."""
        self.cursor[requests] += np.asarray(n, dtype=np.int64)


# --- construction from a spec string ------------------------------------------------------------

AcceptanceFactory = Callable[[int, np.random.Generator], RequestAcceptance]


def fixed(alpha: float) -> AcceptanceFactory:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return lambda n, rng: RateAcceptance(np.full(n, alpha))


def beta(mean: float, concentration: float) -> AcceptanceFactory:
    """Per-request rates ~ Beta(mean * c, (1 - mean) * c): heterogeneous requests around `mean`."""
    if not 0.0 < mean < 1.0 or concentration <= 0:
        raise ValueError("beta needs 0 < mean < 1 and concentration > 0")
    return lambda n, rng: RateAcceptance(rng.beta(mean * concentration, (1 - mean) * concentration, size=n))


def choice(rates: Sequence[float]) -> AcceptanceFactory:
    """Requests cycle through the given rates (e.g. 0.9,0.1 = summaries and chat interleaved)."""
    values = np.array(rates, dtype=np.float64)
    if values.size == 0 or np.any((values < 0) | (values > 1)):
        raise ValueError("choice needs rates in [0, 1]")
    return lambda n, rng: RateAcceptance(values[np.arange(n) % values.size])


def per_request(rates: Sequence[float], fills: Sequence[float] | None = None) -> AcceptanceFactory:
    """Given rates (and fill rates), one per request in order (cycled if fewer): e.g. measured per prompt."""
    values = np.clip(np.array(rates, dtype=np.float64), 0.0, 1.0)
    if values.size == 0:
        raise ValueError("per_request needs at least one rate")
    factory = lambda n, rng: RateAcceptance(values[np.arange(n) % values.size])  # noqa: E731
    return factory if fills is None else with_fill(factory, fills)


def with_fill(factory: AcceptanceFactory, fills: Sequence[float]) -> AcceptanceFactory:
    """The same acceptance, with a proposer that fills a request's k with probability fills[i mod F]
    (else offers nothing): e.g. [0.9, 0.2] for summaries and chat interleaved under prompt lookup."""
    values = np.array(fills, dtype=np.float64)
    if values.size == 0 or np.any(~np.isfinite(values)) or np.any((values < 0) | (values > 1)):
        raise ValueError(f"fill rates must be in [0, 1], got {list(fills)}")

    def make(n: int, rng: np.random.Generator) -> RequestAcceptance:
        model = factory(n, rng)
        if isinstance(model, PositionReplay):
            raise ValueError("a positions replay already knows when prompt lookup fills; drop the fill rate")
        model.fills = values[np.arange(n) % values.size]
        return model

    return make


def parse_fill(spec: str) -> list[float]:
    """'0.3' (every request) or '0.9/0.2' (requests cycle through them, like choice:)."""
    try:
        values = _floats(spec)
    except ValueError:
        raise ValueError(f"bad fill spec {spec!r}: expected F or F1/F2/... with each in [0, 1]") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"bad fill spec {spec!r}: expected F or F1/F2/... with each in [0, 1]")
    return values


def traces(path: str | Path) -> AcceptanceFactory:
    """Trace file: {"requests": [{"steps": [[k, accepted], ...]}, ...]} (each request's steps in order),
    or per-request totals {"accepted": A, "tested": T} where only those were recorded (then the
    request runs at rate A / T throughout). A request with "proposed" and "requested" counts also
    gets that fill rate (proposed / requested); otherwise it always fills.

    Simulated request i replays recorded request i mod R.
    """
    data = json.loads(Path(path).read_text())
    recorded = data.get("requests") if isinstance(data, dict) else None
    if not recorded:
        raise ValueError(f"{path}: expected {{'requests': [{{'steps': [[k, accepted], ...]}}, ...]}}")
    streams, rates_list, fills_list = [], [], []
    for i, r in enumerate(recorded):
        requested = float(r.get("requested") or 0.0)
        fills_list.append(min(1.0, float(r.get("proposed", 0.0)) / requested) if requested > 0 else 1.0)
        if "steps" in r:
            stream = stream_from_steps(r["steps"])
            rate = float(stream.mean()) if stream.size else 0.0
        elif "accepted" in r and "tested" in r:
            stream = np.zeros(0, dtype=bool)
            rate = float(r["accepted"]) / float(r["tested"]) if float(r["tested"]) > 0 else 0.0
        else:
            raise ValueError(f"{path}: request {i} has neither 'steps' nor 'accepted'/'tested'")
        streams.append(stream)
        rates_list.append(rate)
    rates = np.array(rates_list)
    fills = np.array(fills_list) if any(f < 1.0 for f in fills_list) else None

    def make(n: int, rng: np.random.Generator) -> RequestAcceptance:
        pick = np.arange(n) % len(streams)
        return TraceAcceptance([streams[i] for i in pick], rates[pick], None if fills is None else fills[pick])

    return make


def replay(source: str | Path | Mapping[str, Any], index: Sequence[int] | None = None) -> AcceptanceFactory:
    """Positions file (`bench.positions`, scripts/record_positions.py) replayed exactly: simulated
    request j follows the recorded prompt index[j] (e.g. a bench detail's "index" column), or
    without `index` the file's (j mod R)-th request. The file is read and checked once, here."""
    table = load_positions(source)
    picks = None if index is None else [int(i) for i in index]
    return lambda n, rng: PositionReplay.from_table(table, n, picks)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split("/") if x]


# spec prefix -> builder from the text after "prefix:"
_SPECS: dict[str, Callable[[str], AcceptanceFactory]] = {
    "beta": lambda rest: beta(*_floats(rest)),
    "choice": lambda rest: choice(_floats(rest)),
    "trace": traces,
    "replay": replay,
}


def parse_acceptance(spec: str | float) -> AcceptanceFactory:
    """'0.7' (fixed), 'beta:0.7/4' (mean/concentration), 'choice:0.9/0.1', 'trace:FILE.json',
    'replay:FILE.json' (a positions file: prompt lookup replayed exactly)."""
    if isinstance(spec, (int, float)):
        return fixed(float(spec))
    kind, _, rest = spec.partition(":")
    if not rest:
        try:
            alpha = float(kind)
        except ValueError:
            raise ValueError(f"bad acceptance spec {spec!r}: expected ALPHA, beta:MEAN/CONC, "
                             "choice:A/B/..., trace:FILE or replay:FILE") from None
        return fixed(alpha)
    builder = _SPECS.get(kind)
    if builder is None:
        raise ValueError(f"unknown acceptance model {kind!r}; known: {', '.join(sorted(_SPECS))}")
    try:
        return builder(rest)
    except TypeError as exc:
        raise ValueError(f"bad acceptance spec {spec!r}: {exc}") from None

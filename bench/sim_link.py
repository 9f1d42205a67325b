"""The controller round trip as the simulated worker meets it (worker/controller_link.py, modelled).

Plans normally come fresh and free (`ControllerLinkSpec()`, the ideal). With plan mode
`stale-replan` or `stale-ks`, step s runs on the answer to report s-2, the worker waits a bounded time
when that answer is late, and falls back to each request's last k when it never came. `StaleLink`
keeps the answers on their way during one run and counts what waiting and falling back cost;
what a plan is, given a prior, is the simulator's planner's business (`plan_with`).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from smartspec.core.acceptance import PooledPrior


class PlanMode(enum.StrEnum):
    """How plans reach the worker (the CLI's --plan-mode strings are the values)."""

    FRESH = "fresh"
    STALE_REPLAN = "stale-replan"
    STALE_KS = "stale-ks"


class LinkFallback(enum.StrEnum):
    """What a step without a recent enough answer runs (the CLI's --plan-fallback strings)."""

    LAST_K = "last-k"
    OLDER_PLAN = "older-plan"


@dataclass(frozen=True)
class ControllerLinkSpec:
    """How plans reach the worker, and what a late plan costs (worker/controller_link.py).

    fresh: step s is planned from the facts of step s-1 at no cost in time: the ideal, and the
    simulator's behaviour before plans went one step ahead.
    stale-replan: what the worker does. Step s re-solves the controller's newest answer (normally the
    one to report s-2) on the worker: the policy runs on the worker's own up-to-date per-request
    history and look-ahead, with the pooled prior as the controller held it after that report.
    stale-ks: for comparison, the controller's own ks from that answer applied as sent (a request
    that joined since runs 0), only capped to the fresh look-ahead.

    The answer to report r reaches the worker round_trip_ms after step r ended. Before step s the
    worker waits for the answer to report s-2 (before step 1: report 0) at most the deadline, and the
    wait adds to the step's time; if the answer still has not come, step s falls back: each request
    keeps the k it last ran, one never planned runs 0 (fallback "last-k"). deadline_ms None: the
    worker's adaptive deadline, max(min_deadline_ms, deadline_fraction x the last step's time),
    LinkConfig's default.

    fallback "older-plan" (stale-replan only) is a what-if, not what the worker does: a step without
    a recent enough answer re-solves the newest basis in hand, however old.
    `mode` and `fallback` may be given as their strings; they are stored as the enums (which compare
    equal to, and print as, those strings).
    """

    mode: PlanMode = PlanMode.FRESH
    round_trip_ms: float = 0.0
    deadline_ms: float | None = None
    min_deadline_ms: float = 5.0
    deadline_fraction: float = 0.25
    fallback: LinkFallback = LinkFallback.LAST_K

    def __post_init__(self) -> None:
        if self.mode not in set(PlanMode):
            raise ValueError(f"unknown plan mode {self.mode!r} (known: {', '.join(PlanMode)})")
        object.__setattr__(self, "mode", PlanMode(self.mode))
        if not self.round_trip_ms >= 0 or (self.deadline_ms is not None and not self.deadline_ms >= 0):
            raise ValueError("need round_trip_ms >= 0 and deadline_ms >= 0")
        if self.fallback not in set(LinkFallback) or (
                self.fallback == LinkFallback.OLDER_PLAN and self.mode != PlanMode.STALE_REPLAN):
            raise ValueError(f"fallback is one of {', '.join(LinkFallback)}; older-plan only with stale-replan")
        object.__setattr__(self, "fallback", LinkFallback(self.fallback))

    def deadline_s(self, last_step_s: float) -> float:
        if self.deadline_ms is not None:
            return self.deadline_ms / 1000.0
        return max(self.min_deadline_ms / 1000.0, self.deadline_fraction * last_step_s)


@dataclass(frozen=True)
class ControllerAnswer:
    """The controller's answer to one step report, as the worker receives it."""

    report_index: int
    arrives_s: float
    prior: PooledPrior            # the pooled prior with this report folded in (the plan's basis)
    ks: Mapping[int, int]         # the controller's own k per request for the next step (stale-ks)


def answer_in_hand(answers: Sequence[ControllerAnswer], step_index: int, reported_s: float, now_s: float,
                   deadline_s: float) -> tuple[float, ControllerAnswer | None]:
    """(seconds step `step_index` waits for a plan, the answer it then plans with).

    answers: the latest answers, in report order. Right after sending the previous report (at
    reported_s) the worker waits for the answer to report step_index - 2 (before step 1: report 0,
    the first it sent) or a newer one, at most deadline_s; an idle spell until now_s hides that wait. The step then
    plans with the newest answer in hand, which after an idle spell may answer the report just sent.
    The worker goes straight on after a report, so an answer landing the instant the step starts is
    not in hand unless it is the one awaited. None (fall back) when even that one has not come:
    plans older than it are never applied.
    """
    recent = [a for a in answers if a.report_index >= max(step_index - 2, 0)]  # arrive in report order
    if step_index == 0 or not recent:
        return 0.0, None
    awaited = recent[0]
    start_s = max(now_s, reported_s + min(max(awaited.arrives_s - reported_s, 0.0), deadline_s))
    held = [a for a in recent if a.arrives_s < start_s or (a is awaited and a.arrives_s <= start_s)]
    return start_s - now_s, (held[-1] if held else None)


def newest_arrived(answers: Sequence[ControllerAnswer], by_s: float) -> ControllerAnswer | None:
    """The newest answer that reached the worker before by_s, however old (None: none yet)."""
    arrived = [a for a in answers if a.arrives_s < by_s]
    return arrived[-1] if arrived else None


@dataclass
class StaleLink:
    """The worker's side of a stale controller link during one run: the answers on their way, and
    what waiting for them and falling back cost."""

    spec: ControllerLinkSpec
    answers: deque = field(default_factory=deque)  # [ControllerAnswer], the ones a next step may use
    fallback_steps: int = 0
    waited_steps: int = 0
    wait_s: float = 0.0
    reported_s: float = 0.0  # when the newest report left
    last_step_s: float = 0.0  # the time of its step, waits included (the adaptive deadline's base)

    def report(self, report_index: int, ended_s: float, step_s: float, prior: PooledPrior, dec: np.ndarray,
               plan_with: Callable[[PooledPrior], np.ndarray]) -> None:
        """Report `report_index` left when its step (of step_s seconds) ended; the controller answers
        a round trip later with the basis it then holds (`prior`) and, for stale-ks, its own ks for
        the requests `dec`."""
        self.reported_s, self.last_step_s = ended_s, step_s
        own_ks = self.spec.mode == PlanMode.STALE_KS and dec.size
        ks = dict(zip(dec.tolist(), plan_with(prior).tolist())) if own_ks else {}
        self.answers.append(ControllerAnswer(report_index, ended_s + self.spec.round_trip_ms / 1000.0, prior, ks))
        # Keep what a later step may use: answers not yet arrived, and the newest one that has.
        while len(self.answers) > 1 and self.answers[1].arrives_s < ended_s:
            self.answers.popleft()

    def plan(self, step_index: int, now_s: float, dec: np.ndarray, last_k: np.ndarray, offer: np.ndarray | None,
             plan_with: Callable[[PooledPrior], np.ndarray]) -> tuple[float, np.ndarray]:
        """(wait before the step, k per decoding request [D] before the engine's clamps)."""
        wait_s, answer = answer_in_hand(self.answers, step_index, self.reported_s, now_s,
                                        self.spec.deadline_s(self.last_step_s))
        self.waited_steps += wait_s > 0
        self.wait_s += wait_s
        if not dec.size:
            return wait_s, dec
        if answer is None:
            self.fallback_steps += 1
            older = self.spec.fallback == LinkFallback.OLDER_PLAN
            answer = newest_arrived(self.answers, now_s + wait_s) if older else None
            if answer is None:  # the worker's fallback: the k each request last ran (0 if never planned)
                return wait_s, last_k[dec].copy()
        if self.spec.mode == PlanMode.STALE_REPLAN:
            return wait_s, plan_with(answer.prior)
        ks = np.array([answer.ks.get(r, 0) for r in dec.tolist()], dtype=np.int64)  # [D] joined since: 0
        return wait_s, ks if offer is None else np.minimum(ks, offer)

"""Discrete-event simulation of one continuous-batching worker with speculative decoding.

Why: to see a policy across loads, models and hardware we do not have (the SmartSpec authors'
H100 fits), in seconds, and to check our CPU benchmark against a model of it. The simulator runs
the controller's own decision path every step: `guarded_decide(policy, BatchState, cost, params)`
with acceptance and fill estimates built exactly as `controller.planner` builds them (per-request
tested positions and offered / asked proposals, a decaying pooled prior, the Beta-posterior blend
of `controller.acceptance`), and the worker's own admission and clamping rules (`worker.scheduler`).

One step, as the engine runs it:
  1. decoding requests get k from the policy, clamped (max_k, tokens left);
  2. queued requests are admitted into free slots with chunked prefill inside the token budget;
  3. the proposer offers k or, where it runs dry, fewer proposals (the acceptance model's fill);
  4. the clock advances by the step model's time for the proposals actually verified (plus noise);
  5. each decoding row accepts min(offered, G) proposals (+1 bonus token); a prefill that completes
     yields the request's first token; requests with all their tokens finish.
Bookkeeping is numpy arrays indexed by request; the only per-request Python work per step is
building the `RequestState`s the policy reads.

Plans normally come fresh and free (`ControllerLinkSpec()`, the ideal). With a `ControllerLinkSpec`
mode of "stale-replan" or "stale-ks" the simulator models the controller round trip as the worker
meets it (worker/controller_link.py): step s runs on the answer to report s-2, the worker waits a
bounded time when that answer is late, and falls back to each request's last k when it never came.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from smartspec.bench.acceptance_models import AcceptanceFactory, RequestAcceptance
from smartspec.bench.report import point_metrics
from smartspec.bench.workload import Workload
from smartspec.core.acceptance import DEFAULT_PRIOR_FILL, DEFAULT_PRIOR_RATE, PooledPrior
from smartspec.core.cost_model import CostModel
from smartspec.controller.planner import PlannerSettings
from smartspec.core.policies import BatchState, Policy, RequestState, guarded_decide
from smartspec.worker.scheduler import plan_prefill


@dataclass(frozen=True)
class WorkerSpec:
    """The simulated worker's limits (same meaning as the engine's EngineConfig)."""

    max_batch_size: int = 32
    max_k: int = 8
    token_budget: int = 2048
    # The worker reports what the proposer can offer next step (RequestOutcome.proposable_tokens),
    # so the planner knows which requests would run dry; False: plan on average fill rates only.
    lookahead: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_k < 0 or self.token_budget < 1:
            raise ValueError("need max_batch_size >= 1, max_k >= 0, token_budget >= 1")


@dataclass(frozen=True)
class StepModel:
    """How long a step takes: the cost model's prediction, plus what the cost model leaves out.

    prefill_row_ms: the worker runs each prefill chunk as its own forward, which costs a fixed
    launch on top of the per-token term; step_overhead_ms: time per step outside the measured
    draft + verify (the controller round trip, streaming the tokens out), which the controller's
    fit never sees and so does not plan with; noise_cv: multiplicative lognormal noise per step.
    padded_verify: the worker verifies all decode rows in one right-padded [B, max_k + 1] batch, so
    on hardware without ragged kernels every row costs max_i k_i + 1 query tokens, not k_i + 1
    (the cost model, and so the policy, assume the latter).
    """

    cost: CostModel
    prefill_row_ms: float = 0.0
    step_overhead_ms: float = 0.0
    noise_cv: float = 0.0
    padded_verify: bool = False

    def step_ms(self, ks: np.ndarray, contexts: np.ndarray, prefills: np.ndarray, prefill_rows: int,
                rng: np.random.Generator) -> float:
        """ks, contexts, prefills: [B], decode rows first, then `prefill_rows` prefill rows (k = 0)."""
        decode_rows = ks.size - prefill_rows
        if self.padded_verify and decode_rows > 1:
            ks = ks.copy()
            ks[:decode_rows] = ks[:decode_rows].max()  # every decode row runs the widest row's width
        ms = (predict_step_ms(self.cost, ks, contexts, prefills) + self.prefill_row_ms * prefill_rows
              + self.step_overhead_ms)
        if self.noise_cv > 0:
            sigma = np.sqrt(np.log1p(self.noise_cv**2))
            ms *= float(rng.lognormal(-0.5 * sigma * sigma, sigma))  # mean-preserving
        return ms


def predict_step_ms(cost: CostModel, ks: np.ndarray, contexts: np.ndarray, prefills: np.ndarray) -> float:
    """`CostModel.predict_ms` for one batch, written out for speed (it runs every simulated step).

    ks, contexts, prefills: [B] int arrays. Same formula as controller.cost_model (tested equal).
    """
    if ks.size == 0:
        return cost.c_fixed_ms + cost.overhead_ms
    k_total = int(ks.sum())
    top = int(ks.max())
    speculating = int(np.count_nonzero(ks)) if k_total > 0 else 0
    verify = (cost.c_fixed_ms + (cost.c_spec_ms if k_total > 0 else 0.0) + cost.c_spec_row_ms * speculating
              + cost.c_tok_ms * (k_total + ks.size + int(prefills.sum())) + cost.c_kv_ms * int(contexts.sum())
              + cost.c_row_ms * ks.size + cost.c_width_ms * ks.size * (top + 1) * int(contexts.max()))
    draft = 0.0
    if k_total > 0 and (cost.d_fixed_ms or cost.d_tok_ms or cost.d_kv_ms or cost.d_row_ms):
        draft = (cost.d_fixed_ms * top + cost.d_row_ms * speculating + cost.d_tok_ms * k_total
                 + cost.d_kv_ms * int(ks @ contexts))
    return verify + draft + cost.overhead_ms


def estimate_acceptance(accepted: np.ndarray, tested: np.ndarray, prior_accepted: float, prior_tested: float,
                        prior_strength: float, default_rate: float = 0.5) -> np.ndarray:
    """Vectorised `controller.acceptance.estimate`: Beta posterior mean around the pooled rate."""
    prior_rate = prior_accepted / prior_tested if prior_tested > 0 else default_rate
    return (accepted + prior_rate * prior_strength) / (tested + prior_strength)


PLAN_MODES = ("fresh", "stale-replan", "stale-ks")
FALLBACKS = ("last-k", "older-plan")


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
    """

    mode: str = "fresh"
    round_trip_ms: float = 0.0
    deadline_ms: float | None = None
    min_deadline_ms: float = 5.0
    deadline_fraction: float = 0.25
    fallback: str = "last-k"

    def __post_init__(self) -> None:
        if self.mode not in PLAN_MODES:
            raise ValueError(f"unknown plan mode {self.mode!r} (known: {', '.join(PLAN_MODES)})")
        if not self.round_trip_ms >= 0 or (self.deadline_ms is not None and not self.deadline_ms >= 0):
            raise ValueError("need round_trip_ms >= 0 and deadline_ms >= 0")
        if self.fallback not in FALLBACKS or (self.fallback == "older-plan" and self.mode != "stale-replan"):
            raise ValueError(f"fallback is one of {', '.join(FALLBACKS)}; older-plan only with stale-replan")

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
class RequestHistory:
    """What the planner knows of each request (arrays [N]); simulate updates them in place."""

    accepted: np.ndarray
    tested: np.ndarray
    proposed: np.ndarray
    requested: np.ndarray  # proposals asked for (= the k planned, after clamping)
    last_k: np.ndarray
    last_full: np.ndarray
    since_spec: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "RequestHistory":
        return cls(*(np.zeros(n, np.int64) for _ in range(5)), np.zeros(n, bool), np.zeros(n, np.int64))


def policy_ks(policy: Policy, params: Mapping[str, Any], cost: CostModel, settings: PlannerSettings, max_k: int,
              history: RequestHistory, dec: np.ndarray, context: np.ndarray, offer: np.ndarray | None,
              prior: PooledPrior, *, queued: int, step_index: int) -> np.ndarray:
    """The policy's k per decoding request [D], planned as controller.planner plans: each request's
    own history shrunk toward `prior`, the fill from the look-ahead `offer` where there is one, and
    never more than that offer (cap_to_proposable). The engine's clamps come after."""
    cold_rate = float(getattr(settings, "cold_rate", DEFAULT_PRIOR_RATE))
    cold_fill = float(getattr(settings, "cold_fill", DEFAULT_PRIOR_FILL))
    h = history
    a_hat = estimate_acceptance(h.accepted[dec], h.tested[dec], prior.accepted, prior.tested,
                                settings.prior_strength, cold_rate)  # [D]
    f_hat = estimate_acceptance(h.proposed[dec], h.requested[dec], prior.proposed, prior.requested,
                                settings.prior_strength, cold_fill)  # [D] same posterior, fill counts
    if offer is not None:  # the proposer knows now what it can offer next step: plan on that
        f_hat = (offer > 0).astype(np.float64)  # [D]
    lk, lf, ss, ev = h.last_k[dec].tolist(), h.last_full[dec].tolist(), h.since_spec[dec].tolist(), h.tested[dec].tolist()
    fl = f_hat.tolist()
    states = tuple(
        RequestState(str(r), a, c, 0, lk[j], lf[j], ss[j], float(ev[j]), fl[j])
        for j, (r, a, c) in enumerate(zip(dec.tolist(), a_hat.tolist(), context.tolist()))
    )
    batch = BatchState(states, max_k, queued, step_index, prior.tested)
    ks = np.array(guarded_decide(policy, batch, cost, params, prior_acceptance=prior.rate(cold_rate)),
                  dtype=np.int64)  # [D]
    return ks if offer is None else np.minimum(ks, offer)


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
        ks = dict(zip(dec.tolist(), plan_with(prior).tolist())) if self.spec.mode == "stale-ks" and dec.size else {}
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
            answer = newest_arrived(self.answers, now_s + wait_s) if self.spec.fallback == "older-plan" else None
            if answer is None:  # the worker's fallback: the k each request last ran (0 if never planned)
                return wait_s, last_k[dec].copy()
        if self.spec.mode == "stale-replan":
            return wait_s, plan_with(answer.prior)
        ks = np.array([answer.ks.get(r, 0) for r in dec.tolist()], dtype=np.int64)  # [D] joined since: 0
        return wait_s, ks if offer is None else np.minimum(ks, offer)


@dataclass
class SimResult:
    """Per-request outcomes of one run (arrays [N], seconds) and per-step totals."""

    arrival_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    completion_tokens: np.ndarray
    proposed: np.ndarray
    requested: np.ndarray
    accepted: np.ndarray
    tested: np.ndarray
    k_sum: np.ndarray
    decode_steps: np.ndarray
    true_acceptance: np.ndarray
    steps: int
    busy_step_s: float
    batch_size_sum: int
    plan_mode: str = "fresh"
    planned_steps: int = 0  # steps with decoding requests, i.e. that needed a plan
    fallback_steps: int = 0  # of those, run on the worker's fallback (no usable plan in time)
    waited_steps: int = 0  # steps that waited for a plan
    plan_wait_s: float = 0.0  # total time spent waiting for plans (included in busy_step_s)

    def detail(self, prompt_tokens: np.ndarray) -> dict[str, list]:
        """Per-request columns in the bench record's `detail` format (for calibration round trips)."""
        return {
            "index": list(range(self.arrival_s.size)),
            "prompt_tokens": np.asarray(prompt_tokens).tolist(),
            "completion_tokens": self.completion_tokens.tolist(),
            "proposed": self.proposed.tolist(),
            "requested": self.requested.tolist(),
            "accepted": self.accepted.tolist(),
            "tested": self.tested.tolist(),
            "latency_s": (self.finish_s - self.arrival_s).round(4).tolist(),
        }

    def metrics(self) -> dict[str, float]:
        out = point_metrics(
            arrival_s=self.arrival_s, first_token_s=self.first_token_s, finish_s=self.finish_s,
            completion_tokens=self.completion_tokens, accepted=self.accepted, tested=self.tested,
            k_sum=self.k_sum, decode_steps=self.decode_steps,
        )
        out["steps"] = self.steps
        out["mean_batch_size"] = self.batch_size_sum / self.steps if self.steps else 0.0
        out["step_time_goodput_tok_s"] = float(self.completion_tokens.sum()) / self.busy_step_s if self.busy_step_s else 0.0
        if self.plan_mode != "fresh":  # fresh plans never wait nor fall back: keep those records as they were
            out["fallback_share"] = self.fallback_steps / self.planned_steps if self.planned_steps else 0.0
            out["waited_share"] = self.waited_steps / self.steps if self.steps else 0.0
            out["mean_plan_wait_ms"] = 1000.0 * self.plan_wait_s / self.steps if self.steps else 0.0
        return out


def simulate(workload: Workload, policy: Policy, params: Mapping[str, Any], *, step_model: StepModel,
             acceptance: AcceptanceFactory | RequestAcceptance, worker: WorkerSpec = WorkerSpec(),
             planning_cost: CostModel | None = None, settings: PlannerSettings = PlannerSettings(),
             initial_prior: PooledPrior | None = None, link: ControllerLinkSpec = ControllerLinkSpec(),
             seed: int = 0) -> SimResult:
    """Run the workload to completion under `policy`; the policy plans with `planning_cost`
    (default: the step model's own cost model, i.e. a perfectly fitted controller).

    `initial_prior`: the pooled acceptance counts the controller already holds (a real controller
    keeps them in Redis across benchmark points); default: none, a cold start.
    `link`: how plans reach the worker (default: fresh and free, see ControllerLinkSpec).
    """
    rng = np.random.default_rng([seed, 11])
    n = workload.size
    accept_model = acceptance(n, np.random.default_rng([seed, 13])) if callable(acceptance) else acceptance
    plan_cost = planning_cost or step_model.cost
    arrival = workload.arrival_s
    prompt = workload.prompt_tokens.astype(np.int64)
    output = workload.output_tokens.astype(np.int64)

    cached = np.zeros(n, np.int64)  # prompt tokens prefilled so far
    generated = np.zeros(n, np.int64)
    history = RequestHistory.empty(n)  # the arrays below are its fields, updated in place
    accepted, tested, proposed, requested = history.accepted, history.tested, history.proposed, history.requested
    last_k, last_full, since_spec = history.last_k, history.last_full, history.since_spec
    k_sum = np.zeros(n, np.int64)
    decode_steps = np.zeros(n, np.int64)
    first_token = np.full(n, np.nan)
    finish = np.full(n, np.nan)

    prior = initial_prior or PooledPrior()
    stale = StaleLink(link) if link.mode != "fresh" else None
    planned_steps = 0
    last_end = last_dt = 0.0  # when the previous step ended (its report left), and how long it took
    waiting: deque[int] = deque()
    prefilling: list[int] = []  # admitted, prompt not fully in yet (admission order)
    dec = np.zeros(0, np.int64)  # [D] decoding requests, rebuilt only when membership changes
    next_arrival = 0
    t = 0.0
    step_index = 0
    done = 0
    busy_step_s = 0.0
    batch_size_sum = 0
    no_rows = np.zeros(0, np.int64)

    while done < n:
        while next_arrival < n and arrival[next_arrival] <= t:
            waiting.append(next_arrival)
            next_arrival += 1
        if not dec.size and not prefilling and not waiting:
            t = float(arrival[next_arrival])  # idle until the next arrival
            continue

        ks, context, offer, wait_s = no_rows, no_rows, None, 0.0
        if dec.size:
            context = prompt[dec] + generated[dec]  # [D] tokens the step attends over
            # The worker's look-ahead: where the proposer knows now what it can offer next step,
            # the planner plans on that instead of the average fill (as controller.planner does).
            if worker.lookahead and hasattr(accept_model, "proposable"):
                offer = accept_model.proposable(dec, worker.max_k, rng)  # [D] or None (draft model)
        plan_with = partial(policy_ks, policy, params, plan_cost, settings, worker.max_k, history, dec, context,
                            offer, queued=len(waiting), step_index=step_index)  # prior -> ks [D]
        if stale is None:
            ks = plan_with(prior) if dec.size else no_rows
        else:
            if step_index:  # the previous step's report: the controller plans on the facts as they stand now
                stale.report(step_index - 1, last_end, last_dt, prior, dec, plan_with)
            wait_s, ks = stale.plan(step_index, t, dec, last_k, offer, plan_with)
        if dec.size:
            planned_steps += 1
            # the engine's clamp: no more proposals than tokens still wanted, minus the bonus token
            ks = np.maximum(np.minimum(ks, output[dec] - generated[dec] - 1), 0)

        # Admission and chunked prefill within what decoding leaves of the token budget.
        pre_rows, chunks = no_rows, no_rows
        if prefilling or waiting:
            free = worker.max_batch_size - dec.size - len(prefilling)
            heads = [waiting[i] for i in range(min(max(free, 0), len(waiting)))]
            plan = plan_prefill(
                token_budget=worker.token_budget,
                decode_tokens=int(ks.sum()) + int(ks.size),
                remaining_prompts=[int(prompt[r] - cached[r]) for r in prefilling],
                waiting_prompts=prompt[heads].tolist() if heads else [],
                free_slots=free,
            )
            prefilling.extend(waiting.popleft() for _ in range(plan.admitted))
            rows = np.array(prefilling, dtype=np.int64)  # [P]
            sizes = np.array(plan.continuing + plan.new_chunks, dtype=np.int64)  # [P]
            active = sizes > 0
            pre_rows, chunks = rows[active], sizes[active]

        # The proposer: k asked of it, `offered` (<= k) made; the target verifies only those.
        offered = ks
        spec = ks > 0  # [D]
        if spec.any():
            offered = ks.copy()
            offered[spec] = accept_model.propose(dec[spec], ks[spec], rng)

        # Step time over every row the target runs: decode rows (offered_i + 1 tokens) and prefill chunks.
        if pre_rows.size:
            all_k = np.concatenate([offered, np.zeros(pre_rows.size, np.int64)])  # [B]
            all_ctx = np.concatenate([prompt[dec] + generated[dec], cached[pre_rows]])  # [B]
            all_pre = np.concatenate([np.zeros(dec.size, np.int64), chunks])  # [B]
        else:
            all_k, all_ctx, all_pre = offered, context, np.zeros(ks.size, np.int64)
        dt = wait_s + step_model.step_ms(all_k, all_ctx, all_pre, int(pre_rows.size), rng) / 1000.0
        t += dt
        last_end, last_dt = t, dt
        busy_step_s += dt
        batch_size_sum += int(all_k.size)
        step_index += 1

        # Decode outcomes: min(offered, run of acceptances) proposals kept, plus the target's own token.
        step_acc = step_tested = step_offered = step_asked = 0
        if dec.size:
            acc = np.zeros(dec.size, np.int64)
            made = offered > 0  # [D]
            if made.any():
                acc[made] = accept_model.accept(dec[made], offered[made], rng)
            tst = acc + (acc < offered)
            proposed[dec] += offered
            requested[dec] += ks
            accepted[dec] += acc
            tested[dec] += tst
            k_sum[dec] += ks
            decode_steps[dec] += 1
            generated[dec] += acc + 1
            if hasattr(accept_model, "advance"):  # position-replay models follow each request's text
                accept_model.advance(dec, acc + 1)
            last_k[dec] = ks
            last_full[dec] = made & (acc == offered)
            since_spec[dec] = (since_spec[dec] + 1) * ~spec
            step_acc, step_tested = int(acc.sum()), int(tst.sum())
            step_offered, step_asked = int(offered.sum()), int(ks.sum())
            ended = generated[dec] >= output[dec]
            if ended.any():
                finish[dec[ended]] = t
                done += int(ended.sum())
                dec = dec[~ended]

        # Prefill progress: a completed prompt yields the first token at the end of this step.
        if pre_rows.size:
            cached[pre_rows] += chunks
            complete = pre_rows[cached[pre_rows] >= prompt[pre_rows]]
            if complete.size:
                generated[complete] = 1
                first_token[complete] = t
                gone = set(complete.tolist())
                prefilling = [r for r in prefilling if r not in gone]
                one_token = complete[output[complete] <= 1]
                finish[one_token] = t
                done += int(one_token.size)
                dec = np.concatenate([dec, complete[output[complete] > 1]])

        prior = prior.update(step_acc, step_tested, settings.prior_decay, step_offered, step_asked)

    return SimResult(
        arrival_s=arrival.copy(), first_token_s=first_token, finish_s=finish, completion_tokens=generated,
        proposed=proposed, requested=requested, accepted=accepted, tested=tested, k_sum=k_sum, decode_steps=decode_steps,
        true_acceptance=np.asarray(accept_model.mean_rates()), steps=step_index, busy_step_s=busy_step_s,
        batch_size_sum=batch_size_sum, plan_mode=link.mode, planned_steps=planned_steps,
        fallback_steps=stale.fallback_steps if stale else 0, waited_steps=stale.waited_steps if stale else 0,
        plan_wait_s=stale.wait_s if stale else 0.0,
    )

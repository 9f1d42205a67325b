"""Discrete-event simulation of one continuous-batching worker with speculative decoding.

Why: to see a policy across loads, models and hardware we do not have (the SmartSpec authors'
H100 fits), in seconds, and to check our CPU benchmark against a model of it. The simulator plans
every step with the controller's own decision pipeline (core/decision.py, through
`bench/sim_planner.py`): the same per-request evidence, the same pooled prior and its per-step decay,
the same estimates, `guarded_decide` and look-ahead cap, so a simulated step is planned exactly as
the controller plans it from the same facts; and it applies the worker's own admission and
clamping rules (`worker.scheduler`).

One step, as the engine runs it (`Simulation.step`):
  1. decoding requests get k from the policy, clamped (max_k, tokens left);
  2. queued requests are admitted into free slots with chunked prefill inside the token budget;
  3. the proposer offers k or, where it runs dry, fewer proposals (the acceptance model's fill);
  4. the clock advances by the step model's time for the proposals actually verified (plus noise);
  5. each decoding row accepts min(offered, G) proposals (+1 bonus token); a prefill that completes
     yields the request's first token; requests with all their tokens finish.
Bookkeeping is numpy arrays indexed by request.

Plans normally come fresh and free (`ControllerLinkSpec()`, the ideal); the stale plan modes model
the controller round trip as the worker meets it (`bench/sim_link.py`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from smartspec.bench.acceptance_models import AcceptanceFactory, RequestAcceptance
from smartspec.bench.report import point_metrics
from smartspec.bench.sim_link import ControllerLinkSpec, PlanMode, StaleLink
from smartspec.bench.sim_planner import SimPlanner
from smartspec.bench.workload import Workload
from smartspec.core.acceptance import PooledPrior, positions_tested
from smartspec.core.cost_model import CostModel
from smartspec.core.decision import Estimator
from smartspec.core.policies import Policy
from smartspec.worker.scheduler import chunk_prefill

__all__ = ["ControllerLinkSpec", "SimResult", "Simulation", "StepModel", "WorkerSpec", "predict_step_ms", "simulate"]


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


class Simulation:
    """One run of a workload to completion: the engine's step loop over arrays indexed by request."""

    def __init__(self, workload: Workload, planner: SimPlanner, *, step_model: StepModel,
                 acceptance: AcceptanceFactory | RequestAcceptance, worker: WorkerSpec, link: ControllerLinkSpec,
                 seed: int) -> None:
        n = workload.size
        self.rng = np.random.default_rng([seed, 11])
        self.accept_model = acceptance(n, np.random.default_rng([seed, 13])) if callable(acceptance) else acceptance
        self.planner, self.step_model, self.worker, self.link = planner, step_model, worker, link
        self.stale = StaleLink(link) if link.mode != PlanMode.FRESH else None
        self.arrival = workload.arrival_s
        self.prompt = workload.prompt_tokens.astype(np.int64)
        self.output = workload.output_tokens.astype(np.int64)
        self.cached = np.zeros(n, np.int64)  # prompt tokens prefilled so far
        self.generated = np.zeros(n, np.int64)
        self.k_sum = np.zeros(n, np.int64)
        self.decode_steps = np.zeros(n, np.int64)
        self.first_token = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.waiting: deque[int] = deque()
        self.prefilling: list[int] = []  # admitted, prompt not fully in yet (admission order)
        self.dec = np.zeros(0, np.int64)  # [D] decoding requests, rebuilt only when membership changes
        self.next_arrival = self.done = self.step_index = self.planned_steps = self.batch_size_sum = 0
        self.t = self.busy_step_s = 0.0
        self.last_end = self.last_dt = 0.0  # when the previous step ended (its report left), and how long it took

    def run(self) -> SimResult:
        n = self.arrival.size
        while self.done < n:
            while self.next_arrival < n and self.arrival[self.next_arrival] <= self.t:
                self.waiting.append(self.next_arrival)
                self.next_arrival += 1
            if not self.dec.size and not self.prefilling and not self.waiting:
                self.t = float(self.arrival[self.next_arrival])  # idle until the next arrival
                continue
            self.step()
        return self.result()

    def step(self) -> None:
        """Plan, admit, propose, time, verify: one engine step."""
        wait_s, ks, context = self.plan_decode()
        pre_rows, chunks = self.schedule_prefill(ks)
        offered = self.propose(ks)
        dt = wait_s + self.step_seconds(offered, context, pre_rows, chunks)
        self.t += dt
        self.last_end, self.last_dt = self.t, dt
        self.busy_step_s += dt
        self.batch_size_sum += int(offered.size + pre_rows.size)
        self.step_index += 1
        self.finish_decode(ks, offered, pre_rows)
        self.finish_prefill(pre_rows, chunks)

    def plan_decode(self) -> tuple[float, np.ndarray, np.ndarray]:
        """(wait for a plan, k per decoding request [D] after the engine's clamps, their contexts [D])."""
        dec, offer = self.dec, None
        context = self.prompt[dec] + self.generated[dec]  # [D] tokens the step attends over
        # The worker's look-ahead: where the proposer knows now what it can offer next step,
        # the planner plans on that instead of the average fill (as controller.planner does).
        if dec.size and self.worker.lookahead and hasattr(self.accept_model, "proposable"):
            offer = self.accept_model.proposable(dec, self.worker.max_k, self.rng)  # [D] or None (draft model)

        def plan_with(prior: PooledPrior) -> np.ndarray:  # ks [D] planned on `prior`
            return self.planner.plan(dec, context, offer, prior=prior, queued=len(self.waiting),
                                     step_index=self.step_index)

        wait_s, ks = 0.0, dec
        if self.stale is None:
            ks = plan_with(self.planner.prior) if dec.size else dec
        else:
            if self.step_index:  # the previous step's report: the controller plans on the facts as they stand now
                self.stale.report(self.step_index - 1, self.last_end, self.last_dt, self.planner.prior, dec, plan_with)
            wait_s, ks = self.stale.plan(self.step_index, self.t, dec, self.planner.evidence.last_k, offer, plan_with)
        if dec.size:
            self.planned_steps += 1
            # the engine's clamp: no more proposals than tokens still wanted, minus the bonus token
            ks = np.maximum(np.minimum(ks, self.output[dec] - self.generated[dec] - 1), 0)
        return wait_s, ks, context

    def schedule_prefill(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Admission and chunked prefill within what decoding leaves of the token budget:
        (prefill rows [P], their chunks [P])."""
        no_rows = np.zeros(0, np.int64)
        if not (self.prefilling or self.waiting):
            return no_rows, no_rows
        free = self.worker.max_batch_size - self.dec.size - len(self.prefilling)
        heads = [self.waiting[i] for i in range(min(max(free, 0), len(self.waiting)))]
        plan = chunk_prefill(
            token_budget=self.worker.token_budget,
            decode_tokens=int(ks.sum()) + int(ks.size),
            remaining_prompts=[int(self.prompt[r] - self.cached[r]) for r in self.prefilling],
            waiting_prompts=self.prompt[heads].tolist() if heads else [],
            free_slots=free,
        )
        self.prefilling.extend(self.waiting.popleft() for _ in range(plan.admitted))
        rows = np.array(self.prefilling, dtype=np.int64)  # [P]
        sizes = np.array(plan.continuing + plan.new_chunks, dtype=np.int64)  # [P]
        active = sizes > 0
        return rows[active], sizes[active]

    def propose(self, ks: np.ndarray) -> np.ndarray:
        """The proposer: k asked of it, `offered` (<= k) made [D]; the target verifies only those."""
        spec = ks > 0  # [D]
        if not spec.any():
            return ks
        offered = ks.copy()
        offered[spec] = self.accept_model.propose(self.dec[spec], ks[spec], self.rng)
        return offered

    def step_seconds(self, offered: np.ndarray, context: np.ndarray, pre_rows: np.ndarray,
                     chunks: np.ndarray) -> float:
        """Step time over every row the target runs: decode rows (offered_i + 1 tokens) and prefill chunks."""
        if pre_rows.size:
            all_k = np.concatenate([offered, np.zeros(pre_rows.size, np.int64)])  # [B]
            all_ctx = np.concatenate([context, self.cached[pre_rows]])  # [B]
            all_pre = np.concatenate([np.zeros(offered.size, np.int64), chunks])  # [B]
        else:
            all_k, all_ctx, all_pre = offered, context, np.zeros(offered.size, np.int64)
        return self.step_model.step_ms(all_k, all_ctx, all_pre, int(pre_rows.size), self.rng) / 1000.0

    def finish_decode(self, ks: np.ndarray, offered: np.ndarray, pre_rows: np.ndarray) -> None:
        """Decode outcomes: min(offered, run of acceptances) proposals kept, plus the target's own token;
        the step's rows recorded as evidence (prefill rows too) and pooled."""
        dec = self.dec
        acc = np.zeros(dec.size, np.int64)
        made = offered > 0  # [D]
        if made.any():
            acc[made] = self.accept_model.accept(dec[made], offered[made], self.rng)
        self.planner.record_step(dec, ks, offered, acc, positions_tested(offered, acc), pre_rows)
        if not dec.size:
            return
        self.k_sum[dec] += ks
        self.decode_steps[dec] += 1
        self.generated[dec] += acc + 1
        if hasattr(self.accept_model, "advance"):  # position-replay models follow each request's text
            self.accept_model.advance(dec, acc + 1)
        ended = self.generated[dec] >= self.output[dec]
        if ended.any():
            self.finish[dec[ended]] = self.t
            self.done += int(ended.sum())
            self.dec = dec[~ended]

    def finish_prefill(self, pre_rows: np.ndarray, chunks: np.ndarray) -> None:
        """Prefill progress: a completed prompt yields the first token at the end of this step."""
        if not pre_rows.size:
            return
        self.cached[pre_rows] += chunks
        complete = pre_rows[self.cached[pre_rows] >= self.prompt[pre_rows]]
        if not complete.size:
            return
        self.generated[complete] = 1
        self.first_token[complete] = self.t
        gone = set(complete.tolist())
        self.prefilling = [r for r in self.prefilling if r not in gone]
        one_token = complete[self.output[complete] <= 1]
        self.finish[one_token] = self.t
        self.done += int(one_token.size)
        self.dec = np.concatenate([self.dec, complete[self.output[complete] > 1]])

    def result(self) -> SimResult:
        evidence, stale = self.planner.evidence, self.stale
        return SimResult(
            arrival_s=self.arrival.copy(), first_token_s=self.first_token, finish_s=self.finish,
            completion_tokens=self.generated, proposed=evidence.proposed, requested=evidence.requested,
            accepted=evidence.accepted, tested=evidence.tested, k_sum=self.k_sum, decode_steps=self.decode_steps,
            true_acceptance=np.asarray(self.accept_model.mean_rates()), steps=self.step_index,
            busy_step_s=self.busy_step_s, batch_size_sum=self.batch_size_sum, plan_mode=self.link.mode,
            planned_steps=self.planned_steps, fallback_steps=stale.fallback_steps if stale else 0,
            waited_steps=stale.waited_steps if stale else 0, plan_wait_s=stale.wait_s if stale else 0.0,
        )


def simulate(workload: Workload, policy: Policy, params: Mapping[str, Any], *, step_model: StepModel,
             acceptance: AcceptanceFactory | RequestAcceptance, worker: WorkerSpec = WorkerSpec(),
             planning_cost: CostModel | None = None, settings: Estimator = Estimator(),
             initial_prior: PooledPrior | None = None, link: ControllerLinkSpec = ControllerLinkSpec(),
             seed: int = 0) -> SimResult:
    """Run the workload to completion under `policy`; the policy plans with `planning_cost`
    (default: the step model's own cost model, i.e. a perfectly fitted controller).

    `settings`: the estimates' knobs (the controller's PlannerSettings is one).
    `initial_prior`: the pooled acceptance counts the controller already holds (a real controller
    keeps them in Redis across benchmark points); default: none, a cold start.
    `link`: how plans reach the worker (default: fresh and free, see ControllerLinkSpec).
    """
    planner = SimPlanner(policy, params, planning_cost or step_model.cost, settings, worker.max_k, workload.size,
                         prior=initial_prior or PooledPrior())
    return Simulation(workload, planner, step_model=step_model, acceptance=acceptance, worker=worker, link=link,
                      seed=seed).run()

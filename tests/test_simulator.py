"""The simulator: the controller's estimators and policies inside, and results a wrong model would break."""

from dataclasses import dataclass, field

import numpy as np
import pytest

from smartspec.bench.acceptance_models import (TraceAcceptance, accepted_runs, fixed, parse_acceptance,
                                               stream_from_steps)
from smartspec.bench.arrivals import poisson_arrivals
from smartspec.bench.simulator import StepModel, WorkerSpec, predict_step_ms, simulate
from smartspec.bench.step_models import PRESETS, parse_step_model
from smartspec.bench.workload import Workload, make_workload
from smartspec.core.cost_model import CostModel
from smartspec.core.policies import get

H100_8B = PRESETS["h100-llama8b"]
CPU = PRESETS["cpu-smollm2"]


def run(policy_spec, workload, alpha, cost=H100_8B, worker=WorkerSpec(), seed=0):
    from smartspec.core.policy_spec import parse_policy_spec

    name, params = parse_policy_spec(policy_spec)
    return simulate(workload, get(name), params, step_model=StepModel(cost), acceptance=fixed(alpha),
                    worker=worker, seed=seed)


def small_workload(n, rate, seed=0, prompt="100:300", output="48:96"):
    return make_workload(poisson_arrivals(n, rate, seed=seed), prompt, output, seed=seed)


# --- building blocks ---------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_accepted_runs_are_truncated_geometric(alpha):
    rng = np.random.default_rng(0)
    k = 4
    acc = accepted_runs(np.full(100_000, alpha), np.full(100_000, k), rng)
    for j in range(k + 1):  # P(accepted >= j) = alpha^j for j <= k
        assert np.mean(acc >= j) == pytest.approx(alpha**j, abs=0.01)
    assert acc.max() <= k


def test_fast_step_time_equals_the_cost_model():
    rng = np.random.default_rng(1)
    cost = CostModel(c_fixed_ms=5, c_spec_ms=3, c_tok_ms=0.2, c_kv_ms=0.01, d_fixed_ms=1.5, d_tok_ms=0.1,
                     d_kv_ms=0.002, overhead_ms=0.7, c_spec_row_ms=0.4, c_row_ms=0.3, c_width_ms=2e-4, d_row_ms=0.05)
    for _ in range(50):
        b = int(rng.integers(1, 20))
        ks, ctx, pre = rng.integers(0, 6, b), rng.integers(10, 900, b), rng.integers(0, 50, b)
        assert predict_step_ms(cost, ks, ctx, pre) == pytest.approx(cost.predict_ms(ks, ctx, pre))


def test_trace_replay_consumes_outcomes_in_order():
    stream = stream_from_steps([(3, 3), (3, 1)])  # T T T T F
    assert stream.tolist() == [True, True, True, True, False]
    model = TraceAcceptance([stream], np.array([0.8]))
    rng = np.random.default_rng(0)
    first = model.accept(np.array([0]), np.array([2]), rng)  # T T
    second = model.accept(np.array([0]), np.array([5]), rng)  # T T F -> 2, rejection consumed
    assert first.tolist() == [2] and second.tolist() == [2]
    assert model.cursor[0] == 5


def test_spec_parsers_reject_nonsense():
    assert parse_step_model("c_fixed=6.94,c_tok=0.0184,c_kv=4.86e-5") == H100_8B
    with pytest.raises(ValueError, match="NAME=NUMBER"):
        parse_step_model("c_fixed=fast")
    with pytest.raises(ValueError, match="unknown acceptance model"):
        parse_acceptance("zipf:1")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        parse_acceptance("1.5")


# --- the policy runs inside, fed as the controller feeds it -------------------------------------

@dataclass
class RecordingPolicy:
    """A Policy (protocol) that always asks for k = 2 and keeps what it was shown."""

    name: str = "recording"
    description: str = "test"
    parameters: tuple = ()
    batches: list = field(default_factory=list)

    def validate(self, raw):
        return {}

    def decide(self, batch, cost, params):
        self.batches.append(batch)
        return [2] * len(batch.requests)


def test_policy_sees_bounded_batches_and_estimates_that_learn_the_true_rate():
    policy = RecordingPolicy()
    workload = Workload(np.zeros(6), np.full(6, 50), np.full(6, 400))
    result = simulate(workload, policy, {}, step_model=StepModel(H100_8B), acceptance=fixed(0.9),
                      worker=WorkerSpec(max_batch_size=4, max_k=5), seed=3)
    assert max(b.batch_size for b in policy.batches) == 4
    assert all(b.max_k == 5 for b in policy.batches)
    assert policy.batches[0].queued_requests == 2  # 6 arrive at once, 4 slots
    first, last = policy.batches[0].requests[0], policy.batches[-1].requests[0]
    assert first.acceptance == pytest.approx(0.5)  # the cold prior, before any evidence
    assert last.acceptance == pytest.approx(0.9, abs=0.05)  # own history dominates after ~150 steps
    assert last.evidence > 100 and last.context_tokens > 400
    assert np.all(result.completion_tokens == 400)
    assert np.all(result.proposed == result.k_sum)


# --- outcomes ----------------------------------------------------------------------------------

def test_conservation_and_ordering():
    wl = small_workload(200, rate=20)
    r = run("goodput", wl, 0.7)
    assert np.array_equal(r.completion_tokens, wl.output_tokens)
    assert np.all(r.accepted <= r.proposed) and np.all(r.tested <= r.proposed)
    assert np.all(wl.arrival_s < r.first_token_s) and np.all(r.first_token_s <= r.finish_s)
    m = r.metrics()
    assert m["acceptance_rate"] == pytest.approx(0.7, abs=0.03)


def test_without_acceptance_speculation_only_costs():
    wl = small_workload(120, rate=1)
    off, fixed5 = run("off", wl, 0.0, cost=CPU), run("fixed:5", wl, 0.0, cost=CPU)
    assert off.metrics()["mean_latency_s"] < 0.8 * fixed5.metrics()["mean_latency_s"]
    assert fixed5.metrics()["acceptance_rate"] == 0.0


def test_with_good_acceptance_at_low_load_speculation_pays():
    wl = small_workload(150, rate=0.5)
    off, fixed3 = run("off", wl, 0.9, cost=CPU), run("fixed:3", wl, 0.9, cost=CPU)
    # ~3.4 tokens per step for ~1.5x the step time: well over 1.5x faster
    assert fixed3.metrics()["mean_latency_s"] < off.metrics()["mean_latency_s"] / 1.5


def test_latency_grows_with_load_and_littles_law_holds():
    latencies = []
    for rate in (2.0, 10.0, 25.0):  # below the H100 model's capacity (~35 req/s): a steady state exists
        wl = small_workload(600, rate, seed=5)
        r = run("off", wl, 0.7)
        latencies.append(r.metrics()["mean_latency_s"])
        # Little: time-average requests in the system = arrival rate x mean time in system
        horizon = wl.arrival_s[-1]
        probes = np.random.default_rng(0).uniform(0.1 * horizon, horizon, 4000)
        in_system = ((wl.arrival_s[None, :] <= probes[:, None]) & (r.finish_s[None, :] > probes[:, None])).sum(1)
        assert in_system.mean() == pytest.approx(rate * latencies[-1], rel=0.2)
    assert latencies[0] < latencies[1] < latencies[2]


def test_saturated_throughput_matches_the_cost_model():
    n, prompt, out = 400, 100, 200
    wl = Workload(np.zeros(n), np.full(n, prompt), np.full(n, out))
    r = run("off", wl, 0.5, cost=CPU, worker=WorkerSpec(max_batch_size=16))
    # identical requests move in cohorts of 16: one step prefills all 16 prompts (first tokens),
    # then out - 1 decode steps of 16 single-token rows over a growing context
    prefill_ms = CPU.predict_ms([0] * 16, [0] * 16, [prompt] * 16)
    decode_ms = sum(CPU.predict_ms([0] * 16, [prompt + g] * 16) for g in range(1, out))
    expected = 16 * out * 1000.0 / (prefill_ms + decode_ms)
    assert r.metrics()["throughput_tok_s"] == pytest.approx(expected, rel=0.01)
    assert r.steps == (n // 16) * out


def test_goodput_is_not_worse_than_the_best_fixed_k():
    wl = small_workload(250, rate=4, seed=2)
    means = {spec: run(spec, wl, 0.7).metrics()["mean_latency_s"] for spec in ("off", "fixed:1", "fixed:3", "fixed:5")}
    goodput = run("goodput", wl, 0.7).metrics()["mean_latency_s"]
    assert goodput <= 1.03 * min(means.values())


def test_trace_file_and_profile_file(tmp_path):
    import json

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"requests": [{"steps": [[4, 4], [4, 4], [4, 0]]}, {"accepted": 1, "tested": 10}]}))
    model = parse_acceptance(f"trace:{trace}")(4, np.random.default_rng(0))
    assert model.mean_rates().tolist() == pytest.approx([8 / 9, 0.1, 8 / 9, 0.1])
    first = model.accept(np.array([0, 2]), np.array([3, 3]), np.random.default_rng(0))
    assert first.tolist() == [3, 3]  # both replay the recorded run of 8 acceptances

    # a startup profile generated from known coefficients is fitted back to them
    truth = CostModel(c_fixed_ms=20.0, c_spec_ms=5.0, c_tok_ms=0.5, c_kv_ms=0.01)
    samples = [{"batch_size": b, "speculation_length": k, "context_tokens": c, "draft_ms": 0.0,
                "verify_ms": truth.verify_ms([k] * b, [c] * b)}
               for b in (1, 4, 16) for k in (0, 2, 4) for c in (100, 400)]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(samples))
    fitted = parse_step_model(str(profile))
    for b, k, c in ((2, 1, 200), (8, 3, 300)):
        assert fitted.predict_ms([k] * b, [c] * b) == pytest.approx(truth.predict_ms([k] * b, [c] * b), rel=0.05)


def test_padded_verify_charges_every_row_the_widest_k():
    rng = np.random.default_rng(0)
    ks, ctx, pre = np.array([0, 1, 6, 0]), np.array([100, 100, 100, 0]), np.array([0, 0, 0, 50])
    plain, padded = StepModel(CPU), StepModel(CPU, padded_verify=True)
    extra_tokens = (6 - 0) + (6 - 1)  # decode rows 0 and 1 padded to width 7; the prefill row is not
    # row 0, padded up from k = 0, also counts as a speculating row (its verify, its proposer call)
    assert padded.step_ms(ks, ctx, pre, 1, rng) - plain.step_ms(ks, ctx, pre, 1, rng) == pytest.approx(
        (CPU.c_tok_ms + CPU.d_tok_ms + CPU.d_kv_ms * 100) * extra_tokens + CPU.c_spec_row_ms + CPU.d_row_ms)
    same = np.array([3, 3, 3])
    assert padded.step_ms(same, ctx[:3], pre[:3] * 0, 0, rng) == plain.step_ms(same, ctx[:3], pre[:3] * 0, 0, rng)


# --- a proposer that runs dry (prompt lookup) ------------------------------------------------

def test_fill_rate_is_learned_and_dry_proposals_cost_nothing():
    """Fill 0.3: about 30% of asked-for proposals are offered; the estimate the policy sees
    converges there; and a dry step is timed as a plain decode (fixed:5 at fill 0 costs what off does)."""
    from smartspec.bench.acceptance_models import with_fill

    policy = RecordingPolicy()
    workload = Workload(np.zeros(4), np.full(4, 50), np.full(4, 300))
    result = simulate(workload, policy, {}, step_model=StepModel(H100_8B), acceptance=with_fill(fixed(0.9), [0.3]),
                      worker=WorkerSpec(max_batch_size=4, max_k=5, lookahead=False), seed=3)
    assert result.proposed.sum() / result.requested.sum() == pytest.approx(0.3, abs=0.05)
    assert policy.batches[-1].requests[0].fill == pytest.approx(0.3, abs=0.1)
    assert policy.batches[0].requests[0].fill == 1.0  # the cold prior: a proposer that fills
    m = result.metrics()
    assert m["acceptance_rate"] == pytest.approx(0.9, abs=0.05)  # dry positions are not rejections

    wl = small_workload(100, rate=2)
    dry = with_fill(fixed(0.9), [0.0])
    off = simulate(wl, get("off"), {}, step_model=StepModel(CPU), acceptance=dry, seed=1)
    fixed5 = simulate(wl, get("fixed"), {"k": 5}, step_model=StepModel(CPU), acceptance=dry, seed=1)
    assert fixed5.metrics()["mean_latency_s"] == pytest.approx(off.metrics()["mean_latency_s"], rel=1e-9)


def test_goodput_speculates_for_requests_whose_proposer_fills_now_and_then():
    """Summaries (always fill, a = 0.9) and chat (fill 0.2, but right when it fills) interleaved on the
    CPU model: per-request k beats every fixed k, and beats off."""
    from smartspec.bench.acceptance_models import choice, with_fill

    wl = small_workload(200, rate=0.5, seed=4)
    mixed = with_fill(choice([0.9, 0.9]), [1.0, 0.2])
    means = {}
    for spec in ("off", "fixed:1", "fixed:3", "fixed:5", "goodput"):
        from smartspec.core.policy_spec import parse_policy_spec

        name, params = parse_policy_spec(spec)
        means[spec] = simulate(wl, get(name), params, step_model=StepModel(CPU), acceptance=mixed,
                               seed=4).metrics()["mean_latency_s"]
    best_fixed = min(v for k, v in means.items() if k != "goodput")
    assert means["goodput"] <= best_fixed * 1.0


def test_lookahead_asks_only_matched_requests_and_beats_average_fill_planning():
    """With the worker reporting what prompt lookup has for the next step, no proposal is asked of a
    request that has none (requested == proposed, the policy sees fill 0 or 1), and goodput is
    faster than planning on each request's average fill."""
    from smartspec.bench.acceptance_models import with_fill

    policy = RecordingPolicy()
    bursty = with_fill(fixed(0.9), [0.3])
    workload = Workload(np.zeros(4), np.full(4, 50), np.full(4, 300))
    result = simulate(workload, policy, {}, step_model=StepModel(H100_8B), acceptance=bursty,
                      worker=WorkerSpec(max_batch_size=4, max_k=5), seed=3)
    assert result.requested.sum() == result.proposed.sum() > 0
    assert {r.fill for b in policy.batches for r in b.requests} == {0.0, 1.0}

    wl = small_workload(200, rate=0.5, seed=4)
    means = {}
    for lookahead in (True, False):
        means[lookahead] = simulate(wl, get("goodput"), get("goodput").validate({}), step_model=StepModel(CPU),
                                    acceptance=bursty, worker=WorkerSpec(lookahead=lookahead),
                                    seed=4).metrics()["mean_latency_s"]
    assert means[True] < means[False]


# --- plans one step stale: the controller round trip -----------------------------------------

def _link_run(policy, params, workload, alpha, link, *, worker=WorkerSpec(), initial_prior=None, seed=0):
    return simulate(workload, policy, params, step_model=StepModel(H100_8B), acceptance=fixed(alpha),
                    worker=worker, link=link, initial_prior=initial_prior, seed=seed)


def _same_outcomes(a, b, *, timing=True):
    fields = ["completion_tokens", "k_sum", "accepted", "tested", "proposed", "decode_steps"]
    fields += ["first_token_s", "finish_s"] if timing else []
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields) and a.steps == b.steps


def test_answer_in_hand_waits_only_for_the_report_before_last_and_never_uses_older_plans():
    from smartspec.bench.sim_link import ControllerAnswer, answer_in_hand
    from smartspec.core.acceptance import PooledPrior

    answers = [ControllerAnswer(r, arrives, PooledPrior(), {}) for r, arrives in ((3, 1.000), (4, 1.010))]
    # step 5 needs report 3, here since 1.000; report 4 lands at 1.010, not yet at 1.005
    assert answer_in_hand(answers, 5, 1.005, 1.005, 0.005) == (0.0, answers[0])
    # after an idle spell: the newest
    assert answer_in_hand(answers, 5, 1.005, 1.020, 0.005) == (0.0, answers[1])
    # step 6 needs report 4: waits 4 ms of a 5 ms deadline; with a 1 ms deadline it falls back
    wait, answer = answer_in_hand(answers, 6, 1.006, 1.006, 0.005)
    assert wait == pytest.approx(0.004) and answer is answers[1]
    assert answer_in_hand(answers, 6, 1.006, 1.006, 0.001) == (pytest.approx(0.001), None)
    # the wait starts when the report left: an idle spell since then hides (part of) it
    assert answer_in_hand(answers, 6, 1.006, 1.008, 0.005) == (pytest.approx(0.002), answers[1])
    assert answer_in_hand(answers, 6, 1.006, 1.008, 0.001) == (0.0, None)  # gave up at 1.007: fall back
    assert answer_in_hand(answers, 7, 2.0, 2.0, 0.005) == (0.0, None)  # report 5 never answered: 3, 4 too old
    assert answer_in_hand([], 0, 0.0, 0.0, 0.005) == (0.0, None)  # the first step has no plan at all


def test_stale_replan_plans_with_the_prior_one_report_old_and_the_workers_own_fresh_history():
    """A constant-k policy keeps both runs on the same path, so what the policy is shown can be
    compared step by step: the same per-request evidence, the pooled prior of one report earlier."""
    from smartspec.bench.sim_link import ControllerLinkSpec

    workload = Workload(np.zeros(6), np.full(6, 50), np.full(6, 200))
    seen = {}
    results = {}
    for mode in ("fresh", "stale-replan"):
        policy = RecordingPolicy()
        results[mode] = _link_run(policy, {}, workload, 0.7, ControllerLinkSpec(mode, round_trip_ms=0.0))
        seen[mode] = {b.step_index: b for b in policy.batches}
    assert _same_outcomes(results["fresh"], results["stale-replan"])
    fresh, stale = seen["fresh"], seen["stale-replan"]
    assert fresh.keys() == stale.keys() and min(fresh) == 1  # step 0 prefills all six
    assert stale[1].pooled_evidence == fresh[1].pooled_evidence  # step 1 waits for the first report's answer
    for s in sorted(fresh)[1:]:
        assert stale[s].pooled_evidence == fresh[s - 1].pooled_evidence
        assert [r.evidence for r in stale[s].requests] == [r.evidence for r in fresh[s].requests]
        assert [r.last_k for r in stale[s].requests] == [r.last_k for r in fresh[s].requests]
    assert any(stale[s].pooled_evidence != fresh[s].pooled_evidence for s in fresh)  # it is stale


def test_stale_replan_equals_fresh_when_the_pooled_prior_cannot_move():
    """Every proposal accepted and a prior that already says so: a one-report-old prior is the fresh
    one, so at round trip 0 goodput decides exactly as with fresh plans, new requests included."""
    from smartspec.bench.sim_link import ControllerLinkSpec
    from smartspec.core.acceptance import PooledPrior

    wl = small_workload(150, rate=20, seed=3)
    prior = PooledPrior(100.0, 100.0, 100.0, 100.0)
    goodput = get("goodput")
    runs = [_link_run(goodput, goodput.validate({}), wl, 1.0, ControllerLinkSpec(mode), initial_prior=prior)
            for mode in ("fresh", "stale-replan")]
    assert _same_outcomes(*runs)
    assert runs[1].fallback_steps == runs[1].waited_steps == 0 and runs[1].planned_steps > 0
    assert runs[1].k_sum.sum() > 0


def test_waiting_within_the_deadline_delays_steps_but_changes_no_plan():
    from smartspec.bench.sim_link import ControllerLinkSpec

    workload = Workload(np.zeros(8), np.full(8, 60), np.full(8, 150))
    goodput = get("goodput")
    near = _link_run(goodput, goodput.validate({}), workload, 0.7, ControllerLinkSpec("stale-replan", 0.0))
    far = _link_run(goodput, goodput.validate({}), workload, 0.7,
                    ControllerLinkSpec("stale-replan", round_trip_ms=30.0, deadline_ms=1000.0))
    assert _same_outcomes(near, far, timing=False)
    assert far.fallback_steps == 0 and far.waited_steps > far.steps // 3
    assert np.all(far.finish_s > near.finish_s)
    assert far.busy_step_s == pytest.approx(near.busy_step_s + far.plan_wait_s)


def test_a_round_trip_longer_than_every_step_falls_back_every_step():
    """No answer ever arrives in time: every step that needs a plan falls back, no request was ever
    planned so all run k = 0, and every step after the first waited the whole deadline: `off` plus
    the deadline per step."""
    from smartspec.bench.sim_link import ControllerLinkSpec

    workload = Workload(np.zeros(10), np.full(10, 80), np.full(10, 120))
    link = ControllerLinkSpec("stale-replan", round_trip_ms=1e6, deadline_ms=5.0)
    goodput = get("goodput")
    late = _link_run(goodput, goodput.validate({}), workload, 0.9, link)
    off = _link_run(get("off"), {}, workload, 0.9, ControllerLinkSpec())
    assert late.planned_steps > 100 and late.fallback_steps == late.planned_steps
    assert late.k_sum.sum() == 0 and _same_outcomes(late, off, timing=False)
    assert late.waited_steps == late.steps - 1
    assert late.busy_step_s == pytest.approx(off.busy_step_s + 0.005 * (late.steps - 1))
    m = late.metrics()
    assert m["fallback_share"] == 1.0 and m["mean_plan_wait_ms"] == pytest.approx(5.0 * (late.steps - 1) / late.steps)
    assert "fallback_share" not in off.metrics()  # fresh records stay as they were


def test_a_fallback_keeps_each_requests_last_k():
    from smartspec.bench.sim_link import ControllerLinkSpec, StaleLink

    link = StaleLink(ControllerLinkSpec("stale-replan", round_trip_ms=50.0, deadline_ms=0.0))
    link.report(0, 0.0, 0.010, None, np.array([1, 2, 0]), lambda prior: pytest.fail("planned"))
    last_k = np.array([0, 4, 2, 7])
    wait, ks = link.plan(2, 0.010, np.array([1, 2, 0]), last_k, None, lambda prior: pytest.fail("replanned"))
    assert wait == 0.0 and ks.tolist() == [4, 2, 0] and link.fallback_steps == 1


def test_stale_ks_with_a_fixed_k_equals_fresh_and_new_requests_lose_their_first_step():
    """A fixed k does not depend on the facts, so a plan one step late asks the same k, as long as
    no request joined since it was made (a burst prefilled at step 0). A request that joins later
    runs its first decode step at k = 0; with every proposal accepted that costs it exactly one
    step: ceil((out - 2) / 4) + 1 decode steps at fixed:3 instead of ceil((out - 1) / 4)."""
    from smartspec.bench.sim_link import ControllerLinkSpec

    fixed3 = get("fixed")
    burst = Workload(np.zeros(8), np.full(8, 60), np.full(8, 150))
    fresh, stale = (_link_run(fixed3, {"k": 3}, burst, 0.7, ControllerLinkSpec(mode)) for mode in ("fresh", "stale-ks"))
    assert _same_outcomes(fresh, stale) and stale.k_sum.sum() > 0

    wl = small_workload(120, rate=5, seed=1)
    out = wl.output_tokens.astype(np.int64)
    runs = {mode: _link_run(fixed3, {"k": 3}, wl, 1.0, ControllerLinkSpec(mode))
            for mode in ("fresh", "stale-replan", "stale-ks")}
    assert np.array_equal(runs["fresh"].decode_steps, -(-(out - 1) // 4))
    assert np.array_equal(runs["stale-replan"].decode_steps, -(-(out - 1) // 4))  # re-solved: planned at once
    assert np.array_equal(runs["stale-ks"].decode_steps[1:], 1 - (-(out[1:] - 2) // 4))  # [0] prefilled at step 0


def test_older_plan_fallback_plans_every_request_once_any_answer_has_come():
    """The what-if fallback: with plans always late (40 ms round trip, no waiting), the worker's
    last-k fallback never plans a request that joined during the lag, so it never speculates;
    re-solving the newest basis in hand, however old, plans every request."""
    from smartspec.bench.sim_link import ControllerLinkSpec

    wl = small_workload(60, rate=30, seed=2)
    goodput = get("goodput")
    runs = {fallback: _link_run(goodput, goodput.validate({}), wl, 0.8,
                                ControllerLinkSpec("stale-replan", 40.0, deadline_ms=0.0, fallback=fallback))
            for fallback in ("last-k", "older-plan")}
    for r in runs.values():
        assert r.waited_steps == 0 and r.fallback_steps > 0.9 * r.planned_steps
    assert np.any(runs["last-k"].k_sum == 0)
    assert np.all(runs["older-plan"].k_sum > 0)
    with pytest.raises(ValueError, match="older-plan"):
        ControllerLinkSpec("stale-ks", fallback="older-plan")


def test_link_spec_validates_and_matches_the_workers_defaults():
    from smartspec.bench.sim_link import ControllerLinkSpec
    from smartspec.worker.controller_link import LinkConfig

    with pytest.raises(ValueError, match="plan mode"):
        ControllerLinkSpec("late")
    with pytest.raises(ValueError, match="round_trip_ms"):
        ControllerLinkSpec("stale-replan", round_trip_ms=-1.0)
    spec, worker = ControllerLinkSpec("stale-replan"), LinkConfig("x:1")
    assert (spec.deadline_ms, spec.min_deadline_ms, spec.deadline_fraction) == (
        worker.plan_deadline_ms, worker.min_deadline_ms, worker.deadline_fraction)
    assert spec.deadline_s(0.100) == pytest.approx(0.025) and spec.deadline_s(0.008) == pytest.approx(0.005)


def test_staleness_experiment_writes_its_tables(tmp_path):
    from smartspec.bench.report import read_json
    from smartspec.bench.staleness import main

    md, js = tmp_path / "s.md", tmp_path / "s.json"
    assert main(["--requests", "30", "--rates", "4", "--alphas", "0.7", "--round-trips", "0,30",
                 "--deadline-round-trips", "30", "--json", str(js), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "## Fresh vs one-step-stale plans" in text and "older-plan" in text
    meta, records = read_json(js)
    assert meta["policy"] == "goodput" and len(records) == 3 + 1 + 4 + 3  # modes, sweep fresh, 2 x 2 sweep, 3 what-ifs
    fresh = [r for r in records if r["plan_mode"] == "fresh"]
    assert all(r["goodput_vs_fresh"] == 0.0 for r in fresh)
    late = [r for r in records if r["round_trip_ms"] == 30 and r["plan_deadline_ms"] is None]
    assert all(r["waited_share"] > 0.5 and r["goodput_vs_fresh"] < 0 for r in late)
    again = tmp_path / "again.md"
    assert main(["--from-json", str(js), "--markdown", str(again)]) == 0
    assert again.read_text() == text

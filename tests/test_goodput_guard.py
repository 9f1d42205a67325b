"""The measured-goodput guard: speculation is held off where it measured slower than plain steps."""

from __future__ import annotations

import dataclasses

from smartspec.worker.goodput_guard import GoodputGuard, GuardSettings, batch_class
from smartspec.worker.local_policy import LocalPolicyPlanner, local_policy_choice
from smartspec.worker.steps import SpeculationQuery, RequestFacts, StepFacts


def decode_step(index: int, batch: int, k: int, accepted: int, total_ms: float) -> StepFacts:
    rows = tuple(
        RequestFacts(f"r{i}", proposed_tokens=k, accepted_tokens=accepted,
                     tested_positions=min(k, accepted + 1) if k else 0, context_tokens=300 + index,
                     requested_tokens=k)
        for i in range(batch)
    )
    return StepFacts(index, rows, draft_ms=0.0, verify_ms=total_ms - 1.0, total_ms=total_ms,
                     batched_tokens=batch * (k + 1), queued_requests=0)


def test_batch_classes_group_similar_sizes():
    assert [batch_class(b) for b in (1, 2, 3, 4, 7, 8, 15, 16)] == [0, 1, 1, 2, 2, 3, 3, 4]


def test_speculation_that_measured_slower_than_plain_steps_is_held_off_then_probed():
    guard = GoodputGuard(GuardSettings(probe_every=4, probe_budget=1.0))  # budget: no stretching here
    for index in range(5):   # plain steps at batch 8: 8 tokens / 150 ms
        guard.observe(decode_step(index, 8, 0, 0, 150.0))
    for index in range(5, 10):   # speculative: 8 rows x (1 accepted + 1) = 16 tokens / 320 ms: slower
        guard.observe(decode_step(index, 8, 4, 1, 320.0))
    assert guard.backed_off_classes() == [batch_class(8)]
    allowed = [guard.allowed_k(8, 6) for _ in range(8)]
    assert allowed.count(6) == 2 and allowed.count(0) == 6      # one step in four still probes
    # Other batch sizes are judged on their own.
    assert guard.allowed_k(1, 6) == 6


def test_probes_of_a_costly_speculative_step_come_rarely_enough_to_stay_within_budget():
    """A draft model at batch 12 on the reference CPU: a speculative step took ~9x a plain one. A
    probe every 16 steps would add ~50% to the run; the guard stretches it to keep probes <= 2%."""
    guard = GoodputGuard(GuardSettings(probe_every=16, probe_budget=0.02))
    for index in range(5):
        guard.observe(decode_step(index, 12, 0, 0, 120.0))
    for index in range(5, 10):
        guard.observe(decode_step(index, 12, 8, 7, 1080.0))   # 12 x 8 tokens / 1080 ms < 12 / 120
    assert guard.backed_off_classes() == [batch_class(12)]
    record = guard.classes[batch_class(12)]
    assert guard.probe_interval(record) == 400            # (1080 / 120 - 1) / 0.02
    allowed = [guard.allowed_k(12, 8) for _ in range(399)]
    assert allowed.count(8) <= 1
    # A cheap speculative step keeps the plain interval.
    cheap = GoodputGuard(GuardSettings(probe_every=16, probe_budget=0.02))
    for index in range(5):
        cheap.observe(decode_step(index, 12, 0, 0, 120.0))
    for index in range(5, 10):
        cheap.observe(decode_step(index, 12, 1, 0, 121.0))
    assert cheap.backed_off_classes() == [batch_class(12)]
    assert cheap.probe_interval(cheap.classes[batch_class(12)]) == 16


def test_speculation_that_pays_is_never_held_off_and_recovers_after_a_bad_stretch():
    guard = GoodputGuard()
    for index in range(5):
        guard.observe(decode_step(index, 4, 0, 0, 120.0))           # 4 / 120 ms
    for index in range(5, 10):
        guard.observe(decode_step(index, 4, 4, 0, 200.0))           # 4 / 200 ms: losing
    assert guard.backed_off_classes() == [batch_class(4)]
    for index in range(10, 30):
        guard.observe(decode_step(index, 4, 4, 4, 200.0))           # 20 / 200 ms: winning again
    assert guard.backed_off_classes() == []
    assert guard.allowed_k(4, 8) == 8


def test_a_class_that_always_speculates_gets_an_occasional_plain_step_to_compare_against():
    guard = GoodputGuard()
    plain_steps = 0
    for index in range(400):
        k = guard.allowed_k(2, 4)
        plain_steps += k == 0
        guard.observe(decode_step(index, 2, k, k, 100.0 if k == 0 else 130.0))
    assert 0 < plain_steps <= 400 // 25                           # a few refreshes, never more than 4%
    assert guard.backed_off_classes() == []


def test_steps_with_prefill_do_not_count():
    guard = GoodputGuard()
    rows = (RequestFacts("p", 0, 0, 0, context_tokens=50, prefill_tokens=50),
            RequestFacts("d", 4, 0, 1, context_tokens=80, requested_tokens=4))
    for index in range(10):
        guard.observe(StepFacts(index, rows, 0.0, 900.0, 901.0, 55, 0))
    assert guard.classes == {}


def test_local_goodput_planner_backs_off_where_measured_speculation_lost():
    planner = LocalPolicyPlanner(local_policy_choice("goodput"), max_k=4)
    for index in range(5):
        planner.observe(decode_step(index, 2, 0, 0, 100.0))
    for index in range(5, 12):
        planner.observe(decode_step(index, 2, 4, 4, 1000.0))         # accepted all, yet 10x slower
    assert planner.guard.backed_off_classes() == [batch_class(2)]
    plans = [planner.plan(12 + i, [SpeculationQuery("r0", 320), SpeculationQuery("r1", 320)], 0) for i in range(15)]
    assert sum(1 for p in plans if any(p.values())) <= 1            # held off but for a probe
    # A fixed policy is the user's explicit choice: never overridden.
    fixed = LocalPolicyPlanner(local_policy_choice("fixed:3"), max_k=4)
    for index in range(12):
        fixed.observe(decode_step(index, 2, 0 if index < 5 else 4, 4 if index >= 5 else 0,
                                  100.0 if index < 5 else 1000.0))
    assert fixed.plan(12, [SpeculationQuery("r0", 320)], 0) == {"r0": 3}


def test_near_a_tie_the_guard_does_not_flap():
    """Speculative steps 1% slower, then 1% faster than plain: held off once, not resumed (the
    resume needs 3% better), so the cap does not flip with every noisy step."""
    guard = GoodputGuard()
    for index in range(5):
        guard.observe(decode_step(index, 8, 0, 0, 100.0))           # 8 tokens / 100 ms
    for index in range(5, 10):
        guard.observe(decode_step(index, 8, 2, 1, 202.0))           # 16 / 202 ms: 1% slower
    assert guard.backed_off_classes() == [batch_class(8)]
    for index in range(10, 40):
        guard.observe(decode_step(index, 8, 2, 1, 198.0))           # 16 / 198 ms: 1% faster
    assert guard.backed_off_classes() == [batch_class(8)]


def test_a_burst_where_speculation_stops_paying_is_held_off_within_a_few_of_its_steps():
    """After a long stretch where speculation won at batch 32 (code edits), a burst where it loses
    (chat) is held off after a handful of its speculative steps, not after the old record has
    decayed over a hundred steps."""
    guard = GoodputGuard()
    index = 0
    for _ in range(120):   # winning by 30%: 32 rows x 2 tokens / 230 ms vs 32 / 150 ms plain
        k = guard.allowed_k(32, 4)
        guard.observe(decode_step(index, 32, k, 1 if k else 0, 230.0 if k else 150.0))
        index += 1
    assert guard.backed_off_classes() == []
    losing_steps = 0
    while not guard.backed_off_classes():
        k = guard.allowed_k(32, 4)
        guard.observe(decode_step(index, 32, k, 0, 200.0 if k else 150.0))   # 32 tokens / 200 ms < 32 / 150
        index += 1
        losing_steps += k > 0
        assert losing_steps <= 10
    # At batch 1, one step's row is a noisy sample: its speculative record keeps a long memory.
    assert guard.speculative_decay(1) == guard.settings.decay
    assert guard.speculative_decay(32) < 0.9


def test_when_one_class_stops_paying_the_others_measure_again_before_trusting_old_records():
    """A burst's tail: speculation won at batch 16-31 earlier (code edits); now it loses at 32 and
    the guard holds 32 off. When the batch shrinks to 24, that class's old winning record is not
    trusted: it is held off after the few steps it takes to measure again."""
    guard = GoodputGuard()
    index = 0
    for batch in (24, 32):   # earlier work: 3 tokens per row for 1.3x the time of a plain step
        for _ in range(60):
            k = guard.allowed_k(batch, 4)
            guard.observe(decode_step(index, batch, k, 2 if k else 0, 4.5 * batch * (1.3 if k else 1.0)))
            index += 1
    assert guard.backed_off_classes() == []
    while batch_class(32) not in guard.backed_off_classes():   # now losing at 32
        k = guard.allowed_k(32, 4)
        guard.observe(decode_step(index, 32, k, 0, 200.0 if k else 140.0))
        index += 1
    losing_steps = 0
    while batch_class(24) not in guard.backed_off_classes():   # the tail at 24: losing too
        k = guard.allowed_k(24, 4)
        guard.observe(decode_step(index, 24, k, 0, 160.0 if k else 110.0))
        index += 1
        losing_steps += k > 0
        assert losing_steps <= 4


def test_a_losing_opening_does_not_keep_speculation_off_once_probes_win():
    """Summaries and code edits open with new text (speculation loses), then copy the prompt (it
    wins by far). Held off after the opening, the class resumes at the first probe that wins
    clearly: the losing record faded over the plain steps in between, it is not outvoted probe by
    probe (which took ~3 probes, ~75 steps at batch 12)."""
    guard = GoodputGuard()
    index = 0
    for _ in range(5):
        guard.observe(decode_step(index, 12, 0, 0, 100.0))           # 12 / 100 ms
        index += 1
    for _ in range(5):
        guard.observe(decode_step(index, 12, 3, 0, 150.0))           # 12 / 150 ms: losing
        index += 1
    assert guard.backed_off_classes() == [batch_class(12)]
    held_steps = 0
    while guard.backed_off_classes():
        k = guard.allowed_k(12, 3)
        guard.observe(decode_step(index, 12, k, k, 160.0 if k else 100.0))   # copying: 48 / 160 ms
        index += 1
        held_steps += 1
        assert held_steps <= 30, "one probe interval (stretched to ~25 steps by the probe budget)"


def test_steps_where_a_draft_model_chosen_per_request_proposed_are_not_judged():
    """A per-request choice prices its draft model by the draft's own timed calls; its first
    proposal for a request feeds it the whole context (a step many times a plain one), which must
    not hold off prompt lookup's proposals too."""
    from smartspec.v1 import common_pb2

    guard = GoodputGuard()
    for index in range(5):
        guard.observe(decode_step(index, 8, 0, 0, 100.0))
    for index in range(5, 10):
        step = decode_step(index, 8, 2, 0, 900.0)
        rows = tuple(dataclasses.replace(r, proposer_kind=common_pb2.PROPOSER_KIND_DRAFT) for r in step.requests)
        guard.observe(dataclasses.replace(step, requests=rows))
    assert guard.backed_off_classes() == []
    for index in range(10, 15):   # the same steps from prompt lookup's proposals are judged
        step = decode_step(index, 8, 2, 0, 900.0)
        rows = tuple(dataclasses.replace(r, proposer_kind=common_pb2.PROPOSER_KIND_NGRAM) for r in step.requests)
        guard.observe(dataclasses.replace(step, requests=rows))
    assert guard.backed_off_classes() == [batch_class(8)]


def speed_at(index: int, first: float, last: float, steps: int) -> float:
    """A machine whose speed drifts linearly from `first` to `last` over `steps` steps."""
    return first + (last - first) * min(index, steps) / steps


def test_a_probe_on_a_machine_that_just_got_faster_is_not_taken_for_a_win():
    """Speculation loses by 9% at every moment (16 tokens in 2.2x a plain step's time) while the
    machine speeds up 2.5x (a shared CPU whose neighbours went quiet). Compared with plain steps of
    the last hundred, each probe would look like a win; paired with the plain steps just before it,
    it is the loss it is, and speculation stays held off."""
    guard = GoodputGuard(GuardSettings(probe_every=8, probe_budget=1.0))
    for index in range(5):
        guard.observe(decode_step(index, 8, 0, 0, 100.0))
    for index in range(5, 10):
        guard.observe(decode_step(index, 8, 2, 1, 220.0))
    assert guard.backed_off_classes() == [batch_class(8)]
    probes = 0
    for index in range(10, 310):
        speed = speed_at(index - 10, 1.0, 2.5, 300)
        k = guard.allowed_k(8, 2)
        probes += k > 0
        guard.observe(decode_step(index, 8, k, 1 if k else 0, (220.0 if k else 100.0) / speed))
        assert guard.backed_off_classes() == [batch_class(8)], f"resumed at step {index}"
    assert probes >= 30   # it kept measuring


def test_speculation_that_wins_on_a_machine_slowing_down_is_not_held_off():
    """Speculation wins by 10% at every moment, in half the steps (rows with something to propose),
    while the machine slows to a quarter of its speed: against plain steps of the last hundred (faster)
    each new speculative step would look like a loss."""
    guard = GoodputGuard()
    for index in range(400):
        speed = speed_at(index, 1.0, 0.25, 200)
        k = guard.allowed_k(8, 2) if index % 2 else 0
        guard.observe(decode_step(index, 8, k, 1 if k else 0, (200.0 / 1.1 if k else 100.0) / speed))
        assert guard.backed_off_classes() == [], f"held off at step {index}"


def test_under_a_fixed_k_the_guard_measures_but_does_not_claim_to_hold_anything_off(caplog):
    """The guard keeps its records under any policy (a swap back to goodput finds them current),
    but only goodput's plans are capped, so only then may it warn that speculation is held off."""
    planner = LocalPolicyPlanner(local_policy_choice("fixed:3"), max_k=4)
    with caplog.at_level("DEBUG", logger="smartspec.worker.goodput_guard"):
        for index in range(12):
            planner.plan(index, [SpeculationQuery("r0", 320), SpeculationQuery("r1", 320)], 0)
            planner.observe(decode_step(index, 2, 0 if index < 5 else 4, 0, 100.0 if index < 5 else 1000.0))
    assert planner.guard.backed_off_classes() == [batch_class(2)]   # measured: it would hold off
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("would be held off" in r.getMessage() for r in caplog.records)
    assert planner.plan(12, [SpeculationQuery("r0", 320)], 0) == {"r0": 3}

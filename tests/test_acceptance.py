"""Acceptance estimates from tested positions, shrunk toward a pooled prior."""

from __future__ import annotations


import numpy as np
import pytest

from smartspec.core.acceptance import (
    AcceptanceState,
    OutcomeError,
    PooledPrior,
    check_outcome,
    estimate,
    positions_tested,
)


def simulate_step(rng: np.random.Generator, rate: float, k: int) -> tuple[int, int]:
    """One verification: positions accepted independently with probability `rate` until the
    first rejection. Returns (accepted, tested)."""
    accepted = 0
    while accepted < k and rng.random() < rate:
        accepted += 1
    return accepted, positions_tested(k, accepted)


def test_tested_positions_counts_the_stopping_rejection_only():
    assert positions_tested(4, 4) == 4  # all accepted: no rejection was tested
    assert positions_tested(4, 1) == 2  # one accepted, then the rejection
    assert positions_tested(4, 0) == 1
    assert positions_tested(0, 0) == 0  # no proposals, nothing tested
    assert type(positions_tested(4, 1)) is int


def test_tested_positions_of_many_rows_is_the_same_rule_per_row():
    proposed, accepted = np.array([4, 4, 4, 0, 3]), np.array([4, 1, 0, 0, 2])
    assert positions_tested(proposed, accepted).tolist() == [
        positions_tested(p, a) for p, a in zip(proposed.tolist(), accepted.tolist())] == [4, 2, 1, 0, 3]


@pytest.mark.parametrize("rate", [0.3, 0.6, 0.85])
def test_tested_position_rate_is_unbiased_where_accepted_over_proposed_is_not(rate):
    rng = np.random.default_rng(int(rate * 100))
    accepted = tested = proposed = 0
    for _ in range(20_000):
        k = int(rng.integers(1, 9))
        acc, tst = simulate_step(rng, rate, k)
        accepted, tested, proposed = accepted + acc, tested + tst, proposed + k
    assert accepted / tested == pytest.approx(rate, abs=0.01)
    naive = accepted / proposed
    assert naive < rate - 0.05  # untested positions counted as failures drag it down


def test_state_update_accumulates_tested_positions():
    rng = np.random.default_rng(7)
    state = AcceptanceState()
    accepted = tested = 0
    for _ in range(300):
        k = int(rng.integers(0, 6))
        acc, tst = simulate_step(rng, 0.7, k)
        state = state.update(k, acc, tst)
        accepted, tested = accepted + acc, tested + tst
    assert (state.accepted, state.tested, state.steps) == (accepted, tested, 300)
    # with this much evidence the prior hardly matters
    assert state.estimate(PooledPrior(accepted=1, tested=100)) == pytest.approx(0.7, abs=0.05)


def test_estimate_moves_from_prior_toward_own_rate_as_evidence_grows():
    prior = dict(prior_accepted=200.0, prior_tested=1000.0)  # pooled rate 0.2
    own_rate = 0.9
    previous_gap = None
    for tested in [0, 5, 20, 100, 1000]:
        value = estimate(own_rate * tested, tested, **prior, prior_strength=10.0)
        gap = abs(value - own_rate)
        assert 0.2 <= value <= 0.9
        if previous_gap is not None:
            assert gap < previous_gap
        previous_gap = gap
    assert estimate(0, 0, **prior, prior_strength=10.0) == pytest.approx(0.2)
    assert previous_gap < 0.01


def test_prior_strength_not_pool_size_sets_the_shrinkage():
    small_pool = estimate(9, 10, prior_accepted=1, prior_tested=10, prior_strength=10)
    huge_pool = estimate(9, 10, prior_accepted=10_000, prior_tested=100_000, prior_strength=10)
    assert small_pool == pytest.approx(huge_pool)  # same pooled rate, same weight
    assert small_pool == pytest.approx((9 + 0.1 * 10) / 20)


def test_zero_evidence_everywhere_falls_back_to_the_default_rate():
    assert estimate(0, 0, 0, 0, prior_strength=8) == 0.5
    assert estimate(0, 0, 0, 0, prior_strength=0, default_rate=0.3) == 0.3
    assert AcceptanceState().estimate() == 0.5
    # own evidence only, no prior weight: the plain rate
    assert estimate(3, 4, 0, 0, prior_strength=0) == pytest.approx(0.75)


def test_pooled_prior_follows_recent_requests():
    pool = PooledPrior()
    for _ in range(2000):
        pool = pool.update(accepted=9, tested=10, decay=0.99)  # old regime: 0.9
    assert pool.rate() == pytest.approx(0.9)
    for _ in range(300):
        pool = pool.update(accepted=2, tested=10, decay=0.99)  # new regime: 0.2
    assert pool.rate() == pytest.approx(0.2, abs=0.05)
    assert PooledPrior.from_dict(pool.to_dict()) == pool
    with pytest.raises(ValueError):
        pool.update(accepted=3, tested=2)
    with pytest.raises(ValueError):
        pool.update(accepted=0, tested=0, proposed=3, requested=2)
    with pytest.raises(ValueError):
        pool.update(accepted=1, tested=2, decay=0.0)


def test_pooled_fill_follows_recent_requests_and_defaults_to_full():
    pool = PooledPrior()
    assert pool.fill() == 1.0  # nothing asked yet: assume a proposer that fills (a draft model)
    for _ in range(500):
        pool = pool.update(accepted=0, tested=0, decay=0.99, proposed=2, requested=8)
    assert pool.fill() == pytest.approx(0.25)
    assert pool.rate() == 0.5  # acceptance evidence is separate: still none
    assert AcceptanceState().fill_estimate(pool) == pytest.approx(0.25)


def test_state_tracks_last_step_and_probing_counter():
    state = AcceptanceState().update(0, 0).update(0, 0)
    assert state.steps_since_speculation == 2 and state.last_k == 0 and not state.last_fully_accepted
    state = state.update(4, 4)
    assert state.steps_since_speculation == 0 and state.last_k == 4 and state.last_fully_accepted
    state = state.update(4, 1)
    assert not state.last_fully_accepted and (state.accepted, state.tested) == (5, 6)
    assert AcceptanceState.from_dict(state.to_dict()) == state
    # Redis hands hash fields back as strings
    as_strings = {key: str(int(value)) for key, value in state.to_dict().items()}
    assert AcceptanceState.from_dict(as_strings) == state


def test_early_stop_without_rejection_is_a_legal_outcome():
    """An accepted end-of-sequence token ends judging without a rejection: tested = accepted < k."""
    check_outcome(4, 2, 2)
    state = AcceptanceState().update(4, 2, 2)
    assert (state.accepted, state.tested, state.last_fully_accepted) == (2, 2, False)


@pytest.mark.parametrize(
    ("proposed", "accepted", "tested", "field"),
    [
        (3, 4, 4, "accepted_tokens"),
        (3, 1, 3, "tested_positions"),  # nothing after the first rejection is tested
        (3, 1, 0, "tested_positions"),  # the accepted ones were tested
        (3, 3, 4, "tested_positions"),  # nothing after the last proposal can be tested
        (0, 0, 1, "tested_positions"),
        (-1, 0, 0, "proposed_tokens"),
    ],
)
def test_impossible_outcomes_name_the_field(proposed, accepted, tested, field):
    with pytest.raises(OutcomeError) as info:
        check_outcome(proposed, accepted, tested)
    assert info.value.field == field
    with pytest.raises(OutcomeError):
        AcceptanceState().update(proposed, accepted, tested)


def test_dry_positions_count_toward_fill_not_acceptance():
    """Asked for 8, the proposer offered 3 and all were accepted; then asked for 5 and offered none.
    Acceptance counts only what was verified (3 of 3); fill counts offered per asked (3 of 13)."""
    state = AcceptanceState().update(3, 3, 3, requested=8).update(0, 0, 0, requested=5)
    assert (state.accepted, state.tested, state.proposed, state.requested) == (3, 3, 3, 13)
    assert state.steps_since_speculation == 0  # asking counts as speculating: nothing left to probe
    assert state.last_k == 5
    # no requested count (an older worker): everything offered was asked for
    assert AcceptanceState().update(3, 1, 2).requested == 3
    with pytest.raises(OutcomeError) as info:
        AcceptanceState().update(4, 1, 2, requested=3)
    assert info.value.field == "requested_tokens"
    restored = AcceptanceState.from_dict(state.to_dict())
    assert restored == state
    # a history stored before fill tracking reads as no fill evidence yet
    assert AcceptanceState.from_dict({"accepted": 2, "tested": 3}).requested == 0


def test_fill_and_acceptance_make_the_expected_tokens_match_a_bursty_proposer():
    """An all-or-nothing proposer (a long, always-right match 3 steps in 10, else nothing) at k = 8:
    with the fill rate the planner's expected tokens per step match the realised ones, where the
    acceptance rate alone (a = 1 here) would predict 9."""
    from smartspec.core.policies.optimizer import expected_tokens
    state = AcceptanceState()
    realised = []
    for step in range(100):
        offered = 8 if step % 10 < 3 else 0
        state = state.update(offered, offered, offered, requested=8)
        realised.append(offered + 1)
    a, f = state.estimate(), state.fill_estimate()
    assert a == pytest.approx(1.0, abs=0.05) and f == pytest.approx(0.3, abs=0.02)
    assert expected_tokens(a, 8, f) == pytest.approx(sum(realised) / len(realised), rel=0.05)
    assert expected_tokens(a, 8) > 8.0

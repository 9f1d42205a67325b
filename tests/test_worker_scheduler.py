"""Admission within the per-step token budget, and the k a request can actually run (no model)."""

from __future__ import annotations

import pytest

from smartspec.worker.scheduler import clamp_speculation, chunk_prefill


def test_decode_tokens_come_first_and_prefill_gets_the_rest():
    plan = chunk_prefill(token_budget=100, decode_tokens=30, remaining_prompts=[], waiting_prompts=[50, 50],
                        free_slots=4)
    assert plan.admitted == 2
    assert plan.new_chunks == (50, 20)            # the second prompt is chunked
    assert plan.prefill_tokens == 70


def test_long_prompt_is_chunked_and_continues_next_step():
    first = chunk_prefill(token_budget=64, decode_tokens=0, remaining_prompts=[], waiting_prompts=[150],
                         free_slots=1)
    assert (first.admitted, first.new_chunks) == (1, (64,))
    second = chunk_prefill(token_budget=64, decode_tokens=10, remaining_prompts=[150 - 64], waiting_prompts=[5],
                          free_slots=0)
    assert second.continuing == (54,)
    assert second.admitted == 0                   # no slot free


def test_admission_stops_without_free_slots_or_budget():
    plan = chunk_prefill(token_budget=100, decode_tokens=0, remaining_prompts=[], waiting_prompts=[10, 10, 10],
                        free_slots=2)
    assert plan.admitted == 2
    full = chunk_prefill(token_budget=100, decode_tokens=100, remaining_prompts=[], waiting_prompts=[10],
                        free_slots=5)
    assert full.admitted == 0 and full.prefill_tokens == 0


def test_older_prefills_are_served_before_new_admissions():
    plan = chunk_prefill(token_budget=100, decode_tokens=0, remaining_prompts=[80, 40], waiting_prompts=[10],
                        free_slots=3)
    assert plan.continuing == (80, 20)
    assert plan.admitted == 0


def test_budget_must_be_positive():
    with pytest.raises(ValueError):
        chunk_prefill(token_budget=0, decode_tokens=0, remaining_prompts=[], waiting_prompts=[], free_slots=1)


@pytest.mark.parametrize(
    "k, max_k, context, capacity, left, expected",
    [
        (3, 8, 10, 100, 50, 3),      # nothing limits
        (9, 8, 10, 100, 50, 8),      # worker maximum
        (5, 8, 97, 100, 50, 3),      # k + 1 positions from context - 1 must fit 100
        (5, 8, 10, 100, 3, 2),       # 3 tokens left: 2 proposals + the target's own
        (5, 8, 10, 100, 1, 0),       # last token: no speculation
        (-1, 8, 10, 100, 50, 0),
    ],
)
def test_clamp_speculation(k, max_k, context, capacity, left, expected):
    assert clamp_speculation(k, max_k=max_k, context_tokens=context, capacity=capacity, tokens_left=left) == expected


def test_similar_prompts_share_a_forward_and_very_different_ones_do_not():
    from smartspec.worker.scheduler import group_by_length

    groups = group_by_length([100, 10, 98, 12, 500])
    assert sorted(sorted(g) for g in groups) == [[0, 2], [1, 3], [4]]
    for group in group_by_length([7, 300, 30, 31, 29, 299, 1]):
        lengths = [[7, 300, 30, 31, 29, 299, 1][i] for i in group]
        assert len(lengths) * max(lengths) <= 1.25 * sum(lengths)      # padding stays bounded
    assert group_by_length([]) == []

"""SamplingParams validation and the temperature / top-k / top-p pipeline of probs_from_logits."""

from __future__ import annotations

import math

import pytest
import torch

from smartspec.worker.proposers.sampling import SamplingParams, probs_from_logits, sample


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
    ],
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_greedy_flag():
    assert SamplingParams().is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy


def _softmax(values: list[float]) -> list[float]:
    peak = max(values)
    exps = [math.exp(v - peak) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def test_temperature_matches_softmax_of_scaled_logits():
    logits = [2.0, 1.0, 0.5, -1.0]
    probs = probs_from_logits(torch.tensor(logits), SamplingParams(temperature=0.5))
    expected = _softmax([x / 0.5 for x in logits])
    assert probs.dtype == torch.float32
    assert probs.tolist() == pytest.approx(expected, rel=1e-5)


def test_tiny_temperature_approaches_greedy_without_overflow():
    logits = torch.tensor([1.0, 3.0, 2.0, -5.0])
    probs = probs_from_logits(logits, SamplingParams(temperature=1e-39))
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_greedy_gives_one_hot_of_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    probs = probs_from_logits(logits, SamplingParams())
    assert probs.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_top_k_keeps_exactly_the_k_largest_renormalised():
    # vocab order deliberately not sorted, so a mask applied in sorted order must be mapped back
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    expected = _softmax([3.0, 2.0])
    assert probs.tolist() == pytest.approx([0.0, expected[0], 0.0, expected[1], 0.0], rel=1e-5)


def test_top_p_keeps_smallest_prefix_reaching_the_mass():
    # probabilities 0.5, 0.3, 0.15, 0.05 (in a shuffled vocab order)
    base = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = base.log()
    # 0.5 < 0.7 so the 0.3 token is needed; 0.5 + 0.3 = 0.8 >= 0.7 so the rest go
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert probs.tolist() == pytest.approx([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8], rel=1e-5)
    # a mass the top token alone reaches keeps only that token
    only_top = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.4))
    assert only_top.tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])


def test_top_p_applies_after_top_k_and_temperature():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]).flip(0)  # best token is id 4
    params = SamplingParams(temperature=2.0, top_k=3, top_p=0.6)
    # by hand: scale by 1/2, keep top 3, renormalise, then the smallest prefix with mass >= 0.6
    top3 = _softmax([2.0, 1.5, 1.0])  # ids 4, 3, 2: ~[0.506, 0.307, 0.186]
    assert top3[0] < 0.6 <= top3[0] + top3[1]
    kept = top3[0] + top3[1]
    probs = probs_from_logits(logits, params)
    assert probs.tolist() == pytest.approx([0.0, 0.0, 0.0, top3[1] / kept, top3[0] / kept], rel=1e-5)


def test_batched_rows_are_independent():
    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0))  # [B, S, V]
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9)
    batched = probs_from_logits(logits, params)
    assert batched.shape == (3, 4, 50)
    for b in range(3):
        for s in range(4):
            row = probs_from_logits(logits[b, s], params)
            assert torch.allclose(batched[b, s], row)
            assert (row > 0).sum() <= 10
    assert torch.allclose(batched.sum(-1), torch.ones(3, 4))


def test_sample_is_seeded_and_follows_probs():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    draws = sample(probs.expand(20000, 4), torch.Generator().manual_seed(1))
    assert draws.shape == (20000,)
    counts = torch.bincount(draws, minlength=4).float() / 20000
    assert counts[1] == 0
    assert counts.tolist() == pytest.approx(probs.tolist(), abs=0.015)
    again = sample(probs.expand(20000, 4), torch.Generator().manual_seed(1))
    assert torch.equal(draws, again)

"""Verification is lossless: greedy keeps argmax decoding token for token, rejection sampling keeps
the target distribution (checked by a chi-square test that also catches deliberately wrong verifiers)."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smartspec.worker.proposers import Proposal, SamplingParams, probs_from_logits
from smartspec.worker.proposers.sampling import sample
from smartspec.worker.proposers.verify import greedy_verify, rejection_verify, verify_batch

V = 8


@pytest.fixture(autouse=True)
def single_thread():
    """These tests run thousands of tiny tensor ops: with intra-op threads on a busy machine the
    threads spin against each other and a tiny op takes milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits_with_argmax(argmaxes: list[int], vocab: int = V) -> torch.Tensor:
    """[len(argmaxes), vocab] logits whose row j has its maximum at argmaxes[j]."""
    logits = torch.linspace(-1.0, 0.0, vocab).repeat(len(argmaxes), 1)  # runner-up is the last id
    for row, token in enumerate(argmaxes):
        logits[row, token] = 5.0
    return logits


# ---------------------------------------------------------------- greedy, hand-built logits


def test_greedy_all_accepted_emits_bonus():
    assert greedy_verify(_logits_with_argmax([3, 1, 4, 6]), [3, 1, 4]) == (3, 6)


def test_greedy_first_rejected_emits_targets_token():
    assert greedy_verify(_logits_with_argmax([3, 1, 4, 6]), [2, 1, 4]) == (0, 3)


def test_greedy_middle_rejected_ignores_later_matches():
    # proposal 2 is wrong; proposal 3 matches the target but comes after the first rejection
    assert greedy_verify(_logits_with_argmax([3, 1, 4, 6]), [3, 5, 4]) == (1, 1)


def test_greedy_with_no_proposals_is_plain_decoding():
    assert greedy_verify(_logits_with_argmax([7]), []) == (0, 7)


def test_shape_mismatch_and_bad_token_ids_are_errors():
    with pytest.raises(ValueError, match="len\\(proposed\\)"):
        greedy_verify(_logits_with_argmax([1, 2]), [1, 2])
    with pytest.raises(ValueError, match="token ids"):
        greedy_verify(_logits_with_argmax([1, 2]), [V])
    with pytest.raises(ValueError, match="draft_probs"):
        rejection_verify(torch.full((2, V), 1.0 / V), [1], torch.full((1, V + 1), 1.0 / (V + 1)))


# ---------------------------------------------------------------- greedy on a real tiny model


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.3,  # large enough that the argmax changes from token to token
    )
    # float64: a forward over context + proposals and one over the context alone agree to the last bit
    return LlamaForCausalLM(config).double().eval()


@torch.no_grad()
def _reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([tokens])).logits  # [1, S, V]
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


@torch.no_grad()
def _speculative_greedy(model, prompt: list[int], steps: int, propose) -> tuple[list[int], int, int]:
    tokens = list(prompt)
    accepted_total = rejections = 0
    while len(tokens) - len(prompt) < steps:
        proposed = propose(tokens)
        logits = model(torch.tensor([tokens + proposed])).logits  # [1, S + n, V]
        row_logits = logits[0, len(tokens) - 1 :]  # [n + 1, V]: predictions for each proposal + bonus
        accepted, next_token = greedy_verify(row_logits, proposed)
        tokens += proposed[:accepted] + [next_token]
        accepted_total += accepted
        rejections += accepted < len(proposed)
    return tokens[len(prompt) :][:steps], accepted_total, rejections


def test_greedy_speculation_with_any_proposals_equals_greedy_decoding(tiny_llama):
    rng = random.Random(1234)
    steps = 24
    for trial in range(6):
        prompt = [rng.randrange(32) for _ in range(rng.randint(1, 8))]
        expected = _reference_greedy(tiny_llama, prompt, steps)

        def propose(tokens: list[int]) -> list[int]:
            # mix the true continuation (so some proposals are accepted) with random guesses
            k = rng.randint(0, 5)
            done = len(tokens) - len(prompt)
            truth = (expected + [0] * 8)[done : done + k]
            return [t if rng.random() < 0.7 else rng.randrange(32) for t in truth]

        got, accepted, rejections = _speculative_greedy(tiny_llama, prompt, steps, propose)
        assert got == expected, f"trial {trial}"
        assert accepted > 0 and rejections > 0, "the trial must exercise both acceptance and rejection"


# ---------------------------------------------------------------- rejection sampling keeps p


START = V  # row index of the start-of-sequence state in the transition tables


def _chain(seed: int, sharpness: float) -> torch.Tensor:
    """A Markov chain over V tokens: [V + 1, V], row `START` is the first token's distribution."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(V + 1, V, generator=g), dim=-1)


TARGET = _chain(seed=1, sharpness=1.0)
DRAFT = _chain(seed=2, sharpness=2.0)  # a different, sharper chain: far from the target
DETERMINISTIC_DRAFT = TARGET.argsort(dim=-1)[:, V // 2].tolist()  # a middling token under p


@functools.cache
def _stacked(chain: str, *states: int) -> torch.Tensor:
    """[len(states), V]: the chain's next-token distributions after each state (built once)."""
    return torch.stack([{"target": TARGET, "draft": DRAFT}[chain][s] for s in states])


class DraftDraws:
    """Independent draws from DRAFT[state], drawn in bulk per state (the same law as one at a time)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.pools: dict[int, list[int]] = {}

    def __call__(self, state: int) -> int:
        pool = self.pools.get(state)
        if not pool:
            pool = self.pools[state] = sample(DRAFT[state].expand(4096, V), self.generator).tolist()
        return pool.pop()


def _generate_two(verifier, deterministic: bool, draws: DraftDraws, generator: torch.Generator) -> tuple[int, int]:
    """Speculate k = 2 from the draft chain, verify against the target chain, until 2 tokens exist."""
    out: list[int] = []
    while len(out) < 2:
        prev = out[-1] if out else START
        if deterministic:
            x0 = DETERMINISTIC_DRAFT[prev]
            x1 = DETERMINISTIC_DRAFT[x0]
            draft_probs = None
        else:
            x0 = draws(prev)
            x1 = draws(x0)
            draft_probs = _stacked("draft", prev, x0)  # [2, V]
        target_probs = _stacked("target", prev, x0, x1)  # [3, V]: p conditioned on the proposals
        accepted, next_token = verifier(target_probs, [x0, x1], draft_probs, generator)
        out += [x0, x1][:accepted] + [next_token]
    return out[0], out[1]


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    statistic = ((counts.double() - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(probs.numel() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))  # chi-square survival function


def _marginal_p_values(verifier, deterministic: bool, trials: int = 20_000) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(99)
    draws = DraftDraws(torch.Generator().manual_seed(98))
    first = torch.zeros(V)
    second = torch.zeros(V)
    for _ in range(trials):
        y0, y1 = _generate_two(verifier, deterministic, draws, generator)
        first[y0] += 1
        second[y1] += 1
    p_first = TARGET[START]  # [V]
    p_second = p_first @ TARGET[:V]  # [V]: sum_a p(a) p(. | a)
    return _chi_square_p_value(first, p_first), _chi_square_p_value(second, p_second)


def _accept_always(target_probs, proposed, draft_probs, generator):
    """WRONG: keeps every proposal, so accepted tokens follow the draft."""
    return len(proposed), int(sample(target_probs[len(proposed)], generator))


def _resample_target_on_rejection(target_probs, proposed, draft_probs, generator):
    """WRONG (subtle): correct accept test, but redraws from p instead of the residual max(0, p - q)."""
    n = len(proposed)
    for j, token in enumerate(proposed):
        q = 1.0 if draft_probs is None else float(draft_probs[j, token])
        if float(torch.rand((), generator=generator)) >= float(target_probs[j, token]) / q:
            return j, int(sample(target_probs[j], generator))
    return n, int(sample(target_probs[n], generator))


@pytest.mark.parametrize("deterministic", [False, True], ids=["draft-probs", "deterministic"])
def test_rejection_sampling_keeps_target_distribution(deterministic):
    p_first, p_second = _marginal_p_values(rejection_verify, deterministic)
    assert p_first > 1e-3 and p_second > 1e-3, (p_first, p_second)


@pytest.mark.parametrize("wrong_verifier", [_accept_always, _resample_target_on_rejection])
@pytest.mark.parametrize("deterministic", [False, True], ids=["draft-probs", "deterministic"])
def test_chi_square_detects_wrong_verifiers(wrong_verifier, deterministic):
    # negative control: the same test, fewer trials, must reject a verifier known to be biased
    p_first, p_second = _marginal_p_values(wrong_verifier, deterministic, trials=5_000)
    assert min(p_first, p_second) < 1e-3, (p_first, p_second)


def test_identical_draft_is_always_accepted():
    generator = torch.Generator().manual_seed(3)
    probs = torch.stack([TARGET[START], TARGET[2], TARGET[5], TARGET[1]])  # [4, V]
    for _ in range(200):
        proposed = [int(sample(probs[j], generator)) for j in range(3)]
        accepted, _ = rejection_verify(probs, proposed, probs[:3].clone(), generator)
        assert accepted == 3


def test_token_the_target_cannot_produce_is_never_accepted_nor_redrawn():
    target = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])  # [2, 4]
    generator = torch.Generator().manual_seed(4)
    for draft_probs in (None, torch.tensor([[0.7, 0.1, 0.1, 0.1]])):
        for _ in range(200):
            accepted, token = rejection_verify(target, [0], draft_probs, generator)
            assert accepted == 0 and token in (1, 2)


# ---------------------------------------------------------------- batched helper


def test_verify_batch_rows_offsets_and_tested_positions():
    vocab = 6
    logits = torch.full((4, 5, vocab), -3.0)  # [B, S, V]
    # row 0: greedy, all 3 accepted, bonus 5
    for s, token in enumerate([1, 2, 3, 5]):
        logits[0, s, token] = 3.0
    # row 1: greedy, logits start at position 2 (e.g. after a prefill chunk); second proposal rejected
    for s, token in enumerate([4, 0, 2]):
        logits[1, 2 + s, token] = 3.0
    # row 2: greedy, nothing proposed
    logits[2, 0, 3] = 3.0
    # row 3: sampled with top_k = 1, so the target is one-hot: proposal 4 is impossible -> rejected
    logits[3, 0, 2] = 3.0
    proposals = [Proposal([1, 2, 3]), Proposal([4, 1]), Proposal([]), Proposal([4, 4])]
    params = [SamplingParams()] * 3 + [SamplingParams(temperature=1.0, top_k=1)]
    generators = [None, None, None, torch.Generator().manual_seed(0)]
    results = verify_batch(logits, proposals, params, generators, first_logit_index=[0, 2, 0, 0])
    assert [r.tokens for r in results] == [[1, 2, 3, 5], [4, 0], [3], [2]]
    assert [r.num_accepted for r in results] == [3, 1, 0, 0]
    assert [r.tested_positions for r in results] == [3, 2, 0, 1]


def test_verify_batch_sampled_rows_use_draft_probs():
    # target p = draft q on every row: rejection sampling must accept everything
    logits = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(5))  # [B, S, V]
    params = SamplingParams(temperature=0.9, top_p=0.95)
    generators = [torch.Generator().manual_seed(6), torch.Generator().manual_seed(7)]
    proposals = []
    for row in range(2):
        q = probs_from_logits(logits[row, :3], params)  # [3, V]
        tokens = [int(sample(q[j], generators[row])) for j in range(3)]
        proposals.append(Proposal(tokens, q))
    results = verify_batch(logits, proposals, [params, params], generators)
    for proposal, result in zip(proposals, results):
        assert result.num_accepted == 3 and result.tested_positions == 3
        assert result.tokens[:3] == proposal.tokens


def test_verify_batch_checks_lengths():
    with pytest.raises(ValueError, match="one proposal"):
        verify_batch(torch.zeros(2, 3, V), [Proposal([])], [SamplingParams()], [None])
    with pytest.raises(ValueError, match="outside"):
        verify_batch(torch.zeros(1, 2, V), [Proposal([1, 2])], [SamplingParams()], [None])

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
from smartspec.worker.proposers.verify import RowVerification, verify_packed
from smartspec.worker.proposers.verify_device import packed_verdicts
from smartspec.worker.proposers.verify_layout import draw_uniforms, lay_out_verification
from verify_reference import greedy_verify, rejection_verify, verify_batch

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


# ---------------------------------------------------------------- verify_packed: the whole step in one pass


def _pack(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-row [n_i + 1, V] logits -> packed [N, V], as forward_step(logits_rows="packed") returns them."""
    return torch.cat(rows)


def _ragged_greedy_rows(generator: torch.Generator, vocab: int, lengths: list[int]):
    """Random logits per row and proposals that are all accepted, rejected at a random place, or random."""
    rows, proposals = [], []
    for row, n in enumerate(lengths):
        logits = torch.randn(n + 1, vocab, generator=generator)  # [n + 1, V]
        argmax = logits.argmax(dim=-1).tolist()
        kind = row % 3
        if kind == 0:  # the target's own chain: all n accepted, then the bonus
            tokens = argmax[:n]
        elif kind == 1 and n:  # right up to a random position, then wrong
            cut = int(torch.randint(n, (), generator=generator))
            tokens = argmax[:cut] + [(argmax[cut] + 1) % vocab] + argmax[cut + 1 : n]
        else:  # random guesses
            tokens = torch.randint(vocab, (n,), generator=generator).tolist()
        rows.append(logits)
        proposals.append(Proposal(tokens))
    return rows, proposals


@pytest.mark.parametrize("seed", range(5))
def test_verify_packed_greedy_equals_greedy_verify_row_by_row(seed):
    generator = torch.Generator().manual_seed(seed)
    vocab = 37
    lengths = [0, 3, 5, 0, 1, 4, 2, 0, 6, 3, 1, 5]  # ragged, with n = 0 rows
    rows, proposals = _ragged_greedy_rows(generator, vocab, lengths)
    got = verify_packed(_pack(rows), proposals, [SamplingParams()] * len(rows), [None] * len(rows))
    kinds_seen = set()
    for logits, proposal, result in zip(rows, proposals, got):
        n = len(proposal.tokens)
        accepted, next_token = greedy_verify(logits, proposal.tokens)
        assert result.num_accepted == accepted
        assert result.tokens == proposal.tokens[:accepted] + [next_token]
        assert result.tested_positions == accepted + (accepted < n)
        kinds_seen.add("none" if n == 0 else "all" if accepted == n else "rejected")
    assert kinds_seen == {"none", "all", "rejected"}


def test_verify_packed_greedy_rows_are_unaffected_by_sampled_neighbours():
    generator = torch.Generator().manual_seed(11)
    vocab = 29
    lengths = [2, 0, 4, 3, 1, 5, 0, 2]
    rows, proposals = _ragged_greedy_rows(generator, vocab, lengths)
    params = [SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(),
              SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(top_k=3),  # greedy too: top-k does not move the argmax
              SamplingParams(temperature=0.7), SamplingParams(temperature=0.9, top_p=0.8), SamplingParams()]
    generators = [None if p.is_greedy else torch.Generator().manual_seed(row) for row, p in enumerate(params)]
    got = verify_packed(_pack(rows), proposals, params, generators)
    for logits, proposal, p, result in zip(rows, proposals, params, got):
        assert 1 <= len(result.tokens) <= len(proposal.tokens) + 1
        assert result.tokens[:-1] == proposal.tokens[: result.num_accepted]
        if p.is_greedy:
            accepted, next_token = greedy_verify(logits, proposal.tokens)
            assert (result.num_accepted, result.tokens[-1]) == (accepted, next_token)
        else:  # the final token is one the row's target distribution can produce
            probs = probs_from_logits(logits[result.num_accepted], p)
            assert probs[result.tokens[-1]] > 0


def test_verify_packed_checks_its_input():
    with pytest.raises(ValueError, match="sum"):
        verify_packed(torch.zeros(4, V), [Proposal([1]), Proposal([])], [SamplingParams()] * 2, [None] * 2)
    with pytest.raises(ValueError, match="token ids"):
        verify_packed(torch.zeros(2, V), [Proposal([V])], [SamplingParams()], [None])
    with pytest.raises(ValueError, match="draft_probs"):
        verify_packed(torch.zeros(2, V), [Proposal([1], torch.full((1, V + 1), 0.1))],
                      [SamplingParams(temperature=1.0)], [None])
    with pytest.raises(ValueError, match="one proposal"):
        verify_packed(torch.zeros(2, V), [Proposal([1])], [], [None])
    assert verify_packed(torch.zeros(0, V), [], [], []) == []


def test_verify_packed_seeded_row_repeats_whatever_its_neighbours():
    """A sampled request's verdict depends on its logits and its own generator only."""
    vocab = 16
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(8))  # [n + 1, V], n = 3
    params = SamplingParams(temperature=1.2)
    draft = probs_from_logits(torch.randn(3, vocab, generator=torch.Generator().manual_seed(9)), params)
    ours = Proposal([2, 7, 7], draft)

    def run(neighbours: int, ours_at: int) -> list[RowVerification]:
        rows, proposals, params_, generators = [], [], [], []
        for i in range(neighbours):
            rows.append(torch.randn(3, vocab, generator=torch.Generator().manual_seed(100 + i)))
            proposals.append(Proposal([i % vocab, 1]))
            params_.append(SamplingParams(temperature=0.5 + 0.25 * i) if i % 2 else SamplingParams())
            generators.append(torch.Generator().manual_seed(200 + i) if i % 2 else None)
        rows.insert(ours_at, logits)
        proposals.insert(ours_at, ours)
        params_.insert(ours_at, params)
        generators.insert(ours_at, torch.Generator().manual_seed(42))
        results = []
        for _ in range(5):  # five steps in a row: the generator's stream advances identically
            results.append(verify_packed(_pack(rows), proposals, params_, generators)[ours_at])
        return results

    alone = run(0, 0)
    assert run(3, 1) == alone
    assert run(6, 6) == alone
    assert len({(r.num_accepted, tuple(r.tokens)) for r in alone}) > 1, "the draws must differ from step to step"


LOG_TARGET = TARGET.log()  # [V + 1, V]: logits whose softmax at temperature 1 is the target chain


def _target_law(params: SamplingParams) -> torch.Tensor:
    """[V + 1, V]: the chain the target follows under `params` (temperature, top-k, top-p on LOG_TARGET)."""
    return probs_from_logits(LOG_TARGET.double(), params).double()


# Rows of one step, interleaved: greedy, and sampled with different temperatures / truncations, with
# deterministic (prompt lookup) proposals or proposals drawn from a draft model's probs.
BATCH_KINDS = [
    ("greedy", SamplingParams(), True),
    ("t1.0-draft", SamplingParams(temperature=1.0), False),
    ("t0.6-lookup", SamplingParams(temperature=0.6), True),
    ("t1.4-topk5-draft", SamplingParams(temperature=1.4, top_k=5), False),
    ("t0.8-topp0.9-lookup", SamplingParams(temperature=0.8, top_p=0.9), True),
]


def _batched_two_token_runs(trials_per_kind: int, batch_rows: int = 2_000) -> dict[str, list[tuple[int, int]]]:
    """Generate two tokens per trial, speculating a random k in 0..3 per step; every step verifies all
    active trials of a batch (kinds interleaved) in ONE verify_packed call."""
    rng = random.Random(5)
    draws = DraftDraws(torch.Generator().manual_seed(97))
    kinds = [BATCH_KINDS[i % len(BATCH_KINDS)] for i in range(trials_per_kind * len(BATCH_KINDS))]
    greedy_chain = TARGET.argmax(dim=-1).tolist()
    outputs: dict[str, list[tuple[int, int]]] = {name: [] for name, _, _ in BATCH_KINDS}
    for first in range(0, len(kinds), batch_rows):
        batch = kinds[first : first + batch_rows]
        generators = [torch.Generator().manual_seed(first + i) for i in range(len(batch))]
        outs: list[list[int]] = [[] for _ in batch]
        while True:
            active = [i for i in range(len(batch)) if len(outs[i]) < 2]
            if not active:
                break
            states, proposals = [], []
            for i in active:
                _, params, lookup = batch[i]
                prev = outs[i][-1] if outs[i] else START
                chain, k = [prev], rng.randint(0, 3)
                for _ in range(k):
                    if params.is_greedy and rng.random() < 0.5:
                        chain.append(greedy_chain[chain[-1]])  # right guesses too, so greedy accepts some
                    else:
                        chain.append(DETERMINISTIC_DRAFT[chain[-1]] if lookup else draws(chain[-1]))
                probs = None if lookup else DRAFT[chain[:-1]]  # [k, V]: q_j = DRAFT[state before x_j]
                states += chain
                proposals.append(Proposal(chain[1:], probs))
            logits = LOG_TARGET[states]  # [N, V] packed: row i's k_i + 1 slots after row i-1's
            verdicts = verify_packed(logits, proposals, [batch[i][1] for i in active], [generators[i] for i in active])
            for i, verdict in zip(active, verdicts):
                outs[i] += verdict.tokens
        for (name, _, _), out in zip(batch, outs):
            outputs[name].append((out[0], out[1]))
    return outputs


@functools.cache
def _batched_runs() -> dict[str, list[tuple[int, int]]]:
    return _batched_two_token_runs(trials_per_kind=12_000)


def _counts(pairs: list[tuple[int, int]], position: int) -> torch.Tensor:
    return torch.bincount(torch.tensor([pair[position] for pair in pairs]), minlength=V).double()


def test_verify_packed_greedy_rows_of_a_mixed_batch_decode_greedily():
    greedy_chain = TARGET.argmax(dim=-1).tolist()
    expected = (greedy_chain[START], greedy_chain[greedy_chain[START]])
    assert set(_batched_runs()["greedy"]) == {expected}


@pytest.mark.parametrize("kind", [name for name, params, _ in BATCH_KINDS if not params.is_greedy])
def test_verify_packed_keeps_each_rows_target_distribution(kind):
    params = {name: p for name, p, _ in BATCH_KINDS}[kind]
    pairs = _batched_runs()[kind]
    law = _target_law(params)  # [V + 1, V]
    p_first = law[START]  # [V]
    p_second = p_first @ law[:V]  # [V]: sum_a p(a) p(. | a)
    support_first, support_second = p_first > 0, p_second > 0
    first, second = _counts(pairs, 0), _counts(pairs, 1)
    # truncation (top-k / top-p) zeroes tokens: they must never appear; chi-square over the rest
    assert first[~support_first].sum() == 0 and second[~support_second].sum() == 0
    p_values = (_chi_square_p_value(first[support_first], p_first[support_first]),
                _chi_square_p_value(second[support_second], p_second[support_second]))
    assert min(p_values) > 1e-3, p_values


def test_batched_chi_square_tells_temperatures_apart():
    # negative control: the t0.6 rows' counts must NOT fit the temperature-1 law
    pairs = _batched_runs()["t0.6-lookup"]
    p_first = _target_law(SamplingParams(temperature=1.0))[START]
    assert _chi_square_p_value(_counts(pairs, 0), p_first) < 1e-3


# ---------------------------------------------------------------- one host synchronisation per step


def _mixed_step(vocab: int = 50):
    """One step's inputs: greedy and sampled rows, lookup and draft proposals, ragged n (0 included)."""
    generator = torch.Generator().manual_seed(21)
    lengths = [3, 0, 4, 2, 1, 0, 5]
    rows = [torch.randn(n + 1, vocab, generator=generator) for n in lengths]
    params = [SamplingParams(), SamplingParams(temperature=0.8), SamplingParams(temperature=1.1, top_p=0.9),
              SamplingParams(), SamplingParams(temperature=0.8), SamplingParams(temperature=1.1, top_p=0.9),
              SamplingParams(temperature=0.5, top_k=7)]
    proposals = []
    for n, p in zip(lengths, params):
        tokens = torch.randint(vocab, (n,), generator=generator).tolist()
        draft = None if p.is_greedy or n % 2 else torch.softmax(torch.randn(n, vocab, generator=generator), -1)
        proposals.append(Proposal(tokens, draft))
    generators = [None if p.is_greedy else torch.Generator().manual_seed(row) for row, p in enumerate(params)]
    return _pack(rows), proposals, params, generators


def test_packed_verdicts_read_nothing_back_from_the_device():
    """The device half runs on 'meta' tensors, which hold no values: any .item(), .tolist(), .cpu(),
    int(), bool() or data-dependent shape (nonzero, boolean masks) on them raises. So finishing there
    proves verify_packed's one read (of this result) is its only host synchronisation."""
    packed, proposals, params, generators = _mixed_step()
    plan = lay_out_verification(packed.shape, proposals, params)
    uniforms = draw_uniforms(plan, generators)
    verdicts = packed_verdicts(packed.to("meta"), plan, uniforms, [p.probs for p in proposals])
    assert verdicts.device.type == "meta" and tuple(verdicts.shape) == (2, len(proposals))


def test_verify_packed_reads_the_device_once(monkeypatch):
    packed, proposals, params, generators = _mixed_step()
    calls = {"cpu": 0, "item": 0}
    for name in calls:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    results = verify_packed(packed, proposals, params, generators)
    assert calls == {"cpu": 1, "item": 0}
    assert len(results) == len(proposals)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sync debug mode)")
def test_verify_packed_device_half_does_not_synchronise_cuda():
    packed, proposals, params, generators = _mixed_step()
    packed = packed.cuda()
    plan = lay_out_verification(packed.shape, proposals, params)
    uniforms = draw_uniforms(plan, generators)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        verdicts = packed_verdicts(packed, plan, uniforms, [p.probs for p in proposals])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_results = verify_packed(packed.cpu(), proposals, params,
                                [None if g is None else torch.Generator().manual_seed(row)
                                 for row, g in enumerate(generators)])
    accepted, tokens = verdicts.cpu().tolist()
    by_row = {row: (accepted[col], tokens[col]) for col, row in enumerate(plan.order)}
    for row, result in enumerate(cpu_results):  # greedy rows agree exactly across devices
        if params[row].is_greedy:
            assert by_row[row] == (result.num_accepted, result.tokens[-1])

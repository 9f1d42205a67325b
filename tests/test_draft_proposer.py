"""Draft-model proposer on a tiny random Llama built with the model runtime: its proposals equal the
draft's own plain greedy decoding, it catches up after rollbacks feeding only what changed, and
it drafts with one batched forward per depth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smartspec.v1 import common_pb2
from smartspec.worker.model import LlamaForCausal, LoadedModel, ModelConfig
from smartspec.worker.proposers import (
    ProposalRequest,
    SamplingParams,
    make_proposer,
    probs_from_logits,
)
from smartspec.worker.proposers.draft import DraftModelProposer
from verify_reference import greedy_verify

VOCAB = 48
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def tiny_draft() -> LoadedModel:
    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    # float64 weights: padded, batched and cached forwards agree with the plain one to the last bit
    module = LlamaForCausal(config).double().eval()
    return LoadedModel(module=module, tokenizer=None, config=config, name="tiny-random", path=Path("."))


def _plain_logits(model: LoadedModel, tokens: list[int]) -> torch.Tensor:
    """Next-token logits [V] from a fresh cache and the whole sequence in one forward (no reuse)."""
    cache = model.module.allocate_cache(1, len(tokens))
    logits = model.module.forward_step(
        cache, torch.tensor([tokens]), torch.tensor([0]), torch.tensor([0]), torch.tensor([len(tokens)])
    )  # [1, S, V]
    return logits[0, -1]


def _plain_greedy(model: LoadedModel, tokens: list[int], k: int) -> list[int]:
    out: list[int] = []
    for _ in range(k):
        out.append(int(_plain_logits(model, tokens + out).argmax()))
    return out


class ForwardLog:
    """Wraps the real forward_step to record each call's batch size and query lengths."""

    def __init__(self, module: LlamaForCausal) -> None:
        self.calls: list[list[int]] = []
        self._real = module.forward_step

    def __call__(self, cache, input_ids, slots, starts, lengths, **kwargs):
        self.calls.append(lengths.tolist())
        return self._real(cache, input_ids, slots, starts, lengths, **kwargs)


@pytest.fixture
def logged(tiny_draft, monkeypatch) -> ForwardLog:
    log = ForwardLog(tiny_draft.module)
    monkeypatch.setattr(tiny_draft.module, "forward_step", log)
    return log


def _request(seq_id, tokens, k, sampling=GREEDY, generator=None):
    return ProposalRequest(seq_id, list(tokens), k, sampling, generator)


def test_greedy_proposals_equal_plain_greedy_decoding(tiny_draft, logged):
    proposer = DraftModelProposer(tiny_draft, max_slots=4, max_tokens=64)
    contexts = {"a": [3, 1, 4, 1, 5], "b": [2, 7], "c": list(range(40, 48)) + list(range(20)), "d": [9, 9, 9]}
    ks = {"a": 3, "b": 1, "c": 5, "d": 0}
    proposals = proposer.propose([_request(s, contexts[s], ks[s]) for s in contexts])
    calls = list(logged.calls)
    for seq_id, proposal in zip(contexts, proposals):
        assert proposal.tokens == _plain_greedy(tiny_draft, contexts[seq_id], ks[seq_id]), seq_id
        assert proposal.probs is None
    # "c" (28 tokens, a new prompt) is prefilled alone first; then one batched forward per depth,
    # rows leaving as they reach k: depth 1 {a, b, c}, depth 2-3 {a, c}, depth 4-5 {c}
    assert calls == [[27], [5, 2, 1], [1, 1], [1, 1], [1], [1]]


def test_catches_up_after_rollback_feeding_only_the_changed_tail(tiny_draft, logged):
    proposer = DraftModelProposer(tiny_draft, max_slots=2, max_tokens=64)
    context = [5, 17, 2, 33, 8]
    first = proposer.propose([_request("r", context, 4)])[0].tokens
    # the target kept 1 proposal and then emitted its own token (not the draft's second guess)
    target_token = (first[1] + 1) % VOCAB
    context = context + [first[0], target_token]
    logged.calls.clear()
    second = proposer.propose([_request("r", context, 3)])[0].tokens
    # the cache still held context + first[0]: only the target's token is fed, then 2 more depths
    assert logged.calls == [[1], [1], [1]]
    assert second == _plain_greedy(tiny_draft, context, 3)

    # all proposals accepted + bonus: the last draft token was never fed, so two tokens are
    context = context + second + [11]
    logged.calls.clear()
    third = proposer.propose([_request("r", context, 2)])[0].tokens
    assert logged.calls[0] == [2]
    assert third == _plain_greedy(tiny_draft, context, 2)

    # a history that diverges early (same seq_id reused): the common prefix is kept, the rest refed
    diverged = context[:3] + [1, 2]
    logged.calls.clear()
    proposal = proposer.propose([_request("r", diverged, 2)])[0]
    assert logged.calls[0] == [2]
    assert proposal.tokens == _plain_greedy(tiny_draft, diverged, 2)

    # asking again with nothing new re-feeds just the last token (its logits start the draft)
    logged.calls.clear()
    proposal = proposer.propose([_request("r", diverged, 2)])[0]
    assert logged.calls[0] == [1]
    assert proposal.tokens == _plain_greedy(tiny_draft, diverged, 2)


def test_sampled_proposals_carry_the_drafts_distribution(tiny_draft):
    proposer = DraftModelProposer(tiny_draft, max_slots=2, max_tokens=64)
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9)
    context = [4, 8, 15, 16, 23, 42]
    proposal = proposer.propose([_request("s", context, 4, params, torch.Generator().manual_seed(1))])[0]
    assert len(proposal.tokens) == 4 and proposal.probs.shape == (4, VOCAB)
    for j, token in enumerate(proposal.tokens):
        expected = probs_from_logits(_plain_logits(tiny_draft, context + proposal.tokens[:j]), params)
        assert torch.allclose(proposal.probs[j], expected, atol=1e-6)
        assert proposal.probs[j, token] > 0
    # the request's generator drives the draws: same seed, same proposal (in a fresh proposer)
    again = DraftModelProposer(tiny_draft, max_slots=1, max_tokens=64).propose(
        [_request("s", context, 4, params, torch.Generator().manual_seed(1))]
    )[0]
    assert again.tokens == proposal.tokens


def test_mixed_greedy_and_sampled_rows_in_one_batch(tiny_draft):
    proposer = DraftModelProposer(tiny_draft, max_slots=2, max_tokens=64)
    sampled = _request("s", [1, 2, 3], 3, SamplingParams(temperature=1.0), torch.Generator().manual_seed(2))
    greedy = _request("g", [3, 2, 1], 3)
    out_sampled, out_greedy = proposer.propose([sampled, greedy])
    assert out_greedy.tokens == _plain_greedy(tiny_draft, [3, 2, 1], 3) and out_greedy.probs is None
    assert out_sampled.probs.shape == (3, VOCAB)


def test_slots_are_bounded_and_released(tiny_draft):
    proposer = DraftModelProposer(tiny_draft, max_slots=2, max_tokens=32)
    proposer.propose([_request("a", [1, 2], 1), _request("b", [3, 4], 1)])
    with pytest.raises(RuntimeError, match="no free slot"):
        proposer.propose([_request("c", [5, 6], 1)])
    proposer.release("a")
    (proposal,) = proposer.propose([_request("c", [5, 6], 2)])
    assert proposal.tokens == _plain_greedy(tiny_draft, [5, 6], 2)
    # "b" kept its slot and its cache across the other requests' steps
    (proposal,) = proposer.propose([_request("b", [3, 4, 7], 2)])
    assert proposal.tokens == _plain_greedy(tiny_draft, [3, 4, 7], 2)


def test_k_is_clamped_to_the_cache_and_bad_input_is_rejected(tiny_draft):
    proposer = DraftModelProposer(tiny_draft, max_slots=1, max_tokens=10)
    context = [1, 2, 3, 4, 5, 6, 7, 8]
    # feeding drafts 1..k-1 needs positions up to len + k - 2 <= 9, so k <= 3
    (proposal,) = proposer.propose([_request("r", context, 6)])
    assert proposal.tokens == _plain_greedy(tiny_draft, context, 3)
    with pytest.raises(ValueError, match="exceeds the draft cache"):
        proposer.propose([_request("r", list(range(11)), 1)])
    with pytest.raises(ValueError, match="empty"):
        proposer.propose([_request("r", [], 1)])


def test_registry_builds_a_draft_proposer(tiny_draft):
    proposer = make_proposer("draft", loaded_model=tiny_draft, max_slots=1, max_tokens=16)
    assert isinstance(proposer, DraftModelProposer)
    assert proposer.kind == common_pb2.PROPOSER_KIND_DRAFT


def test_common_prefix_length_matches_a_plain_scan():
    import random

    from smartspec.worker.proposers.draft import _common_prefix_length

    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.randrange(3) for _ in range(rng.randint(0, 40))]
        b = a[: rng.randint(0, len(a))] + [rng.randrange(3) for _ in range(rng.randint(0, 5))]
        scan = 0
        while scan < min(len(a), len(b)) and a[scan] == b[scan]:
            scan += 1
        assert _common_prefix_length(a, b) == _common_prefix_length(b, a) == scan


# ---------------------------------------------------------------- real model, end to end


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    from smartspec.worker.model import load_model

    return load_model()


def _target_greedy(model: LoadedModel, prompt: list[int], steps: int) -> list[int]:
    """Plain decoding: one token per forward, through the target's own cache."""
    cache = model.module.allocate_cache(1, len(prompt) + steps)
    tokens, fed = list(prompt), 0
    while len(tokens) < len(prompt) + steps:
        new = tokens[fed:]
        logits = model.module.forward_step(cache, torch.tensor([new]), torch.tensor([0]), torch.tensor([fed]),
                                           torch.tensor([len(new)]), logits_rows="last")  # [1, 1, V]
        fed = len(tokens)
        tokens.append(int(logits[0, 0].argmax()))
    return tokens[len(prompt):]


@pytest.mark.slow
def test_speculative_greedy_with_real_draft_matches_target_and_is_accepted(smollm2):
    """SmolLM2 drafting for itself in a batch of two: output equals plain greedy decoding, and the
    proposals are almost all accepted (a draft that lost track of its context would be rejected)."""
    tokenizer = smollm2.tokenizer
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("def fibonacci(n):\n   ")]
    steps, k_of = 10, [3, 2]
    expected = [_target_greedy(smollm2, p, steps) for p in prompts]

    proposer = DraftModelProposer(smollm2, max_slots=2, max_tokens=64)
    cache = smollm2.module.allocate_cache(2, 64)
    contexts = [list(p) for p in prompts]
    cached = [len(p) - 1 for p in prompts]  # target K/V written for all but each context's last token
    for slot, prompt in enumerate(prompts):  # prefill the target
        smollm2.module.forward_step(cache, torch.tensor([prompt[:-1]]), torch.tensor([slot]), torch.tensor([0]),
                                    torch.tensor([len(prompt) - 1]), logits_rows="last")
    accepted = tested = 0
    while any(len(c) - len(p) < steps for c, p in zip(contexts, prompts)):
        asks = [_request(str(i), c, k_of[i]) for i, c in enumerate(contexts)]
        proposals = proposer.propose(asks)
        rows = [[c[-1]] + proposal.tokens for c, proposal in zip(contexts, proposals)]
        width = max(map(len, rows))
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])  # [2, S] right-padded
        logits = smollm2.module.forward_step(cache, input_ids, torch.tensor([0, 1]), torch.tensor(cached),
                                             torch.tensor([len(r) for r in rows]))  # [2, S, V]
        for i, proposal in enumerate(proposals):
            n = len(proposal.tokens)
            num_accepted, next_token = greedy_verify(logits[i, : n + 1], proposal.tokens)
            contexts[i] += proposal.tokens[:num_accepted] + [next_token]
            cached[i] += 1 + num_accepted
            accepted += num_accepted
            tested += num_accepted + (num_accepted < n)
    for context, prompt, want in zip(contexts, prompts, expected):
        assert context[len(prompt):][:steps] == want
    assert tested > 0 and accepted / tested > 0.9, (accepted, tested)

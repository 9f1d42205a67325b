"""Draft-model proposer on a tiny random Llama built with the model runtime: its proposals equal the
draft's own plain greedy decoding, it catches up after rollbacks feeding only what changed, and
it drafts with one batched forward per depth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smartspec.v1 import common_pb2
from smartspec.worker.model import LlamaForCausal, LoadedModel, ModelConfig
from smartspec.worker.proposers import ProposalRequest, SamplingParams, make_proposer, probs_from_logits
from smartspec.worker.proposers.draft import DraftModelProposer

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

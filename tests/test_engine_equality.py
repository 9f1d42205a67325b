"""Greedy speculative output equals plain greedy decoding, token for token (real SmolLM2 model).

Every proposer (prompt lookup, suffix decoding, draft model) under every kind of plan (fixed k = 1, 3, 8 and a
seeded random k per request per step, run through the local-policy path and `guarded_decide`),
with requests of different lengths joining a batch that is already decoding.
"""

from __future__ import annotations

import random
import time
from typing import Any, Mapping

import pytest

from smartspec.core.cost_model import CostModel
from smartspec.core.policies.base import BasePolicy, BatchState, ParameterSpec, ParameterType
from smartspec.worker.engine import Engine, EngineConfig
from smartspec.worker.local_policy import LocalPolicyPlanner, PolicyChoice, local_policy_choice
from smartspec.worker.model import build_draft, load_model
from smartspec.worker.proposers import make_proposer
from smartspec.worker.proposers.choice import ProposerChoice
from smartspec.worker.sequence import FinishReason, GenerationRequest, TokenDelta
from smartspec.worker.steps import StaticPlanner

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
ARTICLE = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. The council "
    "approved the bicycle lanes on Main Street after a long debate, and the bicycle lanes on Main "
    "Street will open in the spring."
)
CHATS = [
    [{"role": "user", "content": f"Summarise this text in one sentence, reusing its words:\n\n{ARTICLE}"}],
    [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}],
    [{"role": "user", "content": "List three colours."}],
]
RAW_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def draft(model):
    return build_draft(model, "auto")


@pytest.fixture(scope="module")
def prompts(model) -> list[tuple[int, ...]]:
    tokenizer = model.tokenizer
    chat_ids = []
    for chat in CHATS:
        encoded = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        chat_ids.append(tuple(encoded["input_ids"] if not isinstance(encoded, list) else encoded))
    return chat_ids + [tuple(tokenizer.encode(RAW_PROMPT))]


class SeededRandomPolicy(BasePolicy):
    """A deliberately erratic policy: a random k in 0..max_k for each request at each step."""

    name = "seeded-random"
    description = "test only"
    parameters = (ParameterSpec("seed", ParameterType.INT, 0, "RNG seed"),)

    def __init__(self) -> None:
        self._rng: random.Random | None = None

    def decide(self, batch: BatchState, cost: Any, params: Mapping[str, Any]) -> list[int]:
        if self._rng is None:
            self._rng = random.Random(params["seed"])
        return [self._rng.randint(0, batch.max_k) for _ in batch.requests]


def make_engine(model, proposer, planner, max_k: int = 8, token_budget: int = 512) -> Engine:
    config = EngineConfig(max_batch_size=4, max_context_tokens=512, token_budget=token_budget, max_k=max_k)
    engine = Engine(model, proposer, config, planner)
    engine.start()
    return engine


def run_staggered(engine: Engine, prompts: list[tuple[int, ...]]) -> list[list[int]]:
    """Start the first two requests together; each later one joins once the previous has streamed
    a few tokens, so it is prefilled while the others decode (continuous batching)."""
    handles = []
    for index, prompt in enumerate(prompts):
        handles.append(engine.submit(GenerationRequest(f"r{index}", prompt, MAX_TOKENS)))
        if index >= 1:
            events = handles[-2].events(timeout=120)
            first = next(events)
            assert isinstance(first, TokenDelta)
            handles[-2] = _Replay(first, events)
    outcomes = [h.result(timeout=120) for h in handles]
    for outcome in outcomes:
        assert outcome.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    return [list(o.token_ids) for o in outcomes]


class _Replay:
    """A handle whose first event was already read."""

    def __init__(self, first, rest) -> None:
        self._first, self._rest = first, rest

    def result(self, timeout=None):
        for event in self._rest:
            if not isinstance(event, TokenDelta):
                return event
        raise AssertionError("stream ended without a result")


@pytest.fixture(scope="module")
def reference(model, prompts) -> list[list[int]]:
    """Plain greedy decoding (k = 0), one request at a time."""
    engine = make_engine(model, make_proposer("ngram"), StaticPlanner(0))
    try:
        outputs = []
        for index, prompt in enumerate(prompts):
            outcome = engine.submit(GenerationRequest(f"ref{index}", prompt, MAX_TOKENS)).result(timeout=120)
            assert outcome.speculation.proposed == 0
            outputs.append(list(outcome.token_ids))
        return outputs
    finally:
        engine.stop(0)


def random_planner(seed: int) -> LocalPolicyPlanner:
    policy = SeededRandomPolicy()
    return LocalPolicyPlanner(PolicyChoice(policy, policy.validate({"seed": seed})), max_k=8)


PLANS = {
    "fixed-1": lambda: StaticPlanner(1),
    "fixed-3": lambda: StaticPlanner(3),
    "fixed-8": lambda: StaticPlanner(8),
    "random": lambda: random_planner(seed=7),
}


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("proposer_name", ["ngram", "suffix", "ngram,suffix", "ngram,draft", "draft"])
def test_greedy_speculation_equals_plain_decoding(model, draft, prompts, reference, proposer_name, plan):
    if proposer_name in ("ngram", "suffix"):
        proposer = make_proposer(proposer_name)
    elif proposer_name == "ngram,suffix":
        proposer = ProposerChoice([make_proposer("ngram"), make_proposer("suffix")], ["ngram", "suffix"])
    elif proposer_name == "ngram,draft":   # a k-only plan: prompt lookup where it offers, else the draft
        proposer = ProposerChoice([make_proposer("ngram"), make_proposer("draft", loaded_model=draft, max_slots=4,
                                                                         max_tokens=512)], ["ngram", "draft"])
    else:
        proposer = make_proposer("draft", loaded_model=draft, max_slots=4, max_tokens=512)
    engine = make_engine(model, proposer, PLANS[plan]())
    try:
        outputs = run_staggered(engine, prompts)
    finally:
        engine.stop(0)
    for index, (got, want) in enumerate(zip(outputs, reference)):
        assert got == want, f"prompt {index}: {model.tokenizer.decode(got)!r} != {model.tokenizer.decode(want)!r}"


def test_greedy_output_is_unchanged_when_the_planner_chooses_proposer_and_k(model, draft, prompts, reference):
    """Under goodput, a worker with prompt lookup and a draft model plans (member, k) per row
    (worker/choice_plan.py); whichever member fills a row, the output is plain decoding's."""
    proposer = ProposerChoice([make_proposer("ngram"), make_proposer("draft", loaded_model=draft, max_slots=4,
                                                                     max_tokens=512)], ["ngram", "draft"])
    proposer.seed_costs(CostModel())   # the draft priced free until its own calls are timed: it gets rows at once
    planner = LocalPolicyPlanner(local_policy_choice("goodput:min_gain=0"), max_k=8, proposer=proposer)
    named = []   # (proposed, proposer_kind) of every decode row: reported so the controller pools per member
    observe = planner.observe
    planner.observe = lambda facts: (named.extend((r.proposed_tokens, r.proposer_kind) for r in facts.requests),
                                     observe(facts))
    engine = make_engine(model, proposer, planner)
    try:
        outputs = run_staggered(engine, prompts)
    finally:
        engine.stop(0)
    assert outputs == reference
    assert min(proposer.proposals_by_member) > 0, proposer.proposals_by_member   # both members proposed
    assert proposer.cost_fits[1].steps > 0
    from smartspec.v1 import common_pb2
    assert {kind for proposed, kind in named if proposed} == {common_pb2.PROPOSER_KIND_NGRAM,
                                                              common_pb2.PROPOSER_KIND_DRAFT}
    assert {kind for proposed, kind in named if not proposed} == {None}


def test_references_are_non_trivial(reference, model):
    # A reference that stopped at once would make the equality tests vacuous.
    assert all(len(tokens) >= 5 for tokens in reference)
    assert len({tuple(t) for t in reference}) == len(reference)


def test_speculation_really_happened_and_ngram_hits_the_summary(model, prompts):
    engine = make_engine(model, make_proposer("ngram"), StaticPlanner(4))
    try:
        outcome = engine.submit(GenerationRequest("s", prompts[0], MAX_TOKENS)).result(timeout=120)
    finally:
        engine.stop(0)
    stats = outcome.speculation
    assert stats.proposed > 0 and stats.accepted > 0
    # fewer decode steps than tokens: proposals were accepted, so the equality above is not vacuous
    assert stats.mean_accepted_length > 1.0
    assert stats.decode_steps < outcome.completion_tokens - 1


class RecordingPlanner(StaticPlanner):
    """Fixed k; keeps every step's facts."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.steps = []

    def observe(self, facts) -> None:
        self.steps.append(facts)


def test_ngram_lookahead_reports_exactly_what_the_next_step_offers(model, prompts, reference):
    """proposable_tokens reported after a step is what the proposer then offers in the next one:
    proposed == min(k, proposable) for every request that decodes on; the output is unchanged."""
    planner = RecordingPlanner(3)
    engine = make_engine(model, make_proposer("ngram"), planner)
    try:
        outputs = run_staggered(engine, prompts)
    finally:
        engine.stop(0)
    assert outputs == reference
    last: dict[str, int | None] = {}
    checked = dry = 0
    for facts in planner.steps:
        for fact in facts.requests:
            if fact.prefill_tokens == 0 and fact.request_id in last:
                assert fact.proposed_tokens == min(fact.requested_tokens, last[fact.request_id])
                checked += 1
                dry += last[fact.request_id] == 0
            if fact.finished or (fact.prefill_tokens and fact.proposable_tokens is None):
                last.pop(fact.request_id, None)
            else:
                assert fact.proposable_tokens is not None
                last[fact.request_id] = fact.proposable_tokens
    assert checked > 20 and 0 < dry < checked  # matched and unmatched steps both happened


def test_a_prefill_step_and_a_cancellation_are_reported_as_such(model, prompts):
    """The first step reports the whole prompt prefilled (and its first token in the context); a
    request cancelled between steps is reported once, finished, with nothing proposed or tested."""
    planner = RecordingPlanner(0)
    engine = make_engine(model, make_proposer("ngram"), planner)
    prompt = prompts[1]
    try:
        handle = engine.submit(GenerationRequest("c", prompt, 400, ignore_eos=True))
        events = handle.events(timeout=120)
        assert isinstance(next(events), TokenDelta)
        engine.cancel("c", handle)
        assert _Replay(None, events).result().finish_reason is FinishReason.CANCELLED
    finally:
        engine.stop(0)
    facts = [fact for step in planner.steps for fact in step.requests]
    first, last = facts[0], facts[-1]
    assert (first.prefill_tokens, first.context_tokens, first.proposed_tokens, first.finished) == \
        (len(prompt), len(prompt) + 1, 0, False)
    assert first.proposable_tokens is not None        # it decodes next: the proposer's look-ahead
    assert [fact.finished for fact in facts].count(True) == 1 and last.finished
    assert (last.proposed_tokens, last.accepted_tokens, last.tested_positions, last.prefill_tokens,
            last.requested_tokens, last.proposable_tokens) == (0, 0, 0, 0, 0, None)
    assert len(prompt) + 1 <= last.context_tokens < len(prompt) + 400


def test_chunked_prefill_gives_the_same_output(model, prompts, reference):
    # A 40-token budget prefills the ~80-token summary prompt in several chunks, next to decoding rows.
    assert len(prompts[0]) > 40
    engine = make_engine(model, make_proposer("ngram"), StaticPlanner(3), max_k=3, token_budget=40)
    try:
        outputs = run_staggered(engine, prompts)
    finally:
        engine.stop(0)
    assert outputs == reference


class BrokenPlanner:
    """A planner whose every call raises (a buggy remote planner)."""

    def plan(self, step_index, queries, queued_requests):
        raise RuntimeError("plan exploded")

    def observe(self, facts):
        raise RuntimeError("observe exploded")

    def close(self):
        pass


def test_a_failing_planner_costs_speculation_not_requests(model, prompts, reference):
    config = EngineConfig(max_batch_size=4, max_context_tokens=512, token_budget=512, max_k=4, fallback_k=2)
    engine = Engine(model, make_proposer("ngram"), config, BrokenPlanner())
    engine.start()
    try:
        outcome = engine.submit(GenerationRequest("b", prompts[1], MAX_TOKENS)).result(timeout=120)
    finally:
        engine.stop(0)
    assert list(outcome.token_ids) == reference[1]
    assert set(outcome.speculation.ks[:-2]) == {2}          # fallback_k on every step (but the last)


def sampled_run(model, draft, prompt, seed: int) -> list[int]:
    proposer = make_proposer("draft", loaded_model=draft, max_slots=4, max_tokens=512)
    engine = make_engine(model, proposer, StaticPlanner(3))
    try:
        request = GenerationRequest("s", prompt, 16, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)
        outcome = engine.submit(request).result(timeout=120)
    finally:
        engine.stop(0)
    assert outcome.speculation.proposed > 0               # rejection sampling against draft probs ran
    return list(outcome.token_ids)


def test_seeded_sampling_with_a_draft_model_is_reproducible(model, draft, prompts):
    first = sampled_run(model, draft, prompts[2], seed=11)
    assert sampled_run(model, draft, prompts[2], seed=11) == first
    assert sampled_run(model, draft, prompts[2], seed=12) != first


def test_cli_builds_the_draft_proposer_from_the_target(model):
    from smartspec.v1 import common_pb2
    from smartspec.worker.cli import build_proposer

    proposer = build_proposer("draft", model, draft="auto", max_slots=2, max_tokens=128)
    assert proposer.kind == common_pb2.PROPOSER_KIND_DRAFT
    assert build_proposer("ngram", model, draft="auto", max_slots=2, max_tokens=128).kind == \
        common_pb2.PROPOSER_KIND_NGRAM
    assert build_proposer("suffix", model, draft="auto", max_slots=2, max_tokens=128).kind == \
        common_pb2.PROPOSER_KIND_SUFFIX
    choice = build_proposer("ngram,suffix", model, draft="auto", max_slots=2, max_tokens=128)
    assert choice.kind == common_pb2.PROPOSER_KIND_CHOICE and choice.names == ["ngram", "suffix"]
    choice = build_proposer("ngram,suffix,draft", model, draft="auto", max_slots=2, max_tokens=128)
    assert choice.costly == [False, False, True] and choice.members[2].kind == common_pb2.PROPOSER_KIND_DRAFT


class SlowObservePlanner(StaticPlanner):
    """k = 2, and observe takes OBSERVE_S, as a remote planner waiting for its next plan does."""

    OBSERVE_S = 0.05

    def __init__(self) -> None:
        super().__init__(2)
        self.steps = []

    def observe(self, facts):
        self.steps.append(facts)
        time.sleep(self.OBSERVE_S)


def test_step_total_covers_the_planner_wait_between_steps(model, prompts):
    """total_ms spans the loop iteration since the previous report, so the controller's overhead
    term sees time a step spends outside draft + verify (here a 50 ms planner wait)."""
    planner = SlowObservePlanner()
    engine = make_engine(model, make_proposer("ngram"), planner, max_k=4)
    try:
        engine.submit(GenerationRequest("w", prompts[1], 12)).result(timeout=120)
    finally:
        engine.stop(0)
    steps = [s for s in planner.steps if s.requests]
    assert len(steps) >= 3
    first, later = steps[0], steps[1:]
    assert first.total_ms - first.draft_ms - first.verify_ms < SlowObservePlanner.OBSERVE_S * 1000
    for step in later:
        assert step.total_ms - step.draft_ms - step.verify_ms >= SlowObservePlanner.OBSERVE_S * 1000

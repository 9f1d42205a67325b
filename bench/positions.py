"""What prompt lookup offers at every output position of a greedy continuation, and how much of it is right.

Why: under greedy decoding the target's text does not depend on the speculation schedule, and prompt
lookup (the `ngram` proposer) is a deterministic function of the context. So a prompt's whole
speculative behaviour is one table over output positions: at position p (p tokens generated, the
context is prompt + generated[:p]) the proposer, asked for up to max_k tokens, offers offered[p-1]
of them, and the first matched[p-1] equal generated[p:]. Any schedule is a walk over that table: a
step at p with k verifies min(k, offered) proposals, accepts min(k, offered, matched) of them and
moves to p + accepted + 1 (`walk`). `acceptance_models.PositionReplay` replays it in the simulator:
copied spans match for many positions in a row, then nothing does, which iid rates cannot show.

The walk is exact only because prompt lookup asked for k < max_k offers the first k of what it
offers for max_k (it copies a span; `NgramProposer._copy_after`) or nothing.

File (JSON), written by `scripts/record_positions.py`:

    {"kind": "positions", "proposer": "ngram", "max_k": 8, "model": NAME,
     "dataset": {"name", "seed", "prompts", "max_tokens"},
     "requests": [{"index": i, "prompt_tokens": P, "completion_tokens": C,
                   "offered": [C - 1 ints in 0..max_k], "matched": [C - 1 ints, each <= offered]}, ...]}

`index` is the dataset prompt index; `smartspec bench` sends dataset prompt i as its request i (the
dataset is built with exactly --requests prompts, so record with the bench's --dataset, --requests,
--seed and --max-tokens: a different count can select different prompts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

KIND = "positions"
PROPOSER = "ngram"


# --- the table and walks over it (pure Python: the simulator side needs no torch) ----------------

@dataclass(frozen=True)
class Walk:
    """Totals of one request's walk over its table at a fixed k (the engine's SpeculationCounters)."""

    accepted: int
    proposed: int
    tested: int  # accepted + 1 for each step whose run a rejection ended
    decode_steps: int


def walk(offered: Sequence[int], matched: Sequence[int], completion_tokens: int, k: int) -> Walk:
    """What a request makes under a static k: from p = 1 (the prefill's token), each decode step asks
    for k clamped to the tokens still wanted minus the target's own (the engine's clamp), verifies
    min(k, offered[p-1]), accepts min(that, matched[p-1]) and adds one token of the target's."""
    accepted = proposed = tested = steps = 0
    p = 1
    while p < completion_tokens:
        kk = max(0, min(k, completion_tokens - p - 1))
        off = min(kk, offered[p - 1]) if p - 1 < len(offered) else 0
        acc = min(off, matched[p - 1]) if off else 0
        accepted += acc
        proposed += off
        tested += acc + (1 if acc < off else 0)
        steps += 1
        p += acc + 1
    return Walk(accepted, proposed, tested, steps)


def lookup_table(prompt_ids: Sequence[int], generated: Sequence[int], max_k: int,
                 proposer: Any = None) -> tuple[list[int], list[int]]:
    """(offered, matched), each [len(generated) - 1]: at output position p = 1 .. len - 1, what
    prompt lookup offers for context prompt + generated[:p] when asked for max_k tokens, and how
    many of them equal generated[p:] as a prefix. `proposer`: a fresh proposer for this request
    (default: `make_proposer("ngram")`, the worker's); the context only grows, so its index is
    extended, not rebuilt, from one position to the next."""
    from smartspec.worker.proposers import ProposalRequest, SamplingParams, make_proposer

    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    proposer = proposer or make_proposer(PROPOSER)
    context = list(prompt_ids)
    generated = list(generated)
    offered, matched = [], []
    for p in range(1, len(generated)):
        context.append(generated[p - 1])
        (proposal,) = proposer.propose([ProposalRequest("positions", list(context), max_k, SamplingParams())])
        tokens = list(proposal.tokens)
        truth = generated[p:p + len(tokens)]
        m = 0
        while m < len(truth) and tokens[m] == truth[m]:
            m += 1
        offered.append(len(tokens))
        matched.append(m)
    proposer.release("positions")
    return offered, matched


# --- recording with the real engine ----------------------------------------------------------

def greedy_continuations(model: Any, requests: Sequence[Any], *, max_batch_size: int = 8,
                         max_context_tokens: int = 2048, timeout_s: float = 3600.0) -> list[list[int]]:
    """The engine's plain greedy output (k = 0) for each GenerationRequest, in order."""
    from smartspec.worker.engine import Engine, EngineConfig
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.steps import StaticPlanner

    config = EngineConfig(max_batch_size=max_batch_size, max_context_tokens=max_context_tokens,
                          token_budget=max(2048, max_batch_size * 9), max_k=8)
    engine = Engine(model, make_proposer(PROPOSER), config, StaticPlanner(0))
    engine.start()
    out: list[list[int]] = []
    try:
        wave = config.max_queue  # never more waiting than the engine queues
        for start in range(0, len(requests), wave):
            handles = [engine.submit(r) for r in requests[start:start + wave]]
            out += [list(h.result(timeout=timeout_s).token_ids) for h in handles]
    finally:
        engine.stop(0)
    return out


def record_token_prompts(model: Any, prompts: Sequence[Sequence[int]], max_tokens: int | Sequence[int], *,
                         max_k: int = 8, max_batch_size: int = 8, max_context_tokens: int = 2048) -> list[dict]:
    """One request entry (the file's "requests" format) per pre-tokenized prompt, index = its position.

    Each prompt is generated greedily with ignore_eos (max_tokens: one for all, or one per prompt).
    """
    from smartspec.worker.sequence import GenerationRequest

    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_tokens for {len(prompts)} prompts")
    requests = [GenerationRequest(f"positions-{i}", tuple(ids), n, ignore_eos=True)
                for i, (ids, n) in enumerate(zip(prompts, limits))]
    return _entries(model, requests, max_k, max_batch_size, max_context_tokens)


def _entries(model: Any, requests: Sequence[Any], max_k: int, max_batch_size: int,
             max_context_tokens: int) -> list[dict]:
    texts = greedy_continuations(model, requests, max_batch_size=max_batch_size,
                                 max_context_tokens=max_context_tokens)
    entries = []
    for i, (request, generated) in enumerate(zip(requests, texts)):
        offered, matched = lookup_table(request.prompt_ids, generated, max_k)
        entries.append({"index": i, "prompt_tokens": len(request.prompt_ids), "completion_tokens": len(generated),
                        "offered": offered, "matched": matched})
    return entries


def dataset_requests(dataset: Any, tokenizer: Any, context_window: int) -> list[Any]:
    """GenerationRequests for a bench dataset exactly as the worker builds them from the bench's
    GenerateRequest (chat messages through the chat template, max_tokens capped by the context
    window, ignore_eos): the server's own `to_domain`."""
    from smartspec.v1 import generation_pb2
    from smartspec.worker.requests import RequestLimits, to_domain

    limits = RequestLimits(context_window)
    out = []
    for i, prompt in enumerate(dataset.prompts):
        message = generation_pb2.GenerateRequest(
            messages=[generation_pb2.ChatMessage(role=role, content=content) for role, content in prompt.messages],
            max_tokens=prompt.max_tokens, temperature=0.0, ignore_eos=True, request_id=f"positions-{i}")
        out.append(to_domain(message, tokenizer, limits))
    return out


def record_dataset(model: Any, dataset: Any, *, max_k: int = 8, max_batch_size: int = 8,
                   max_context_tokens: int = 2048) -> dict:
    """The whole positions file for a bench dataset (`bench.datasets.load_dataset(...)`)."""
    from smartspec.worker.model_facts import context_window

    requests = dataset_requests(dataset, model.tokenizer, context_window(model, max_context_tokens))
    return {
        "kind": KIND, "proposer": PROPOSER, "max_k": max_k, "model": getattr(model, "name", None),
        "dataset": {"name": dataset.name, "seed": dataset.seed, "prompts": len(dataset.prompts),
                    "max_tokens": dataset.prompts[0].max_tokens},
        "requests": _entries(model, requests, max_k, max_batch_size, max_context_tokens),
    }


# --- reading ---------------------------------------------------------------------------------

def load_positions(source: str | Path | Mapping[str, Any]) -> dict:
    """A positions file (path or already-parsed mapping), checked: a ValueError names what is wrong."""
    data = dict(source) if isinstance(source, Mapping) else json.loads(Path(source).read_text())
    where = "positions" if isinstance(source, Mapping) else str(source)
    if data.get("kind") != KIND or not data.get("requests"):
        raise ValueError(f"{where}: not a positions file (expected kind 'positions' and a non-empty 'requests'; "
                         "write one with scripts/record_positions.py)")
    max_k = int(data.get("max_k") or 0)
    if max_k < 1:
        raise ValueError(f"{where}: max_k must be >= 1")
    seen = set()
    for r in data["requests"]:
        index, offered, matched = r.get("index"), r.get("offered"), r.get("matched")
        if not isinstance(index, int) or index in seen or offered is None or matched is None:
            raise ValueError(f"{where}: each request needs a unique integer 'index', 'offered' and 'matched'")
        seen.add(index)
        if len(offered) != len(matched) or len(offered) != max(0, int(r.get("completion_tokens", 0)) - 1):
            raise ValueError(f"{where}: request {index}: offered and matched need completion_tokens - 1 entries")
        if any(not 0 <= m <= o <= max_k for o, m in zip(offered, matched)):
            raise ValueError(f"{where}: request {index}: need 0 <= matched <= offered <= max_k ({max_k})")
    return data


def check_dataset(positions: Mapping[str, Any], dataset: Mapping[str, Any] | None) -> None:
    """ValueError if a bench's dataset meta names other prompts than the positions were recorded on."""
    recorded = positions.get("dataset") or {}
    if not dataset or not recorded:
        return
    for key in ("name", "seed", "prompts", "max_tokens"):
        if key in dataset and key in recorded and dataset[key] != recorded[key]:
            raise ValueError(f"positions were recorded on dataset {key}={recorded[key]!r}, the bench ran "
                             f"{key}={dataset[key]!r}: record them with the bench's --dataset, --requests, "
                             "--seed and --max-tokens")

"""The startup cost profile: timed draft + verify steps over batch sizes x speculation lengths.

Sent in the hello, it seeds the controller's cost model before the first real step (the online
fit refines it afterwards). Seconds, not minutes: the default grid is batch {1, 4, 8, 16} x k
{0, 2, 4, 8} at 128 tokens of context (after one untimed target forward, and one untimed
proposal per batch size so a draft model has its context cached, as it would while serving).
Each point is sent as one sample: the median of its timed repeats. On a shared CPU single
timings vary by 2-5x; a fit through 6 single timings (the former batch {1, 8} x k {0, 2, 4})
over-predicted measured verify steps at batch 16, k 8 by 140% and at batch 4, k 8 by 90%.

Attention cost does not depend on the cached values, so the context is not prefilled through the
target: its slots attend over whatever the cache holds. The proposer does see a real context (a
repeated phrase, so prompt lookup finds matches and really proposes k tokens).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch

from smartspec.v1 import common_pb2
from smartspec.worker.proposers import GREEDY, ProposalRequest, Proposer

DEFAULT_BATCH_SIZES = (1, 4, 8, 16)
DEFAULT_KS = (0, 2, 4, 8)
DEFAULT_CONTEXT_TOKENS = 128


def synthetic_context(length: int, vocab_size: int, seed: int) -> list[int]:
    """A 16-token phrase repeated to `length` tokens (ids away from the special tokens at 0..)."""
    generator = torch.Generator().manual_seed(seed)
    phrase = torch.randint(100, vocab_size, (16,), generator=generator).tolist()
    return (phrase * (length // 16 + 1))[:length]


def profiled_proposer(proposer: Proposer) -> Proposer:
    """The proposer whose cost the profile times: for a per-request choice with a draft model among
    its members, that draft model (prompt lookup's cost is a row's bookkeeping, already in the
    verify terms; the draft's per-depth cost is what the planner must know before it first runs),
    else the proposer itself."""
    costly = getattr(proposer, "costly_members", None)
    return proposer.members[costly[0]] if costly else proposer


def measure_profile(
    model: Any,
    proposer: Proposer,
    cache: Any,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    ks: Sequence[int] = DEFAULT_KS,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    repeats: int = 3,
    clock=time.perf_counter,
) -> list[common_pb2.ProfileSample]:
    """Time draft and verify for every (batch size, k); one sample per point, the median of `repeats`.

    Uses the engine's cache before serving starts (slots 0..B-1); leaves the proposer no state.
    """
    module = model.module
    device = module.device
    batch_sizes = sorted({min(b, cache.num_slots) for b in batch_sizes if b >= 1})
    context_tokens = max(1, min(context_tokens, cache.max_tokens - max(ks, default=0) - 1))
    vocab_size = module.config.vocab_size
    samples = []
    for batch in batch_sizes:
        seq_ids = [f"__profile-{batch}-{i}" for i in range(batch)]
        contexts = [synthetic_context(context_tokens, vocab_size, seed=i) for i in range(batch)]
        try:
            # Warm-up, untimed: the first forward at this shape, and the draft's context caching.
            _one_point(module, proposer, cache, seq_ids, contexts, max(ks, default=0), device, clock)
            for k in ks:
                timings = [_one_point(module, proposer, cache, seq_ids, contexts, k, device, clock)
                           for _ in range(max(1, repeats))]
                samples.append(common_pb2.ProfileSample(
                    batch_size=batch, speculation_length=k, context_tokens=context_tokens,
                    draft_ms=statistics.median(d for d, _ in timings),
                    verify_ms=statistics.median(v for _, v in timings),
                ))
        finally:
            for seq_id in seq_ids:
                proposer.release(seq_id)
    return samples


def _one_point(module, proposer, cache, seq_ids, contexts, k, device, clock) -> tuple[float, float]:
    batch = len(seq_ids)
    draft_start = clock()
    proposed = [[] for _ in range(batch)]
    if k > 0:
        asks = [ProposalRequest(seq_id, context, k, GREEDY, None) for seq_id, context in zip(seq_ids, contexts)]
        proposed = [p.tokens for p in proposer.propose(asks)]
    draft_ms = (clock() - draft_start) * 1000.0

    # Every row verifies k proposals (padding with the last token where a proposer found fewer),
    # which is the step the sample describes.
    rows = [[context[-1]] + (tokens + [context[-1]] * k)[:k] for context, tokens in zip(contexts, proposed)]
    input_ids = torch.tensor(rows, dtype=torch.long, device=device)                   # [B, k+1]
    start = len(contexts[0]) - 1
    verify_start = clock()
    module.forward_step(
        cache,
        input_ids,
        torch.arange(batch, dtype=torch.long),                                          # slots: [B]
        torch.full((batch,), start, dtype=torch.long),                                  # start_positions: [B]
        torch.full((batch,), k + 1, dtype=torch.long),                                  # query_lengths: [B]
    )                                                                                   # logits: [B, k+1, V]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    verify_ms = (clock() - verify_start) * 1000.0
    return draft_ms, verify_ms

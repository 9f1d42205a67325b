"""What the suffix proposer costs the engine's step loop, and what its worker-wide index holds.

    python scripts/bench_suffix_cost.py [--requests 1000] [--k 8] [--global-tokens 200000] [--no-memory]

Synthetic traffic with cross-request repeats: each request copies one of a few fixed-seed random
templates (--prompt-tokens + --output-tokens long) with ~10% of its tokens replaced by random
"slot" fillers. Each request is driven as the engine drives it, one generated token per step:
lookahead(context) then propose(context, k), then the next output token is appended; at the end it is
released (its output joins the worker-wide index). Printed: median and p99 ms per call (one request
per call), the would-be acceptance (mean length of the proposal's prefix that equals the true
continuation), and after all requests the tokens, contexts and branches held; then the same run
again under tracemalloc for the peak traced memory (tracing slows it, so it is not timed).
"""

from __future__ import annotations

import argparse
import random
from array import array
import statistics
import time
import tracemalloc

from smartspec.worker.proposers import ProposalRequest, SamplingParams
from smartspec.worker.proposers.suffix import SuffixProposer

VOCAB = 32_000
TEMPLATES = 6
SLOT_EVERY = 20  # a slot of 1..3 random tokens about every SLOT_EVERY tokens (~10% of the text)


def requests(count: int, prompt_tokens: int, output_tokens: int, seed: int):
    """(prompt, output) pairs: template copies with random slot fillers, the same for every run."""
    rng = random.Random(seed)
    length = prompt_tokens + output_tokens
    templates = [[rng.randrange(VOCAB) for _ in range(length)] for _ in range(TEMPLATES)]
    for _ in range(count):
        text = list(rng.choice(templates))
        for start in range(rng.randrange(SLOT_EVERY), length, SLOT_EVERY):
            for position in range(start, min(start + rng.randint(1, 3), length)):
                text[position] = rng.randrange(VOCAB)
        yield text[:prompt_tokens], text[prompt_tokens:]


def percentile(values, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def drive(proposer: SuffixProposer, args: argparse.Namespace, clock=time.perf_counter):
    """Every request through the proposer; per-call times in ms and accepted-prefix lengths, in
    arrays (8 and 4 bytes a sample) so that they barely show in the traced memory."""
    lookahead_ms, propose_ms, release_ms, accepted = array("d"), array("d"), array("d"), array("i")
    for number, (prompt, output) in enumerate(requests(args.requests, args.prompt_tokens, args.output_tokens,
                                                       args.seed)):
        seq_id, context = f"r{number}", list(prompt)
        for step, token in enumerate(output):
            start = clock()
            proposer.lookahead(seq_id, context, args.k)
            middle = clock()
            (proposal,) = proposer.propose([ProposalRequest(seq_id, context, args.k, SamplingParams())])
            end = clock()
            lookahead_ms.append((middle - start) * 1000.0)
            propose_ms.append((end - middle) * 1000.0)
            truth = output[step : step + args.k]
            accepted.append(next((i for i, (a, b) in enumerate(zip(proposal.tokens, truth)) if a != b),
                                 min(len(proposal.tokens), len(truth))))
            context = context + [token]
        start = clock()
        proposer.release(seq_id)
        release_ms.append((clock() - start) * 1000.0)
    return lookahead_ms, propose_ms, release_ms, accepted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--output-tokens", type=int, default=150)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--global-tokens", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc run")
    args = parser.parse_args()

    proposer = SuffixProposer(global_tokens=args.global_tokens)
    started = time.perf_counter()
    lookahead_ms, propose_ms, release_ms, accepted = drive(proposer, args)
    wall_s = time.perf_counter() - started
    print(f"{args.requests} requests x {args.output_tokens} steps ({args.prompt_tokens}-token prompts, "
          f"k = {args.k}, {TEMPLATES} templates), {wall_s:.1f} s in all")
    for name, values in (("lookahead", lookahead_ms), ("propose", propose_ms), ("release", release_ms)):
        print(f"  {name:9s} ms per call: median {statistics.median(values):.4f}  p99 {percentile(values, 0.99):.4f}"
              f"  max {max(values):.3f}  ({len(values)} calls)")
    print(f"  would-be accepted tokens per proposal: mean {statistics.fmean(accepted):.2f} of k = {args.k}")
    stats = proposer.stats()
    print(f"  held after {args.requests} requests: {stats['global_tokens']} tokens of "
          f"{stats['global_requests']} requests in the worker-wide index, {stats['global_contexts']} contexts "
          f"({stats['global_branches']} branches); memory_tokens() = {proposer.memory_tokens()}")

    if not args.no_memory:
        tracemalloc.start()
        traced = SuffixProposer(global_tokens=args.global_tokens)
        samples = sum(len(values) * values.itemsize for values in drive(traced, args))
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"  tracemalloc: peak {peak / 2**20:.1f} MB, held at the end {current / 2**20:.1f} MB "
              f"(both include this run's {samples / 2**20:.1f} MB of samples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

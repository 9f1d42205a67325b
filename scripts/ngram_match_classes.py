"""How often prompt lookup's first copied token is right, by match length, on unseen work.

    python scripts/ngram_match_classes.py [--prompts 6] [--max-tokens 128] [--model SmolLM2-135M-Instruct]

Greedy text does not depend on speculation, so one plain generation per prompt (bench_unseen.py's
summaries, code edits and chat) gives, at every output position, what prompt lookup would offer,
the proposal class it grades that offer with (worker/proposers/ngram.py, MATCH_CLASS_BOUNDS) and how
many offered tokens the text then really continues with. Printed per workload and class: positions
with an offer, P(first token right) and mean tokens right (of up to 8). This is the evidence behind
grading proposals by match length (core/decision.py, AcceptanceBook.prior_rates).
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_unseen  # noqa: E402  (scripts/ is not a package)
from smartspec.bench.positions import greedy_continuations  # noqa: E402
from smartspec.v1 import generation_pb2  # noqa: E402
from smartspec.worker.model import load_model  # noqa: E402
from smartspec.worker.proposers import ProposalRequest, SamplingParams  # noqa: E402
from smartspec.worker.proposers.ngram import MATCH_CLASS_BOUNDS, NgramProposer  # noqa: E402
from smartspec.worker.requests import RequestLimits, to_domain  # noqa: E402

MAX_K = 8


def class_label(cls: int) -> str:
    bounds = (2, *MATCH_CLASS_BOUNDS)
    if cls + 1 < len(bounds):
        low, high = bounds[cls], bounds[cls + 1] - 1
        return str(low) if low == high else f"{low}-{high}"
    return f"{bounds[-1]}+"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6, help="prompts per workload")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    args = parser.parse_args()

    model = load_model(args.model)
    requests, kinds = [], []
    for kind, build in bench_unseen.WORKLOADS.items():
        for index, messages in enumerate(build(args.prompts, random.Random(7))):
            message = generation_pb2.GenerateRequest(
                messages=[generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
                max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, request_id=f"{kind}-{index}")
            requests.append(to_domain(message, model.tokenizer, RequestLimits(2048)))
            kinds.append(kind)
    texts = greedy_continuations(model, requests, max_batch_size=8)

    tally = collections.defaultdict(lambda: [0, 0, 0])  # (kind, class) -> [offers, first right, tokens right]
    for kind, request, generated in zip(kinds, requests, texts):
        proposer = NgramProposer()
        context = list(request.prompt_ids)
        for position in range(1, len(generated)):
            context.append(generated[position - 1])
            (proposal,) = proposer.propose([ProposalRequest("r", list(context), MAX_K, SamplingParams())])
            if not proposal.tokens:
                continue
            truth = generated[position:position + len(proposal.tokens)]
            right = 0
            while right < len(truth) and proposal.tokens[right] == truth[right]:
                right += 1
            counts = tally[(kind, proposer.proposal_class("r"))]
            counts[0] += 1
            counts[1] += right > 0
            counts[2] += right
    print("| workload | match length | offers | P(first right) | mean right (of <= 8) |\n|---|---|---:|---:|---:|")
    for (kind, cls), (offers, first, right) in sorted(tally.items()):
        print(f"| {kind} | {class_label(cls)} | {offers} | {first / offers:.2f} | {right / offers:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

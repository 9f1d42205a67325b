"""Record prompt lookup's offers and matches at every output position of a bench dataset's greedy text.

    python scripts/record_positions.py --dataset summarise --requests 16 --max-tokens 48 --seed 0 \\
        [--model PATH] [--max-k 8] --out positions.json

Use the same --dataset, --requests, --seed and --max-tokens as the `smartspec bench` run it is to
explain (the dataset's prompts depend on all four). Then replay it in the simulator:
`smartspec simulate --alpha replay:positions.json ...` or
`smartspec simulate --calibrate-from bench.json --positions positions.json`.
The format and why it is exact: smartspec.bench.positions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from smartspec.bench.datasets import load_dataset, names
from smartspec.bench.positions import record_dataset
from smartspec.worker.model import DEFAULT_MODEL, load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="summarise", choices=names())
    parser.add_argument("--requests", type=int, default=16, help="prompts (the bench's --requests)")
    parser.add_argument("--max-tokens", type=int, default=0, help="completion tokens (0: the dataset's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="target model: name, folder or .gguf")
    parser.add_argument("--max-k", type=int, default=8, help="proposals asked of prompt lookup per position")
    parser.add_argument("--batch", type=int, default=8, help="requests generated at once")
    parser.add_argument("--max-context-tokens", type=int, default=2048, help="the worker's context window")
    parser.add_argument("--out", required=True, help="positions JSON to write")
    args = parser.parse_args(argv)

    dataset = load_dataset(args.dataset, args.requests, seed=args.seed, max_tokens=args.max_tokens or None)
    model = load_model(args.model)
    started = time.perf_counter()
    table = record_dataset(model, dataset, max_k=args.max_k, max_batch_size=args.batch,
                           max_context_tokens=args.max_context_tokens)
    Path(args.out).write_text(json.dumps(table))
    offered = sum(sum(o > 0 for o in r["offered"]) for r in table["requests"])
    positions = sum(len(r["offered"]) for r in table["requests"])
    print(f"{len(table['requests'])} requests, {positions} positions, prompt lookup offers at "
          f"{offered / max(1, positions):.0%} of them; {time.perf_counter() - started:.1f} s -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

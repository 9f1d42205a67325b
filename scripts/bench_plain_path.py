"""Plain decoding (no speculation): this runtime's greedy loop vs transformers' generate().

Same weights, same dtype, same prompts, both greedy, timed interleaved in one run (median of
--repeats). Each row's prompt is --prompt-tokens long (no padding) and exactly --new-tokens are
generated. Prints tokens/s for both and the ratio; also checks both produced the same tokens.

    python scripts/bench_plain_path.py [--model smollm2] [--batches 1,16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from smartspec.worker.model import load_model
from smartspec.worker.model.loading import LoadedModel

SOURCE_TEXT = (
    "Speculative decoding lets a small draft model propose several tokens that the large target model "
    "then checks in a single forward pass. When the guesses are good, each step yields several tokens; "
    "when they are bad, the extra work is wasted. Serving systems batch many requests together, so the "
    "right amount of speculation depends on the load, on the proposer and on the hardware. "
) * 8


def prompts(model: LoadedModel, batch: int, length: int) -> torch.Tensor:
    """[batch, length] distinct windows of the same text (no padding needed)."""
    tokens = model.tokenizer(SOURCE_TEXT).input_ids
    return torch.tensor([tokens[row * 7: row * 7 + length] for row in range(batch)])


@torch.inference_mode()
def runtime_greedy(model: LoadedModel, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Prefill every row in one forward, then one forward per token: [B, new_tokens]."""
    module = model.module
    batch, prompt_length = input_ids.shape
    cache = module.allocate_cache(batch, prompt_length + new_tokens)
    slots = torch.arange(batch)
    ones = torch.ones(batch, dtype=torch.long)
    logits = module.forward_step(cache, input_ids, slots, torch.zeros(batch, dtype=torch.long),
                                 torch.full((batch,), prompt_length), logits_rows="last")   # [B, 1, V]
    generated = []
    for index in range(new_tokens):
        next_tokens = logits[:, -1].argmax(-1, keepdim=True)                               # [B, 1]
        generated.append(next_tokens)
        if index + 1 < new_tokens:
            logits = module.forward_step(cache, next_tokens, slots,
                                         torch.full((batch,), prompt_length + index), ones)
    return torch.cat(generated, dim=1)


@torch.inference_mode()
def hf_greedy(hf_model, input_ids: torch.Tensor, new_tokens: int, pad_token_id: int) -> torch.Tensor:
    out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id)
    return out[:, input_ids.shape[1]:]


def timed(fn) -> tuple[float, torch.Tensor]:
    began = time.perf_counter()
    result = fn()
    return time.perf_counter() - began, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    ours = load_model(args.model, dtype=torch.float32)
    hf_model = AutoModelForCausalLM.from_pretrained(str(ours.path), dtype=torch.float32).eval()
    pad = ours.tokenizer.pad_token_id if ours.tokenizer.pad_token_id is not None else 0
    print(f"{ours.name} fp32 CPU, {torch.get_num_threads()} threads, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'batch':>5}{'runtime tok/s':>15}{'HF generate tok/s':>19}{'ratio':>8}{'same tokens':>13}")
    for batch in (int(b) for b in args.batches.split(",")):
        input_ids = prompts(ours, batch, args.prompt_tokens)
        runtime_greedy(ours, input_ids[:, :16], 2)              # warm-up both paths
        hf_greedy(hf_model, input_ids[:, :16], 2, pad)
        ours_s, hf_s = [], []
        for _ in range(args.repeats):
            seconds, ours_tokens = timed(lambda: runtime_greedy(ours, input_ids, args.new_tokens))
            ours_s.append(seconds)
            seconds, hf_tokens = timed(lambda: hf_greedy(hf_model, input_ids, args.new_tokens, pad))
            hf_s.append(seconds)
        generated = batch * args.new_tokens
        ours_rate, hf_rate = generated / statistics.median(ours_s), generated / statistics.median(hf_s)
        same = (ours_tokens == hf_tokens).float().mean().item()
        print(f"{batch:>5}{ours_rate:>15.1f}{hf_rate:>19.1f}{ours_rate / hf_rate:>8.2f}{same:>13.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

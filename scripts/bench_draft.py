"""Drafts built from the target, side by side: greedy agreement with the target and step cost.

Agreement is measured per token with teacher forcing on text no other part of the project uses:
(1) a passage of Python's standard library source (`heapq`'s module docstring and code) and
(2) the target's own greedy answer to a chat prompt (what speculation really sees).
Cost is one decode forward (one new token per row, ~200 tokens of context) at batch 1 and 16,
timed interleaved with the target's in the same run; the table shows draft / target ratios.

    python scripts/bench_draft.py [--model smollm2] [--kinds bf16,int8,layers:10] [--repeats 7]
"""

from __future__ import annotations

import argparse
import inspect
import heapq
import statistics
import time

import torch

from smartspec.worker.model import build_draft, load_model
from smartspec.worker.model.loading import LoadedModel

CONTEXT_TOKENS = 200
CHAT_PROMPT = "Explain in a few sentences why the sky is blue."


def held_aside_text() -> str:
    return inspect.getsource(heapq)[:4000]


@torch.inference_mode()
def greedy_choices(model: LoadedModel, tokens: list[int]) -> torch.Tensor:
    """argmax next token after every prefix of `tokens`: [len(tokens)]."""
    cache = model.module.allocate_cache(1, len(tokens))
    logits = model.module.forward_step(cache, torch.tensor([tokens]), torch.tensor([0]), torch.tensor([0]),
                                       torch.tensor([len(tokens)]))                      # [1, S, V]
    return logits[0].argmax(-1)


@torch.inference_mode()
def greedy_answer(model: LoadedModel, new_tokens: int) -> list[int]:
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}],
                                                 add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    cache = model.module.allocate_cache(1, len(prompt) + new_tokens)
    module = model.module
    logits = module.forward_step(cache, torch.tensor([prompt]), torch.tensor([0]), torch.tensor([0]),
                                 torch.tensor([len(prompt)]), logits_rows="last")
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(int(logits[0, -1].argmax()))
        logits = module.forward_step(cache, torch.tensor([[tokens[-1]]]), torch.tensor([0]),
                                     torch.tensor([len(tokens) - 1]), torch.tensor([1]))
    return tokens


def agreement(target_choices: torch.Tensor, draft: LoadedModel, tokens: list[int], skip: int) -> float:
    draft_choices = greedy_choices(draft, tokens)
    return (draft_choices[skip:] == target_choices[skip:]).float().mean().item()


def decode_timer(model: LoadedModel, batch: int):
    """A closure timing one decode forward at `batch` rows with CONTEXT_TOKENS of context each."""
    module = model.module
    cache = module.allocate_cache(batch, CONTEXT_TOKENS + 1)
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, model.config.vocab_size, (batch, CONTEXT_TOKENS), generator=generator)
    slots = torch.arange(batch)
    module.forward_step(cache, context, slots, torch.zeros(batch, dtype=torch.long),
                        torch.full((batch,), CONTEXT_TOKENS))
    new = torch.randint(0, model.config.vocab_size, (batch, 1), generator=generator)
    starts, lengths = torch.full((batch,), CONTEXT_TOKENS), torch.ones(batch, dtype=torch.long)

    def run() -> float:
        began = time.perf_counter()
        module.forward_step(cache, new, slots, starts, lengths)
        return time.perf_counter() - began
    run()                                      # warm-up
    return run


def best_speedup(acceptance: float, cost_ratio: float, max_k: int = 8) -> tuple[int, float]:
    """Idealised SmartSpec gain: max over k of E(k) / (1 + k * cost_ratio) (verify cost ignored)."""
    def expected(k: int) -> float:
        return k + 1.0 if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return max(((k, expected(k) / (1 + k * cost_ratio)) for k in range(max_k + 1)), key=lambda kv: kv[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--kinds", default="bf16,int8,layers:10,layers:20")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--answer-tokens", type=int, default=96)
    args = parser.parse_args()

    target = load_model(args.model)
    drafts = {}
    for kind in args.kinds.split(","):
        began = time.perf_counter()
        drafts[kind] = build_draft(target, kind)
        print(f"built draft {kind} in {time.perf_counter() - began:.1f} s")

    stdlib_tokens = target.tokenizer(held_aside_text()).input_ids[:512]
    answer = greedy_answer(target, args.answer_tokens)
    answer_skip = len(answer) - args.answer_tokens - 1           # score only the answer's positions
    stdlib_target = greedy_choices(target, stdlib_tokens)
    answer_target = greedy_choices(target, answer)

    timers = {(name, batch): decode_timer(model, batch)
              for name, model in [("target", target), *drafts.items()] for batch in (1, 16)}
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in timers}
    for _ in range(args.repeats):                                 # interleaved: same noise for all
        for key, timer in timers.items():
            samples[key].append(timer())
    median_ms = {key: statistics.median(values) * 1000 for key, values in samples.items()}

    print(f"\ntarget {target.name}, {torch.get_num_threads()} threads, context {CONTEXT_TOKENS} tokens, "
          f"median of {args.repeats}")
    print(f"target decode step: batch 1 {median_ms['target', 1]:.1f} ms, batch 16 {median_ms['target', 16]:.1f} ms")
    header = (f"{'draft':<12}{'agree stdlib':>13}{'agree answer':>13}{'cost b1':>9}{'cost b16':>10}"
              f"{'best k':>8}{'ideal gain':>12}")
    print(header)
    print("-" * len(header))
    for kind, draft in drafts.items():
        agree_stdlib = agreement(stdlib_target, draft, stdlib_tokens, skip=0)
        agree_answer = agreement(answer_target, draft, answer, skip=answer_skip)
        cost1 = median_ms[kind, 1] / median_ms["target", 1]
        cost16 = median_ms[kind, 16] / median_ms["target", 16]
        k, gain = best_speedup(agree_answer, cost1)
        print(f"{kind:<12}{agree_stdlib:>13.1%}{agree_answer:>13.1%}{cost1:>9.2f}{cost16:>10.2f}{k:>8}{gain:>12.2f}")
    print("\ncost = draft step / target step (same run); ideal gain = max_k E(k) / (1 + k * cost b1), "
          "ignoring the extra cost of verifying k + 1 tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

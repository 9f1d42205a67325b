"""Drafts built locally from the target in seconds: same tokenizer, same `forward_step` API.

A draft is a cheaper copy of the target whose greedy choices mostly agree with it:
- "bf16": the target's weights in bfloat16 (half the bytes each step reads; CPU steps are
  memory-bound, so about half the cost) — agrees with the target almost always.
- "int8": dynamic int8 quantization of every Linear (weights int8, activations quantized on the
  fly) — cheaper still, but agrees less often.
- "layers:N": the target's first N layers plus its final norm and head (an untrained early exit),
  sharing the target's tensors — free to build, rarely agrees; a baseline.
"auto" is the kind with the best measured agreement x speed. SmolLM2-135M-Instruct, fp32 target,
2 CPU threads, `python scripts/bench_draft.py --repeats 9` (greedy agreement on held-aside text /
on the target's own answer; step cost relative to the target's, batch 1 / batch 16):
    bf16       98% / 99%   0.69 / 0.94
    int8       48% / 42%   0.30 / 0.38   (per-channel int8 or fp32 head: no better, 49-50%)
    layers:10   6% /  3%   0.44 / 0.46
Every kind builds in seconds from the loaded target, so nothing is written to disk.
A user draft (any model with the same tokenizer) comes from `load_user_draft`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Callable

import torch
from torch import nn

from .llama import LlamaForCausal
from .loading import LoadedModel, load_model

DraftBuilder = Callable[[LlamaForCausal, str], LlamaForCausal]
AUTO_KIND = "bf16"   # measured best on CPU, see scripts/bench_draft.py and the module docstring


def _in_dtype(dtype: torch.dtype) -> DraftBuilder:
    def build(target: LlamaForCausal, argument: str) -> LlamaForCausal:
        _no_argument(argument)
        return copy.deepcopy(target).to(dtype)
    return build


def _dynamic_int8(target: LlamaForCausal, argument: str) -> LlamaForCausal:
    _no_argument(argument)
    if target.device.type != "cpu":
        raise ValueError("int8 drafts use CPU dynamic quantization; use 'bf16' on accelerators")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():   # torch.ao.quantization is deprecated but still works on 2.x
        warnings.simplefilter("ignore")
        draft = quantize_dynamic(copy.deepcopy(target), {nn.Linear}, dtype=torch.qint8)
    return draft


def _first_layers(target: LlamaForCausal, argument: str) -> LlamaForCausal:
    total = target.config.num_hidden_layers
    try:
        count = int(argument)
    except ValueError:
        raise ValueError(f"draft kind 'layers:N' needs an integer N, got {argument!r}") from None
    if not 1 <= count < total:
        raise ValueError(f"draft kind 'layers:N' needs 1 <= N < {total}, got {count}")
    config = dataclasses.replace(target.config, num_hidden_layers=count)
    with torch.device("meta"):
        draft = LlamaForCausal(config)
    # Share the target's tensors: building costs nothing and uses no memory.
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.layers = nn.ModuleList(list(target.model.layers)[:count])
    draft.model.norm = target.model.norm
    draft.lm_head = target.lm_head
    return draft.eval()


def _no_argument(argument: str) -> None:
    if argument:
        raise ValueError(f"this draft kind takes no ':' argument, got {argument!r}")


DRAFT_BUILDERS: dict[str, DraftBuilder] = {
    "bf16": _in_dtype(torch.bfloat16),
    "fp16": _in_dtype(torch.float16),
    "int8": _dynamic_int8,
    "layers": _first_layers,
}


def draft_kinds() -> list[str]:
    return ["auto", *DRAFT_BUILDERS]


def build_draft(target: LoadedModel, kind: str = "auto") -> LoadedModel:
    """A draft model derived from `target` (kind: auto, bf16, fp16, int8, layers:N)."""
    name, _, argument = (AUTO_KIND if kind == "auto" else kind).partition(":")
    builder = DRAFT_BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown draft kind {kind!r} (known: {draft_kinds()}, 'layers:N')")
    module = builder(target.module, argument)
    return dataclasses.replace(target, module=module, config=module.config,
                               name=f"{target.name}+draft-{name}{':' + argument if argument else ''}")


def load_user_draft(name_or_path: str, target: LoadedModel) -> LoadedModel:
    """Load a draft model from disk onto the target's device and dtype; its tokenizer must map
    text to the same ids as the target's, or its proposals would be meaningless."""
    draft = load_model(name_or_path, device=target.device, dtype=target.dtype)
    if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ValueError(f"draft {draft.name!r} does not share the tokenizer of target {target.name!r}")
    return draft

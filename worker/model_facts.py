"""What the engine reads from a loaded model: the tokens a slot can hold and the end-of-sequence ids."""

from __future__ import annotations

from typing import Any


def context_window(model: Any, limit: int) -> int:
    """Tokens per slot: the configured limit, capped by the model's position embeddings."""
    model_max = getattr(model.module.config, "max_position_embeddings", None) or limit
    return min(limit, int(model_max))


def eos_token_ids(model: Any) -> frozenset[int]:
    """End-of-sequence ids from the model config and the tokenizer (chat models often have two)."""
    ids: set[int] = set()
    configured = getattr(model.module.config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    tokenizer_eos = getattr(model.tokenizer, "eos_token_id", None)
    if tokenizer_eos is not None:
        ids.add(int(tokenizer_eos))
    return frozenset(ids)

"""Model runtime: Llama-family decoder over a slotted KV cache, loading, draft building."""

from .config import ModelConfig
from .draft import build_draft, draft_kinds, load_user_draft
from .llama import KVCache, LlamaForCausal
from .loading import DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["DEFAULT_MODEL", "KVCache", "LlamaForCausal", "LoadedModel", "ModelConfig", "build_draft",
           "draft_kinds", "load_model", "load_user_draft"]

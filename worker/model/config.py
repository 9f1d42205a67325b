"""Model hyper-parameters read from a Hugging Face `config.json`.

One dataclass covers the Llama family (Llama, SmolLM2, Mistral, Qwen2): they differ only in the
fields below (Qwen2 adds a bias to q/k/v; Mistral's sliding window is ignored because contexts
served here stay below it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from .rope import FREQUENCY_SCALINGS, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False            # q/k/v projections carry a bias (Qwen2)
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> "ModelConfig":
        """Read the fields we need; reject architectures this decoder would compute wrongly."""
        model_type = raw.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (only 'silu')")
        if raw.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        rope_theta, rope_scaling = _rope_settings(raw)
        # Qwen2 configs have no attention_bias key: their q/k/v always carry a bias.
        attention_bias = bool(raw.get("attention_bias", model_type == "qwen2"))
        eos = raw.get("eos_token_id")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rope_theta=rope_theta,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            rope_scaling=rope_scaling,
            model_type=model_type,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' own classes accept (used for tiny test models)."""
        raw = asdict(self)
        scaling = raw.pop("rope_scaling")
        if isinstance(raw["eos_token_id"], tuple):
            raw["eos_token_id"] = list(raw["eos_token_id"])
        kind = scaling.pop("kind")
        if kind == "linear":
            raw["rope_scaling"] = {"rope_type": kind, "factor": scaling["factor"]}
        elif kind != "default":
            raw["rope_scaling"] = {"rope_type": kind, **scaling}
        raw["architectures"] = [_ARCHITECTURES[self.model_type]]
        raw["hidden_act"] = "silu"
        return raw


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _rope_settings(raw: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """(theta, scaling); transformers 5 moved these into `rope_parameters`."""
    params = dict(raw.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    merged = {**dict(raw.get("rope_scaling") or {}), **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in FREQUENCY_SCALINGS:
        raise ValueError(f"rope type {kind!r} is not supported (supported: {sorted(FREQUENCY_SCALINGS)})")
    if kind == "default":
        return theta, RopeScaling()
    defaults = RopeScaling()
    return theta, RopeScaling(
        kind=kind,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(merged.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings",
                                                        defaults.original_max_position_embeddings)),
    )

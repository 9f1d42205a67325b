"""ModelConfig reads the config.json variants of the Llama family and rejects the rest clearly."""

from pathlib import Path

import pytest

from smartspec.worker.model import ModelConfig
from smartspec.worker.model.loading import display_name
from smartspec.worker.model.rope import RopeScaling

SMOLLM2_LIKE = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},   # transformers 5 layout
    "eos_token_id": 2,
}


def test_transformers5_rope_parameters_are_read():
    config = ModelConfig.from_hf_dict(SMOLLM2_LIKE)
    assert config.rope_theta == 100000.0
    assert config.rope_scaling == RopeScaling()
    assert config.tie_word_embeddings and not config.attention_bias


def test_legacy_top_level_rope_theta_and_defaults():
    raw = {k: v for k, v in SMOLLM2_LIKE.items() if k not in ("rope_parameters", "head_dim", "num_key_value_heads")}
    config = ModelConfig.from_hf_dict(raw | {"rope_theta": 5e5, "eos_token_id": [2, 7]})
    assert config.rope_theta == 5e5
    assert config.head_dim == 576 // 9
    assert config.num_key_value_heads == 9            # no GQA key: plain multi-head attention
    assert config.eos_token_id == (2, 7)


def test_qwen2_has_qkv_bias_without_saying_so():
    assert ModelConfig.from_hf_dict(SMOLLM2_LIKE | {"model_type": "qwen2"}).attention_bias
    assert not ModelConfig.from_hf_dict(SMOLLM2_LIKE | {"model_type": "qwen2", "attention_bias": False}).attention_bias


def test_rope_scaling_schemes():
    raw = SMOLLM2_LIKE | {"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}}
    assert ModelConfig.from_hf_dict(raw).rope_scaling == RopeScaling(kind="linear", factor=2.0)
    legacy = {k: v for k, v in SMOLLM2_LIKE.items() if k != "rope_parameters"} | {
        "rope_scaling": {"type": "linear", "factor": 3.0}}
    assert ModelConfig.from_hf_dict(legacy).rope_scaling.factor == 3.0
    llama3 = SMOLLM2_LIKE | {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 32.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192}}
    assert ModelConfig.from_hf_dict(llama3).rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}}, "rope type"),
    ({"num_key_value_heads": 4}, "num_key_value_heads"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_configs_are_rejected_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(SMOLLM2_LIKE | change)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}])
def test_round_trip_through_hf_dict(rope):
    config = ModelConfig.from_hf_dict(SMOLLM2_LIKE | {"rope_parameters": rope})
    assert config.rope_scaling.kind == rope["rope_type"]
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


@pytest.mark.parametrize("filename,name", [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Llama-3.2-1B-Instruct"),
    ("qwen2.5-0.5b-instruct-fp16.gguf", "qwen2.5-0.5b-instruct"),
    ("tinyllama.F16.gguf", "tinyllama"),
])
def test_gguf_display_names_drop_only_the_quantization(filename, name):
    assert display_name(Path(filename)) == name

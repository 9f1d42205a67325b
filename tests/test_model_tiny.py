"""The decoder against transformers' own implementations on tiny random-weight checkpoints.

Each test writes a real Hugging Face folder (config.json, model.safetensors, tokenizer) and loads
it through `load_model`, so loading is exercised too. Weights are drawn with a large init range so
that logits differ a lot between tokens and a wrong mask or position shows.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from smartspec.worker.model import load_model
from smartspec.worker.model.llama import LogitsRows
from tiny_model import save_word_level_tokenizer

VOCAB = 97
ATOL = 1e-4

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def write_tiny_model(folder, model_type="llama", tie=False, rope_scaling=None, seed=0):
    """Save a random 2-layer GQA model of `model_type` with a word-level tokenizer; return the HF model."""
    config_class, model_class = ARCHITECTURES[model_type]
    extra = {"sliding_window": None} if model_type == "mistral" else {}
    if rope_scaling:
        extra["rope_scaling"] = rope_scaling
    config = config_class(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=500.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, initializer_range=0.3, **extra,
    )
    torch.manual_seed(seed)
    hf_model = model_class(config).eval()
    if model_type == "qwen2":   # make the q/k/v biases matter (they start at zero)
        with torch.no_grad():
            for layer in hf_model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    hf_model.save_pretrained(folder)
    save_word_level_tokenizer(folder, VOCAB)
    return hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf_model = write_tiny_model(folder)
    return load_model(folder), hf_model


def reference_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    """transformers' logits for a whole sequence: [len(tokens), V]."""
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0]


def step(module, cache, rows):
    """One forward_step over rows = [(slot, start, new_tokens)], right-padded; -> [B, S, V]."""
    width = max(len(tokens) for _, _, tokens in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for index, (_, _, tokens) in enumerate(rows):
        input_ids[index, : len(tokens)] = torch.tensor(tokens)
    return module.forward_step(
        cache, input_ids,
        torch.tensor([slot for slot, _, _ in rows]),
        torch.tensor([start for _, start, _ in rows]),
        torch.tensor([len(tokens) for _, _, tokens in rows]),
    )


def random_tokens(count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (count,), generator=generator).tolist()


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False)])
def test_prefill_and_decode_match_transformers(tmp_path, model_type, tie):
    hf_model = write_tiny_model(tmp_path, model_type=model_type, tie=tie)
    loaded = load_model(tmp_path)
    assert loaded.config.model_type == model_type
    assert loaded.config.attention_bias == (model_type == "qwen2")
    cache = loaded.module.allocate_cache(num_slots=2, max_tokens=64)
    tokens = random_tokens(11, seed=1)
    logits = step(loaded.module, cache, [(1, 0, tokens)])[0]
    torch.testing.assert_close(logits, reference_logits(hf_model, tokens), atol=ATOL, rtol=0)
    for extra in random_tokens(3, seed=2):
        logits = step(loaded.module, cache, [(1, len(tokens), [extra])])[0, 0]
        tokens.append(extra)
        torch.testing.assert_close(logits, reference_logits(hf_model, tokens)[-1], atol=ATOL, rtol=0)


def test_rollback_then_different_tokens_matches_transformers(tiny):
    loaded, hf_model = tiny
    cache = loaded.module.allocate_cache(num_slots=1, max_tokens=64)
    prompt = random_tokens(9, seed=3)
    step(loaded.module, cache, [(0, 0, prompt)])
    step(loaded.module, cache, [(0, 9, [5, 6, 7])])          # 3 speculated tokens ...
    kept = prompt + [5]                                       # ... of which 2 are rolled back
    logits = step(loaded.module, cache, [(0, len(kept), [40, 41])])[0]
    expected = reference_logits(hf_model, kept + [40, 41])[-2:]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_mixed_batch_equals_rows_alone_and_padding_corrupts_nothing(tiny):
    loaded, hf_model = tiny
    module = loaded.module
    histories = {3: random_tokens(7, seed=4), 0: random_tokens(4, seed=5), 2: []}
    news = {3: [11], 0: [12, 13, 14], 2: random_tokens(6, seed=6)}   # decode, verify, prefill
    batched_cache = module.allocate_cache(num_slots=4, max_tokens=32)
    single_cache = module.allocate_cache(num_slots=4, max_tokens=32)
    for slot, history in histories.items():
        if history:
            step(module, batched_cache, [(slot, 0, history)])
            step(module, single_cache, [(slot, 0, history)])
    # Non-consecutive slots, different context lengths and query lengths, one forward.
    rows = [(slot, len(histories[slot]), news[slot]) for slot in (3, 0, 2)]
    batched = step(module, batched_cache, rows)
    for index, (slot, start, tokens) in enumerate(rows):
        alone = step(module, single_cache, [(slot, start, tokens)])[0]
        torch.testing.assert_close(batched[index, : len(tokens)], alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(alone, reference_logits(hf_model, histories[slot] + tokens)[-len(tokens):],
                                   atol=ATOL, rtol=0)
    # The padded rows wrote nothing their slots use later: one more step per row matches transformers.
    follow = [(slot, len(histories[slot]) + len(news[slot]), [20 + slot]) for slot in (3, 0, 2)]
    logits = step(module, batched_cache, follow)
    for index, (slot, _, tokens) in enumerate(follow):
        expected = reference_logits(hf_model, histories[slot] + news[slot] + tokens)[-1]
        torch.testing.assert_close(logits[index, 0], expected, atol=ATOL, rtol=0)


def test_consecutive_and_scattered_slots_agree(tiny):
    loaded, _ = tiny
    module = loaded.module
    prompts = [random_tokens(5, seed=7), random_tokens(8, seed=8)]
    outputs = []
    for slots in ((0, 1), (3, 1)):                   # a view of the cache vs a gathered copy
        cache = module.allocate_cache(num_slots=4, max_tokens=32)
        step(module, cache, [(slots[0], 0, prompts[0]), (slots[1], 0, prompts[1])])
        outputs.append(step(module, cache, [(slots[0], 5, [9]), (slots[1], 8, [10])]))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=0)


def test_logits_rows_last_picks_each_rows_last_real_token(tiny):
    loaded, _ = tiny
    module = loaded.module
    rows = [(0, 0, random_tokens(6, seed=9)), (1, 0, random_tokens(2, seed=10))]
    full = step(module, module.allocate_cache(2, 16), rows)
    cache = module.allocate_cache(2, 16)
    input_ids = torch.zeros(2, 6, dtype=torch.long)
    input_ids[0], input_ids[1, :2] = torch.tensor(rows[0][2]), torch.tensor(rows[1][2])
    last = module.forward_step(cache, input_ids, torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([6, 2]),
                               logits_rows="last")
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last[:, 0], torch.stack([full[0, 5], full[1, 1]]), atol=1e-5, rtol=0)


def test_logits_rows_takes_the_enum_or_its_string_and_names_a_bad_one(tiny):
    loaded, _ = tiny
    module = loaded.module
    arguments = (torch.tensor([[3, 4, 5]]), torch.tensor([0]), torch.tensor([0]), torch.tensor([3]))
    by_enum = module.forward_step(module.allocate_cache(1, 8), *arguments, logits_rows=LogitsRows.PACKED)
    by_string = module.forward_step(module.allocate_cache(1, 8), *arguments, logits_rows="packed")
    padded = module.forward_step(module.allocate_cache(1, 8), *arguments, logits_rows=LogitsRows.ALL)
    assert by_enum.shape == (3, VOCAB)
    torch.testing.assert_close(by_enum, by_string, atol=0, rtol=0)
    torch.testing.assert_close(padded[0], by_enum, atol=0, rtol=0)
    with pytest.raises(ValueError, match="logits_rows"):
        module.forward_step(module.allocate_cache(1, 8), *arguments, logits_rows="first")


def test_packed_logits_of_very_uneven_rows_equal_per_row_forwards(tiny):
    """A decode row (1 token) beside a 12-token verify row: packed [N, V] logits, row after row,
    equal each row's own forward, and the padded [B, S, V] output is zero past each row's length."""
    loaded, hf_model = tiny
    module = loaded.module
    histories = {0: random_tokens(5, seed=11), 1: random_tokens(3, seed=12), 2: random_tokens(9, seed=13)}
    news = {0: [7], 1: random_tokens(12, seed=14), 2: [8, 9]}
    caches = {name: module.allocate_cache(num_slots=3, max_tokens=32) for name in ("packed", "padded", "alone")}
    for cache in caches.values():
        for slot, history in histories.items():
            step(module, cache, [(slot, 0, history)])
    rows = [(slot, len(histories[slot]), news[slot]) for slot in (0, 1, 2)]
    width = max(len(tokens) for _, _, tokens in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for index, (_, _, tokens) in enumerate(rows):
        input_ids[index, : len(tokens)] = torch.tensor(tokens)
    lengths = torch.tensor([len(tokens) for _, _, tokens in rows])
    packed = module.forward_step(caches["packed"], input_ids, torch.tensor([0, 1, 2]),
                                 torch.tensor([start for _, start, _ in rows]), lengths, logits_rows="packed")
    assert packed.shape == (int(lengths.sum()), VOCAB)
    padded = step(module, caches["padded"], rows)
    offset = 0
    for index, (slot, start, tokens) in enumerate(rows):
        alone = step(module, caches["alone"], [(slot, start, tokens)])[0]                # [len, V]
        mine = packed[offset : offset + len(tokens)]
        offset += len(tokens)
        torch.testing.assert_close(mine, alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(padded[index, : len(tokens)], alone, atol=ATOL, rtol=0)
        assert not padded[index, len(tokens):].any()
        torch.testing.assert_close(alone, reference_logits(hf_model, histories[slot] + tokens)[-len(tokens):],
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "linear", "factor": 4.0},
    # head_dim 8 has wavelengths ~6..220: original context 64 puts them in all three llama3 bands
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_scaling_matches_transformers(tmp_path, rope_scaling):
    hf_model = write_tiny_model(tmp_path, rope_scaling=rope_scaling)
    loaded = load_model(tmp_path)
    assert loaded.config.rope_scaling.kind == rope_scaling["rope_type"]
    assert loaded.config.rope_scaling.factor == rope_scaling["factor"]
    tokens = random_tokens(20, seed=12)
    logits = step(loaded.module, loaded.module.allocate_cache(1, 32), [(0, 0, tokens)])[0]
    torch.testing.assert_close(logits, reference_logits(hf_model, tokens), atol=ATOL, rtol=0)


def test_bfloat16_stays_close_to_float32(tiny):
    loaded, _ = tiny
    low = load_model(loaded.path, dtype=torch.bfloat16)
    assert low.module.dtype == torch.bfloat16
    tokens = random_tokens(12, seed=13)
    high_logits = step(loaded.module, loaded.module.allocate_cache(1, 16), [(0, 0, tokens)])[0]
    low_logits = step(low.module, low.module.allocate_cache(1, 16), [(0, 0, tokens)])[0]
    assert low_logits.dtype == torch.float32
    spread = high_logits.abs().max()
    assert (low_logits - high_logits).abs().max() < 0.1 * spread   # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("change,field", [
    (dict(query_lengths=[0]), "query_lengths"),
    (dict(query_lengths=[3]), "query_lengths"),
    (dict(start_positions=[15]), "cache"),
    (dict(slots=[5]), "slots"),
])
def test_bad_step_arguments_raise_value_error_naming_the_field(tiny, change, field):
    loaded, _ = tiny
    arguments = dict(slots=[0], start_positions=[0], query_lengths=[2]) | change
    with pytest.raises(ValueError, match=field):
        loaded.module.forward_step(loaded.module.allocate_cache(2, 16), torch.tensor([[1, 2]]),
                                   *(torch.tensor(arguments[name]) for name in ("slots", "start_positions",
                                                                                 "query_lengths")))


def test_duplicate_slots_rejected(tiny):
    loaded, _ = tiny
    with pytest.raises(ValueError, match="slots"):
        loaded.module.forward_step(loaded.module.allocate_cache(2, 16), torch.tensor([[1], [2]]),
                                   torch.tensor([1, 1]), torch.tensor([0, 0]), torch.tensor([1, 1]))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="known name"):
        load_model(tmp_path / "no-such-model")


def test_float64_batched_rows_agree_to_rounding_error(tiny):
    """In float64 (norms, RoPE and logits stay float64) padded, batched and cached forwards agree with
    one plain forward to ~1e-12; the proposer tests rely on that."""
    loaded, hf_model = tiny
    module = load_model(loaded.path, dtype=torch.float64).module
    first, second = random_tokens(12, seed=14), random_tokens(5, seed=15)
    plain = step(module, module.allocate_cache(1, 16), [(0, 0, first)])[0]
    assert plain.dtype == torch.float64
    cache = module.allocate_cache(2, 16)
    step(module, cache, [(1, 0, first[:9])])
    batched = step(module, cache, [(0, 0, second), (1, 9, first[9:])])
    torch.testing.assert_close(batched[1, :3], plain[9:], atol=1e-12, rtol=0)
    # transformers normalises in float32 even for float64 weights, hence the looser bound.
    torch.testing.assert_close(plain, reference_logits(hf_model.double(), first).double(), atol=1e-4, rtol=0)
    hf_model.float()

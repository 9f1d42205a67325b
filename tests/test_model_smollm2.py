"""The shipped default model end to end: GGUF -> cached safetensors folder -> this decoder,
checked against transformers' LlamaForCausalLM on the same converted weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from smartspec.worker.model import DEFAULT_MODEL, load_model
from smartspec.worker.model.loading import INFO_FILE, resolve_folder

pytestmark = pytest.mark.slow

ATOL = 1e-3   # fp32, 30 layers: summation order differs from transformers' kernels


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model(DEFAULT_MODEL)
    hf_model = AutoModelForCausalLM.from_pretrained(str(loaded.path), dtype=torch.float32).eval()
    return loaded, hf_model


def chat_prompt(loaded, text: str) -> list[int]:
    encoded = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                   add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def reference(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0]                  # [S, V]


def test_conversion_is_cached_and_names_the_model(smollm2):
    loaded, _ = smollm2
    assert loaded.name == "SmolLM2-135M-Instruct"
    assert (loaded.path / INFO_FILE).is_file() and (loaded.path / "model.safetensors").is_file()
    weights_mtime = (loaded.path / "model.safetensors").stat().st_mtime_ns
    assert resolve_folder("smollm2") == loaded.path                       # short names share one cache entry
    assert (loaded.path / "model.safetensors").stat().st_mtime_ns == weights_mtime   # not rewritten
    assert not list(loaded.path.parent.glob(f".tmp-{loaded.path.name}-*"))
    assert loaded.config.tie_word_embeddings
    assert loaded.module.lm_head.weight.data_ptr() == loaded.module.model.embed_tokens.weight.data_ptr()


def test_chat_template_survives_conversion(smollm2):
    loaded, _ = smollm2
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                                add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nHello there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_logits_match_transformers_through_decode_and_rollback(smollm2):
    loaded, hf_model = smollm2
    module = loaded.module
    prompt = chat_prompt(loaded, "Name three prime numbers.")
    cache = module.allocate_cache(num_slots=3, max_tokens=128)
    slot = torch.tensor([2])

    def feed(start: int, tokens: list[int]) -> torch.Tensor:
        return module.forward_step(cache, torch.tensor([tokens]), slot, torch.tensor([start]),
                                   torch.tensor([len(tokens)]))[0]

    logits = feed(0, prompt)
    torch.testing.assert_close(logits, reference(hf_model, prompt), atol=ATOL, rtol=0)
    sequence = list(prompt)
    for _ in range(3):                                                       # plain decode steps
        sequence.append(int(logits[-1].argmax()))
        logits = feed(len(sequence) - 1, sequence[-1:])
    speculated = [100, 200, 300]
    feed(len(sequence), speculated)                                          # feed 3 ...
    sequence.append(speculated[0])                                           # ... keep 1, roll back 2
    replacement = [400, 500]
    logits = feed(len(sequence), replacement)
    expected = reference(hf_model, sequence + replacement)[-2:]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_batched_greedy_generation_equals_transformers_generate(smollm2):
    loaded, hf_model = smollm2
    module = loaded.module
    prompts = [chat_prompt(loaded, "What is the capital of France?"), chat_prompt(loaded, "Say hi.")]
    new_tokens = 12
    cache = module.allocate_cache(num_slots=2, max_tokens=96)
    width = max(map(len, prompts))
    input_ids = torch.zeros(2, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt)] = torch.tensor(prompt)
    lengths = torch.tensor([len(p) for p in prompts])
    logits = module.forward_step(cache, input_ids, torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long),
                                 lengths, logits_rows="last")
    generated: list[list[int]] = [[], []]
    for step in range(new_tokens):
        next_tokens = logits[:, 0].argmax(-1)                               # [2]
        for row in range(2):
            generated[row].append(int(next_tokens[row]))
        logits = module.forward_step(cache, next_tokens[:, None], torch.tensor([0, 1]), lengths + step,
                                     torch.ones(2, dtype=torch.long))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                                         pad_token_id=0)[0, len(prompt):].tolist()
        assert len(expected) >= 3
        assert generated[row][: len(expected)] == expected   # generate() stops at the end-of-sequence token


def test_concurrent_first_conversions_agree_on_one_folder(tmp_path, smollm2):
    """Two loaders converting the same GGUF at once: both get the same complete folder."""
    loaded, _ = smollm2
    from concurrent.futures import ThreadPoolExecutor

    from smartspec.worker.model.loading import KNOWN_MODELS, convert_gguf

    gguf_path = KNOWN_MODELS["smollm2"].path()
    with ThreadPoolExecutor(max_workers=2) as pool:
        folders = list(pool.map(lambda _: convert_gguf(gguf_path, tmp_path), range(2)))
    assert folders[0] == folders[1] and folders[0].parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [folders[0].name]         # no staging dirs left
    fresh = load_model(folders[0])
    for (name, ours), (_, theirs) in zip(fresh.module.state_dict().items(), loaded.module.state_dict().items()):
        assert torch.equal(ours, theirs), name


def test_gguf_metadata_holds_the_same_chat_template(smollm2):
    loaded, _ = smollm2
    from smartspec.worker.model.loading import KNOWN_MODELS, gguf_chat_template

    assert gguf_chat_template(KNOWN_MODELS["smollm2"].path()) == loaded.tokenizer.chat_template

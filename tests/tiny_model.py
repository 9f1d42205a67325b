"""A tiny random Llama checkpoint for tests that need a real worker but not a real model's text.

2 layers, hidden 64, a word-level tokenizer ("t5" -> token 5, eos "t1"), a toy chat template;
small init so greedy text falls into repeats that prompt lookup finds (speculation is accepted).
Written as a real Hugging Face folder and loaded through `load_model`, so it serves like any model.
"""

from __future__ import annotations

VOCAB = 128
CHAT_TEMPLATE = ("{% for m in messages %}t2 {{ m['content'] }} t3 {% endfor %}"
                 "{% if add_generation_prompt %}t4{% endif %}")


def write_tiny_model(folder, seed: int = 1, max_positions: int = 256):
    """Save the checkpoint into `folder` and return it loaded (`smartspec.worker.model.load_model`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from smartspec.worker.model import load_model

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_positions,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    save_word_level_tokenizer(folder, VOCAB, CHAT_TEMPLATE)
    return load_model(folder)


def save_word_level_tokenizer(folder, vocab_size: int, chat_template: str | None = None) -> None:
    """"t5" -> token 5 for t0 .. t{vocab_size - 2}, "<unk>" last, eos "t1"; saved as a HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"<unk>": vocab_size - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="t1")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)

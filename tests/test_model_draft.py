"""Drafts derived from the target: what each kind computes, and that the target is left alone."""

from __future__ import annotations

import pytest
import torch
from torch.ao.nn.quantized import dynamic as quantized_dynamic
from transformers import AutoModelForCausalLM

from smartspec.worker.model import DEFAULT_MODEL, build_draft, load_model, load_user_draft
from test_model_tiny import VOCAB, random_tokens, reference_logits, step, write_tiny_model


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-target")
    write_tiny_model(folder, seed=3)
    return load_model(folder)


def prefill_logits(model, tokens):
    return step(model.module, model.module.allocate_cache(1, 32), [(0, 0, tokens)])[0]     # [S, V]


def test_early_exit_draft_is_the_first_layers_of_the_target(tiny_target):
    draft = build_draft(tiny_target, "layers:1")
    assert draft.config.num_hidden_layers == 1
    assert draft.module.allocate_cache(1, 8).k.shape[0] == 1
    # Shares the target's tensors rather than copying them.
    assert draft.module.model.layers[0].mlp.gate_up_proj.weight.data_ptr() == \
        tiny_target.module.model.layers[0].mlp.gate_up_proj.weight.data_ptr()
    one_layer = AutoModelForCausalLM.from_pretrained(str(tiny_target.path), num_hidden_layers=1).eval()
    tokens = random_tokens(10, seed=20)
    torch.testing.assert_close(prefill_logits(draft, tokens), reference_logits(one_layer, tokens), atol=1e-4, rtol=0)
    assert not torch.allclose(prefill_logits(draft, tokens), prefill_logits(tiny_target, tokens), atol=1e-2)


def test_bf16_draft_is_a_separate_low_precision_copy(tiny_target):
    draft = build_draft(tiny_target, "bf16")
    assert draft.module.dtype == torch.bfloat16 and tiny_target.module.dtype == torch.float32
    assert draft.tokenizer is tiny_target.tokenizer
    tokens = random_tokens(10, seed=21)
    target_logits, draft_logits = prefill_logits(tiny_target, tokens), prefill_logits(draft, tokens)
    assert 0 < (draft_logits - target_logits).abs().max() < 0.1 * target_logits.abs().max()


def test_int8_draft_quantizes_every_linear_and_leaves_the_target_alone(tiny_target):
    draft = build_draft(tiny_target, "int8")
    linears = [m for m in draft.module.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in draft.module.modules() if isinstance(m, quantized_dynamic.Linear)]
    assert len(quantized) == 2 * 4 + 1 and not [m for m in linears if type(m) is torch.nn.Linear]
    assert all(type(m) is torch.nn.Linear for m in tiny_target.module.modules() if isinstance(m, torch.nn.Linear))
    tokens = random_tokens(10, seed=22)
    target_logits, draft_logits = prefill_logits(tiny_target, tokens), prefill_logits(draft, tokens)
    assert 0 < (draft_logits - target_logits).abs().max() < 0.25 * target_logits.abs().max()


@pytest.mark.parametrize("kind", ["int4", "layers", "layers:0", "layers:2", "layers:x", "bf16:3"])
def test_bad_draft_kinds_are_rejected(tiny_target, kind):
    with pytest.raises(ValueError, match="draft kind"):
        build_draft(tiny_target, kind)


def test_a_user_draft_from_a_folder_runs_with_the_same_api(tmp_path, tiny_target):
    write_tiny_model(tmp_path, seed=9)            # another model with the same tokenizer
    user_draft = load_user_draft(str(tmp_path), tiny_target)
    assert user_draft.tokenizer("t5 t6").input_ids == tiny_target.tokenizer("t5 t6").input_ids
    assert prefill_logits(user_draft, [5, 6]).shape == (2, VOCAB)


def test_a_user_draft_with_another_tokenizer_is_refused(tmp_path, tiny_target):
    write_tiny_model(tmp_path, seed=9)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    tokenizer.add_tokens(["an-extra-word"])
    tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="tokenizer"):
        load_user_draft(str(tmp_path), tiny_target)


@pytest.mark.slow
def test_default_draft_agrees_with_smollm2_most_of_the_time():
    target = load_model(DEFAULT_MODEL)
    draft = build_draft(target)                   # auto
    text = ("A heap is a binary tree for which every parent node has a value less than or equal to any "
            "of its children. This implementation uses arrays for which heap[k] <= heap[2*k+1] and "
            "heap[k] <= heap[2*k+2] for all k, counting elements from zero.")
    tokens = target.tokenizer(text).input_ids
    agree = (prefill_logits_long(draft, tokens).argmax(-1) == prefill_logits_long(target, tokens).argmax(-1))
    assert agree.float().mean() >= 0.9


def prefill_logits_long(model, tokens):
    cache = model.module.allocate_cache(1, len(tokens))
    return model.module.forward_step(cache, torch.tensor([tokens]), torch.tensor([0]), torch.tensor([0]),
                                     torch.tensor([len(tokens)]))[0]

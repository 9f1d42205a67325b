"""Benchmark datasets: deterministic per seed, built from real text on this machine, sized for a CPU."""

import ast
import itertools
import re
from pathlib import Path

import pytest

from smartspec.bench.datasets import (CHARS_PER_TOKEN_CODE, CHARS_PER_TOKEN_TEXT, MTE_TURNS, NO_REPEAT_CODE,
                                      NO_REPEAT_PROSE, TEMPLATED_INSTRUCTION, load_dataset, names)

PATH_IN_SOURCE = re.compile(r"\((/[^:)]+\.py)(?::(\d+))?\)")
FENCED = re.compile(r"```python\n(.*?)\n```", re.S)
REPEATING = ("multi-turn-edit", "templated", "no-repeat")


@pytest.mark.parametrize("name", names())
def test_same_seed_same_prompts_other_seed_other_prompts(name):
    a = load_dataset(name, 12, seed=4)
    b = load_dataset(name, 12, seed=4)
    c = load_dataset(name, 12, seed=5)
    assert a.prompts == b.prompts
    assert [p.messages for p in a.prompts] != [p.messages for p in c.prompts]
    assert a.provenance and a.meta()["prompts"] == 12
    assert all(p.messages[-1][0] == "user" and p.max_tokens > 0 and p.source and p.kind for p in a.prompts)


def assert_quotes_stdlib_function(code: str, source: str) -> None:
    path, line = PATH_IN_SOURCE.search(source).groups()
    source_lines = Path(path).read_text(encoding="utf-8").splitlines()
    assert source_lines[int(line) - 1] == code.splitlines()[0]  # the def line sits where the source says
    assert code in "\n".join(source_lines)


def documentation_on_disk(source: str) -> str:
    """The pydoc topic or module docstring a prompt's `source` names, read afresh."""
    from pydoc_data.topics import topics

    if source.startswith("pydoc topic"):
        return topics[re.search(r"'([^']+)'", source).group(1)].strip()
    return ast.get_docstring(ast.parse(Path(PATH_IN_SOURCE.search(source).group(1)).read_text(encoding="utf-8")))


def test_code_edit_prompts_quote_real_stdlib_source():
    ds = load_dataset("code-edit", 8, seed=1)
    for prompt in ds.prompts:
        assert_quotes_stdlib_function(FENCED.search(prompt.messages[0][1]).group(1), prompt.source)
        assert 100 <= prompt.approx_prompt_tokens <= 450


def test_summarise_passages_come_from_docs_on_disk():
    ds = load_dataset("summarise", 20, seed=2)
    for prompt in ds.prompts:
        assert prompt.messages[0][1].split("\n\n", 1)[1] in documentation_on_disk(prompt.source)
        assert 100 <= prompt.approx_prompt_tokens <= 450


def test_chat_topics_name_real_modules():
    ds = load_dataset("chat", 10, seed=0)
    for prompt in ds.prompts:
        module = re.search(r"`(\w+)` module", prompt.messages[0][1]).group(1)
        assert Path(PATH_IN_SOURCE.search(prompt.source).group(1)).stem == module


def test_mixed_interleaves_summaries_and_chat():
    kinds = [p.kind for p in load_dataset("mixed", 10, seed=3).prompts]
    assert kinds == ["summarise", "chat"] * 5


def test_more_prompts_than_sources_cycles_and_unknown_name_fails():
    assert len(load_dataset("chat", 500, seed=0).prompts) == 500
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("sharegpt", 3)
    assert set(names()) == {"summarise", "code-edit", "chat", "mixed", "multi-turn-edit", "templated", "no-repeat"}


# --- the sets that repeat themselves across requests, and their control ----------------------

def file_text(prompt) -> str:
    """The file as a multi-turn-edit request sees it: the last ```python block of its messages."""
    return FENCED.findall("\n".join(content for _, content in prompt.messages))[-1]


@pytest.mark.parametrize("max_prompt_tokens", [400, 250])
def test_multi_turn_edit_resends_the_previous_turns_file_in_turn_order(max_prompt_tokens):
    prompts = load_dataset("multi-turn-edit", 14, seed=2, max_prompt_tokens=max_prompt_tokens).prompts
    turns = [tuple(map(int, re.fullmatch(r"mte-(\d+)-t(\d+)", p.prompt_id).groups())) for p in prompts]
    assert turns == [(i // MTE_TURNS, i % MTE_TURNS + 1) for i in range(14)]  # whole conversations, turns in order
    trimmed = 0
    for (_, turn), prompt, previous in zip(turns, prompts, [None, *prompts]):
        roles = [role for role, _ in prompt.messages]
        assert roles[0] == "system" and roles[-1] == "user" and prompt.kind == "multi-turn-edit"
        if turn == 1:
            assert roles == ["system", "user"]
            assert_quotes_stdlib_function(file_text(prompt), prompt.source)
            continue
        assert prompt.source == previous.source
        assert file_text(previous) in FENCED.findall("\n".join(c for _, c in prompt.messages))  # verbatim, whole
        assert roles[-2] == "assistant" and FENCED.fullmatch(prompt.messages[-2][1]).group(1) == file_text(prompt)
        assert file_text(prompt) != file_text(previous)  # the previous turn's edit was applied
        trimmed += len(prompt.messages) < 2 * turn
    assert trimmed  # some histories were cut to fit, and the checks above held on those too


def test_templated_repeats_one_instruction_over_distinct_documents():
    prompts = load_dataset("templated", 30, seed=0).prompts
    for prompt in prompts:
        instruction, document = prompt.messages[0][1].split("\n\n", 1)
        assert instruction == TEMPLATED_INSTRUCTION and prompt.kind == "templated"
        assert document in documentation_on_disk(prompt.source)
    documents = {p.messages[0][1].split("\n\n", 1)[1] for p in prompts}
    assert len(documents) == len({p.source for p in prompts}) == 30


def template_of(content: str) -> str:
    """The one no-repeat template a request was made from: its text around {material}."""
    matches = [t for t in NO_REPEAT_PROSE + NO_REPEAT_CODE
               if content.startswith(t.split("{material}")[0]) and content.endswith(t.split("{material}")[1])]
    assert len(matches) == 1, content[:80]
    return matches[0]


def three_word_runs(template: str) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", template.replace("{material}", " ").lower())
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}


def test_no_repeat_shares_no_template_no_source_and_no_three_word_run():
    """The control, defined: a request's template is its text with the material (passage or fenced
    function) left out. No two requests share a template; no two templates share a run of three
    words; no two requests quote the same pydoc topic or the same module."""
    templates = NO_REPEAT_PROSE + NO_REPEAT_CODE
    prompts = load_dataset("no-repeat", len(templates), seed=0).prompts
    used = [template_of(p.messages[0][1]) for p in prompts]
    assert len(set(used)) == len(templates)
    for a, b in itertools.combinations(templates, 2):
        assert not three_word_runs(a) & three_word_runs(b), (a, b)
    origins = [p.source.split(" (")[0].split(":")[0] for p in prompts]  # "pydoc topic 'NAME'" or the module
    assert len(set(origins)) == len(prompts)
    assert {p.kind for p in prompts} == {"no-repeat"}
    with pytest.raises(ValueError, match="would repeat one"):
        load_dataset("no-repeat", len(templates) + 1)


@pytest.mark.parametrize("name", REPEATING)
@pytest.mark.parametrize("band", [(100, 400), (100, 250), (150, 400)])
def test_repeating_sets_stay_in_the_size_band(name, band):
    low, high = band
    for prompt in load_dataset(name, 24, seed=1, min_prompt_tokens=low, max_prompt_tokens=high).prompts:
        chars = sum(len(content) for _, content in prompt.messages)
        per_token = CHARS_PER_TOKEN_CODE if any("```python" in c for _, c in prompt.messages) else CHARS_PER_TOKEN_TEXT
        assert prompt.approx_prompt_tokens == int(chars / per_token)
        assert low <= prompt.approx_prompt_tokens <= high


@pytest.mark.parametrize("name", REPEATING)
@pytest.mark.parametrize("n", [1, 7, 13])
def test_repeating_sets_honour_the_count(name, n):
    assert len(load_dataset(name, n, seed=3).prompts) == n


@pytest.mark.parametrize("name", ["templated", "multi-turn-edit"])
def test_repeating_sets_cycle_past_their_sources(name):
    assert len(load_dataset(name, 300, seed=0).prompts) == 300

"""Benchmark datasets: deterministic per seed, built from real text on this machine, sized for a CPU."""

import ast
import re
from pathlib import Path

import pytest

from smartspec.bench.datasets import load_dataset, names

PATH_IN_SOURCE = re.compile(r"\((/[^:)]+\.py)(?::(\d+))?\)")


@pytest.mark.parametrize("name", ["summarise", "code-edit", "chat", "mixed"])
def test_same_seed_same_prompts_other_seed_other_prompts(name):
    a = load_dataset(name, 12, seed=4)
    b = load_dataset(name, 12, seed=4)
    c = load_dataset(name, 12, seed=5)
    assert a.prompts == b.prompts
    assert [p.messages for p in a.prompts] != [p.messages for p in c.prompts]
    assert a.provenance and a.meta()["prompts"] == 12
    assert all(p.messages[-1][0] == "user" and p.max_tokens > 0 for p in a.prompts)


def test_code_edit_prompts_quote_real_stdlib_source():
    ds = load_dataset("code-edit", 8, seed=1)
    for prompt in ds.prompts:
        path, line = PATH_IN_SOURCE.search(prompt.source).groups()
        source_lines = Path(path).read_text(encoding="utf-8").splitlines()
        code = prompt.messages[0][1].split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        first = code.splitlines()[0]
        assert source_lines[int(line) - 1] == first  # the def line sits where the source says
        assert code in "\n".join(source_lines)
        assert 100 <= prompt.approx_prompt_tokens <= 450


def test_summarise_passages_come_from_docs_on_disk():
    from pydoc_data.topics import topics

    ds = load_dataset("summarise", 20, seed=2)
    for prompt in ds.prompts:
        passage = prompt.messages[0][1].split("\n\n", 1)[1]
        match = PATH_IN_SOURCE.search(prompt.source)
        if prompt.source.startswith("pydoc topic"):
            name = re.search(r"'([^']+)'", prompt.source).group(1)
            assert passage in topics[name].strip()
        else:
            module_doc = ast.get_docstring(ast.parse(Path(match.group(1)).read_text(encoding="utf-8")))
            assert passage in module_doc
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
    assert set(names()) == {"summarise", "code-edit", "chat", "mixed"}

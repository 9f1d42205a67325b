"""Benchmark prompt sets built from text already on the machine, written by no one on this project.

Why these: speculation pays when the answer re-uses the prompt (summaries quote, refactors copy code)
and does not when the answer is free text (chat). So we build three sets that span that range:

- `summarise`: summarise/rewrite a passage of the Python documentation (the language reference
  topics shipped in `pydoc_data.topics`, and module docstrings read from the standard library's
  source files).
- `code-edit`: edit a function from the standard library's own source (read with `ast`, the same
  text `inspect.getsource` returns, without importing the module).
- `chat`: open-ended questions. No instruction/chat dataset is available offline on this machine
  (no pip package in reach ships one), so the questions are built from templates around topics taken
  from the standard library's module synopses; the answers are free text the prompt cannot predict.
- `mixed`: summarise and chat interleaved in one stream.

Every prompt records its source (module, function, file and line); every dataset records where it
comes from. Same name + seed + count (+ Python installation) -> the same prompts.
"""

from __future__ import annotations

import ast
import functools
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Rough characters per token for the SmolLM2 tokenizer on English prose and on Python code; used
# only to size prompts into the 100-400 token band without loading a tokenizer.
CHARS_PER_TOKEN_TEXT = 4.2
CHARS_PER_TOKEN_CODE = 3.2


@dataclass(frozen=True)
class Prompt:
    """One benchmark request: chat messages (the worker applies the chat template)."""

    prompt_id: str
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...)
    max_tokens: int
    source: str  # where the text came from: "module:function (path:line)" or "pydoc topic NAME"
    approx_prompt_tokens: int
    kind: str  # dataset the prompt belongs to: summarise, code-edit, chat

    def as_message_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class Dataset:
    name: str
    provenance: str  # what the text is and where it was read from
    seed: int
    prompts: tuple[Prompt, ...] = field(default_factory=tuple)

    def meta(self) -> dict[str, object]:
        return {"name": self.name, "provenance": self.provenance, "seed": self.seed,
                "prompts": len(self.prompts)}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources() -> list[tuple[str, Path]]:
    """(module name, file) for top-level pure-Python stdlib modules, sorted (stable order)."""
    root = stdlib_dir()
    out = []
    for path in sorted(root.glob("*.py")):
        name = path.stem
        if name.startswith("_") or name in ("this", "antigravity", "__phello__"):
            continue
        out.append((name, path))
    return out


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> tuple[ast.Module, str] | None:
    """(tree, text) of a source file, parsed once per process."""
    try:
        text = path.read_text(encoding="utf-8")
        return ast.parse(text), text
    except (SyntaxError, UnicodeDecodeError, OSError):
        return None


def _module_docstring(path: Path) -> str | None:
    parsed = _parse(path)
    return ast.get_docstring(parsed[0]) if parsed else None


def _trim(text: str, max_chars: int) -> str:
    """Cut at a paragraph (else line) boundary at or before max_chars."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    if cut < max_chars // 2:
        cut = text.rfind("\n", 0, max_chars)
    if cut < max_chars // 2:
        cut = max_chars
    return text[:cut].rstrip()


# --- summarise ---------------------------------------------------------------------------------

SUMMARISE_TASKS = (
    "Summarise the following documentation in three sentences.",
    "Rewrite the following documentation as a short bulleted list of its key points.",
    "Rewrite the following documentation in plain language for a beginner, keeping it short.",
    "Give a one-paragraph summary of the following text.",
)


def _documentation_passages() -> list[tuple[str, str]]:
    """(source, text) passages: pydoc language-reference topics and module docstrings."""
    passages: list[tuple[str, str]] = []
    try:
        from pydoc_data.topics import topics  # the language reference, as shipped with Python
    except ImportError:  # pragma: no cover - stripped Python installations
        topics = {}
    for name in sorted(topics):
        passages.append((f"pydoc topic {name!r} (pydoc_data/topics.py)", topics[name].strip()))
    for module, path in _stdlib_sources():
        doc = _module_docstring(path)
        if doc:
            passages.append((f"{module} module docstring ({path})", doc.strip()))
    return passages


def _summarise(n: int, rng: random.Random, max_tokens: int, min_tokens: int, max_prompt_tokens: int) -> list[Prompt]:
    min_chars = int(min_tokens * CHARS_PER_TOKEN_TEXT)
    max_chars = int(max_prompt_tokens * CHARS_PER_TOKEN_TEXT)
    pool = [(src, _trim(text, max_chars)) for src, text in _documentation_passages()]
    pool = [(src, text) for src, text in pool if len(text) >= min_chars]
    picks = _pick(pool, n, rng)
    prompts = []
    for i, (src, text) in enumerate(picks):
        task = rng.choice(SUMMARISE_TASKS)
        content = f"{task}\n\n{text}"
        prompts.append(Prompt(f"summarise-{i}", (("user", content),), max_tokens, src,
                              int(len(content) / CHARS_PER_TOKEN_TEXT), "summarise"))
    return prompts


# --- code-edit ---------------------------------------------------------------------------------

CODE_EDIT_TASKS = (
    "Add type hints to this function. Return the whole function.",
    "Rename the local variables in this function to clearer names. Return the whole function.",
    "Add a docstring and comments to this function. Return the whole function.",
    "Refactor this function to be easier to read without changing its behaviour. Return the whole function.",
    "Rewrite this function so that it raises ValueError on invalid input. Return the whole function.",
)


@functools.lru_cache(maxsize=8)
def _stdlib_functions(min_chars: int, max_chars: int) -> list[tuple[str, str]]:
    """(source, code) for stdlib functions/methods whose source fits the size band."""
    out = []
    for module, path in _stdlib_sources():
        parsed = _parse(path)
        if parsed is None:
            continue
        tree, text = parsed
        lines = text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                # whole lines from `def` to the end: the text inspect.getsource gives
                code = "\n".join(lines[node.lineno - 1:node.end_lineno])
                if min_chars <= len(code) <= max_chars:
                    out.append((f"{module}:{node.name} ({path}:{node.lineno})", code))
    out.sort(key=lambda item: item[0])
    return out


def _code_edit(n: int, rng: random.Random, max_tokens: int, min_tokens: int, max_prompt_tokens: int) -> list[Prompt]:
    pool = _stdlib_functions(int(min_tokens * CHARS_PER_TOKEN_CODE), int(max_prompt_tokens * CHARS_PER_TOKEN_CODE))
    picks = _pick(pool, n, rng)
    prompts = []
    for i, (src, code) in enumerate(picks):
        task = rng.choice(CODE_EDIT_TASKS)
        content = f"{task}\n\n```python\n{code}\n```"
        prompts.append(Prompt(f"code-edit-{i}", (("user", content),), max_tokens, src,
                              int(len(content) / CHARS_PER_TOKEN_CODE), "code-edit"))
    return prompts


# --- chat --------------------------------------------------------------------------------------

CHAT_TEMPLATES = (
    "I keep hearing about {topic}. Why would anyone care about it, and what would you tell a friend who is curious?",
    "Write a short story in which a programmer discovers something surprising about {topic}.",
    "What are the trade-offs someone should think about before relying on {topic}? Answer in your own words.",
    "Explain what {topic} is for to a ten-year-old, using an everyday analogy.",
    "If you were designing {topic} from scratch today, what would you do differently, and why?",
    "Tell me about the history behind {topic}: why do you think it was created?",
    "Write a friendly email inviting a colleague to a talk about {topic}.",
)


def _chat_topics() -> list[tuple[str, str]]:
    """(source, topic) from stdlib module synopses: 'json' -> 'JSON (JavaScript Object Notation)...'."""
    out = []
    for module, path in _stdlib_sources():
        doc = _module_docstring(path)
        if not doc:
            continue
        synopsis = doc.strip().splitlines()[0].strip().rstrip(".")
        if 12 <= len(synopsis) <= 90 and not synopsis.lower().startswith("usage"):
            out.append((f"{module} module synopsis ({path})",
                        f'Python\'s `{module}` module ("{synopsis}")'))
    return out


def _chat(n: int, rng: random.Random, max_tokens: int, min_tokens: int, max_prompt_tokens: int) -> list[Prompt]:
    del min_tokens, max_prompt_tokens  # chat turns are short by nature
    picks = _pick(_chat_topics(), n, rng)
    prompts = []
    for i, (src, topic) in enumerate(picks):
        content = rng.choice(CHAT_TEMPLATES).format(topic=topic)
        prompts.append(Prompt(f"chat-{i}", (("user", content),), max_tokens, src,
                              int(len(content) / CHARS_PER_TOKEN_TEXT), "chat"))
    return prompts


# --- registry ----------------------------------------------------------------------------------

def _pick(pool: list, n: int, rng: random.Random) -> list:
    """n items: a seeded sample without replacement, cycling through fresh shuffles if n > pool."""
    if not pool:
        raise RuntimeError("no source text found on this machine for this dataset")
    out: list = []
    while len(out) < n:
        out.extend(rng.sample(pool, min(len(pool), n - len(out))))
    return out


Builder = Callable[[int, random.Random, int, int, int], list[Prompt]]


@dataclass(frozen=True)
class DatasetSpec:
    build: Builder
    provenance: str
    default_max_tokens: int


def _mixed(n: int, rng: random.Random, max_tokens: int, min_tokens: int, max_prompt_tokens: int) -> list[Prompt]:
    """Summarise and chat alternating in one stream (half each), so per-request k has work to do."""
    summaries = _summarise((n + 1) // 2, rng, max_tokens, min_tokens, max_prompt_tokens)
    chats = _chat(n // 2, rng, max_tokens, min_tokens, max_prompt_tokens)
    out = []
    for i in range(n):
        out.append(summaries[i // 2] if i % 2 == 0 else chats[i // 2])
    return out


_PY = f"Python {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"

DATASETS: dict[str, DatasetSpec] = {
    "summarise": DatasetSpec(_summarise, f"Python documentation shipped with {_PY}: language-reference topics "
                             f"(pydoc_data.topics) and module docstrings of the standard library at {stdlib_dir()}",
                             96),
    "code-edit": DatasetSpec(_code_edit, f"function sources from the {_PY} standard library at {stdlib_dir()} "
                             "(read with ast, as inspect.getsource would return them)", 128),
    "chat": DatasetSpec(_chat, "open-ended questions built from templates written here, with topics from the "
                        f"module synopses of the {_PY} standard library at {stdlib_dir()} (no chat dataset is "
                        "available offline on this machine)", 96),
    "mixed": DatasetSpec(_mixed, "summarise and chat interleaved 1:1 (see those datasets)", 96),
}


def names() -> list[str]:
    return sorted(DATASETS)


def load_dataset(name: str, n: int, seed: int = 0, *, max_tokens: int | None = None,
                 min_prompt_tokens: int = 100, max_prompt_tokens: int = 400) -> Dataset:
    """`n` prompts of dataset `name`, the same for the same seed."""
    spec = DATASETS.get(name)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(names())}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not (0 < min_prompt_tokens <= max_prompt_tokens):
        raise ValueError("need 0 < min_prompt_tokens <= max_prompt_tokens")
    rng = random.Random(f"{name}:{seed}")
    prompts = spec.build(n, rng, max_tokens or spec.default_max_tokens, min_prompt_tokens, max_prompt_tokens)
    return Dataset(name, spec.provenance, seed, tuple(prompts))

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

Three more sets measure what memory across requests is worth (a proposer that remembers earlier
prompts and outputs), which none of the above can show since none of them repeats itself:

- `multi-turn-edit`: conversations of MTE_TURNS requests editing one stdlib function; each request
  resends the conversation so far (each reply being the whole edited function) and asks for one more
  small edit (rename a variable or the function, add a given comment line). No model runs offline,
  so each "assistant" turn is the function with the asked-for edit applied here, deterministically.
  The requests of a conversation are consecutive and in turn order, prompt ids `mte-C-tT`. When the
  history outgrows the size band the oldest exchanges are dropped, never the last two: those hold
  the file the previous request saw and the file as it stands.
- `templated`: one instruction (TEMPLATED_INSTRUCTION) over many documentation passages: the
  instruction and the answer's scaffolding ("Key facts:", "- " bullets) recur on every request.
- `no-repeat`, the control: language-reference topics and stdlib functions (one per module), each
  source used once, each request under its own template, and no two templates share a run of three
  words. Nothing an earlier request held recurs in a later one beyond ordinary English and Python,
  so memory has nothing to recall; what it gains here is its floor (the model's own stock phrases).
  It has one prompt per template (48) at most: more would repeat one.

Every prompt records its source (module, function, file and line); every dataset records where it
comes from. Same name + seed + count (+ Python installation) -> the same prompts.
"""

from __future__ import annotations

import ast
import functools
import random
import re
import sys
import sysconfig
import textwrap
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
    kind: str  # dataset the prompt belongs to: summarise, code-edit, chat, multi-turn-edit, templated, no-repeat

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


# --- multi-turn-edit ---------------------------------------------------------------------------

MTE_TURNS = 4  # requests per conversation
MTE_SYSTEM = "You edit Python code. Reply with the whole edited function in one ```python block and nothing else."
_RENAMED = re.compile(r"_v\d+$")  # the suffix our renames add: such a name is not renamed again


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def _function_node(code: str) -> FunctionNode | None:
    """The function a snippet defines (methods are indented, hence the dedent); None if it won't parse."""
    try:
        node = ast.parse(textwrap.dedent(code)).body[0]
    except (SyntaxError, IndexError):
        return None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _replace_word(code: str, old: str, new: str) -> str:
    """Whole-word find-and-replace, skipping attribute access (`x.old`): an editor's rename. The
    text is never run, so a hit inside a string or a keyword argument does no harm."""
    return re.sub(rf"(?<![\w.]){re.escape(old)}(?!\w)", new, code)


# (file, its function, turn, rng) -> (instruction, edited file), or None where the edit does not apply
Edit = Callable[[str, FunctionNode, int, random.Random], tuple[str, str] | None]


def _rename_local(code: str, node: FunctionNode, turn: int, rng: random.Random) -> tuple[str, str] | None:
    """Rename an argument or an assigned local; None when the function has no such name left."""
    args = node.args
    names = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a}
    names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    names = sorted(n for n in names - {"self", "cls"} if not _RENAMED.search(n))
    if not names:
        return None
    old = rng.choice(names)
    new = f"{old}_v{turn}"
    return (f"Rename the variable `{old}` to `{new}` everywhere in this function. Return the whole function.",
            _replace_word(code, old, new))


def _add_comment(code: str, node: FunctionNode, turn: int, rng: random.Random) -> tuple[str, str] | None:
    """Insert a fixed comment line above the first statement of the body (so the reply is known
    exactly); None for a one-line `def f(): ...` where there is no line to insert before."""
    del rng  # the comment's text is fixed by the turn
    first = node.body[0].lineno
    if first == node.lineno:
        return None
    comment = f"# Reviewed in edit {turn}: behaviour unchanged."
    lines = code.splitlines()
    indent = lines[first - 1][:len(lines[first - 1]) - len(lines[first - 1].lstrip())]
    edited = "\n".join([*lines[:first - 1], indent + comment, *lines[first - 1:]])
    return f"Add the comment `{comment}` as the first line of the function body. Return the whole function.", edited


def _rename_function(code: str, node: FunctionNode, turn: int, rng: random.Random) -> tuple[str, str] | None:
    """Give the function a versioned name (recursive calls follow, as with any rename)."""
    del rng
    new = f"{_RENAMED.sub('', node.name)}_v{turn}"
    return f"Rename the function to `{new}`. Return the whole function.", _replace_word(code, node.name, new)


EDITS: tuple[Edit, ...] = (_rename_local, _add_comment, _rename_function)


def _edit_steps(code: str, rng: random.Random) -> list[tuple[str, str]] | None:
    """(instruction, the file after it) for each turn: a seeded small edit of the previous file.
    We have no model offline, so the "assistant" turn is this edited file, the reply the
    instruction asks for. None if the function's text won't parse."""
    steps = []
    for turn in range(1, MTE_TURNS + 1):
        node = _function_node(code)
        if node is None:
            return None
        # _rename_function always applies, so some edit does
        step = next(step for edit in rng.sample(EDITS, len(EDITS)) if (step := edit(code, node, turn, rng)))
        steps.append(step)
        code = step[1]
    return steps


Messages = tuple[tuple[str, str], ...]


def _turn_messages(code: str, steps: list[tuple[str, str]], turn: int, max_chars: int) -> Messages | None:
    """The request of `turn` (1-based): the system prompt, the earlier exchanges (ask, edited file)
    and the new ask. The oldest exchanges are dropped until it fits max_chars, but never the last
    two, which hold the file the previous request saw and the file as it stands; None if even that
    does not fit."""
    asks = [f"{steps[0][0]}\n\n{_fenced(code)}", *(instruction for instruction, _ in steps[1:])]
    exchanges = [(("user", asks[i]), ("assistant", _fenced(steps[i][1]))) for i in range(turn - 1)]
    for first in range(max(0, turn - 3) + 1):
        messages = (("system", MTE_SYSTEM), *(m for pair in exchanges[first:] for m in pair), ("user", asks[turn - 1]))
        if _chars(messages) <= max_chars:
            return messages
    return None


def _chars(messages: Messages) -> int:
    return sum(len(content) for _, content in messages)


def _conversation(index: int, source: str, code: str, rng: random.Random, max_tokens: int, min_chars: int,
                  max_chars: int) -> list[Prompt] | None:
    """The MTE_TURNS requests of one conversation about `code`, or None if a turn falls outside the size band."""
    steps = _edit_steps(code, rng)
    if steps is None:
        return None
    turns = [_turn_messages(code, steps, turn, max_chars) for turn in range(1, MTE_TURNS + 1)]
    if any(messages is None or _chars(messages) < min_chars for messages in turns):
        return None
    return [Prompt(f"mte-{index}-t{turn}", messages, max_tokens, source,
                   int(_chars(messages) / CHARS_PER_TOKEN_CODE), "multi-turn-edit")
            for turn, messages in enumerate(turns, 1)]


def _multi_turn_edit(n: int, rng: random.Random, max_tokens: int, min_tokens: int,
                     max_prompt_tokens: int) -> list[Prompt]:
    """Whole conversations back to back, turns in order (the last one cut short to make n), so
    a request follows the one whose file it resends."""
    min_chars, max_chars = int(min_tokens * CHARS_PER_TOKEN_CODE), int(max_prompt_tokens * CHARS_PER_TOKEN_CODE)
    pool = _stdlib_functions(min_chars // 3, max_chars // 2)  # later turns hold 2-3 copies
    prompts: list[Prompt] = []
    while len(prompts) < n:  # passes over the pool in fresh seeded orders, as _pick cycles
        before = len(prompts)
        for source, code in rng.sample(pool, len(pool)):
            conversation = _conversation(len(prompts) // MTE_TURNS, source, code, rng, max_tokens, min_chars, max_chars)
            prompts.extend(conversation or ())
            if len(prompts) >= n:
                break
        if len(prompts) == before:
            raise RuntimeError("no standard-library function fits a multi-turn-edit conversation in this size band")
    return prompts[:n]


# --- templated ---------------------------------------------------------------------------------

TEMPLATED_INSTRUCTION = ("Rewrite the following passage as a bulleted list of its key facts, keeping technical "
                         'terms verbatim. Start with the line "Key facts:" and begin every bullet with "- ".')


def _fill_prose(template: str, text: str, max_chars: int) -> str:
    """`template` with its {material} replaced by `text`, cut (see _trim) so the whole request fits max_chars."""
    room = max_chars - (len(template) - len("{material}"))
    return template.replace("{material}", _trim(text, room))


def _templated(n: int, rng: random.Random, max_tokens: int, min_tokens: int, max_prompt_tokens: int) -> list[Prompt]:
    """One instruction over many documents: the instruction and the answer's scaffolding ("Key
    facts:", "- ") repeat request after request; only the document changes."""
    min_chars, max_chars = int(min_tokens * CHARS_PER_TOKEN_TEXT), int(max_prompt_tokens * CHARS_PER_TOKEN_TEXT)
    template = TEMPLATED_INSTRUCTION + "\n\n{material}"
    pool = [(source, _fill_prose(template, text, max_chars)) for source, text in _documentation_passages()]
    pool = [(source, content) for source, content in pool if min_chars <= len(content) <= max_chars]
    return [Prompt(f"templated-{i}", (("user", content),), max_tokens, source,
                   int(len(content) / CHARS_PER_TOKEN_TEXT), "templated")
            for i, (source, content) in enumerate(_pick(pool, n, rng))]


# --- no-repeat (the control) -------------------------------------------------------------------

# Each template is used by at most one prompt, and no two templates share a run of three words
# (tests/test_datasets.py checks both), so no instruction text recurs across requests.
NO_REPEAT_PROSE = (
    "Summarise this in three sentences for a busy engineer:\n\n{material}",
    "{material}\n\nWhat is the single most surprising rule described above? Explain why it might trip someone up.",
    "Write five quiz questions, with answers, that test understanding of this excerpt.\n\n{material}",
    "Translate the gist of the text below into plain Spanish, two short paragraphs at most.\n\n{material}",
    "Pretend you are teaching a class tomorrow. Draft a ten-minute lesson plan built around this reference "
    "material:\n\n{material}",
    "{material}\n\nList every Python keyword or built-in name mentioned here, one per line, nothing else.",
    "Give me a tweet-length takeaway (under 280 characters) from this:\n\n{material}",
    "Find any statement in the passage that looks ambiguous and propose clearer wording.\n\n{material}",
    "Write a short Python snippet illustrating the main point of this documentation section.\n\n{material}",
    "{material}\n\nIn one sentence: who needs to know this, and when?",
    "Turn the following into a glossary of terms with one-line definitions.\n\n{material}",
    "Compare what is described here with how JavaScript handles the same idea.\n\n{material}",
    "Write a limerick inspired by this technical text.\n\n{material}",
    "{material}\n\nWhat questions would a code reviewer ask after reading that? Give three.",
    "Extract the rules as a numbered checklist a linter could enforce.\n\n{material}",
    "Explain this to someone who only knows C, pointing out where intuition from C fails.\n\n{material}",
    "Rate how clearly this is written, from one to ten, and justify the score briefly.\n\n{material}",
    "{material}\n\nWrite the opening paragraph of a blog post that starts from these facts.",
    "Suggest a title and three section headings for a tutorial covering this material.\n\n{material}",
    "Which changes between Python versions might have affected what is documented here, if any?\n\n{material}",
    "Describe a realistic bug that would come from misunderstanding this text.\n\n{material}",
    "Condense everything below into a table with two columns: concept and meaning.\n\n{material}",
    "{material}\n\nIf you had to delete half of these words, which half would you keep? Show the shortened version.",
    "Write a dialogue between a student and a mentor discussing this section of the manual.\n\n{material}",
)
NO_REPEAT_CODE = (
    "Add type hints to this function. Return the whole function.\n\n{material}",
    "{material}\n\nWrite three pytest test cases for the function above.",
    "Explain line by line what this code does.\n\n{material}",
    "Is there any input that makes this crash? Describe it and show a fix.\n\n{material}",
    "Port this to idiomatic Rust.\n\n{material}",
    "{material}\n\nHow does the running time grow with input size? Justify your estimate.",
    "Write a Google-style docstring for it; output only that docstring.\n\n{material}",
    "Rename every variable to be more descriptive and return the complete result.\n\n{material}",
    "Convert this routine into a standalone script with a command-line interface.\n\n{material}",
    "{material}\n\nSummarise its purpose for a product manager, avoiding jargon.",
    "Review the snippet as a strict senior engineer would, listing concrete issues.\n\n{material}",
    "Rewrite it using early returns to reduce nesting.\n\n{material}",
    "Give a usage example calling the code below with realistic arguments.\n\n{material}",
    "{material}\n\nWhich standard-library modules does this depend on, directly or indirectly?",
    "Add logging statements at the important decision points; show the full updated code.\n\n{material}",
    "Write a haiku about what this method accomplishes.\n\n{material}",
    "Draw an ASCII flowchart of the control flow.\n\n{material}",
    "{material}\n\nHow would you make that thread-safe, if it needs to be?",
    "Translate it to TypeScript, keeping names unchanged.\n\n{material}",
    "Point out any Python 2 leftovers or outdated idioms in the following.\n\n{material}",
    "Propose a property-based test (Hypothesis) for this.\n\n{material}",
    "{material}\n\nList the exceptions this may raise and under which conditions.",
    "Shorten the implementation as much as possible without changing behaviour.\n\n{material}",
    "Write a commit message for a change that introduces this function.\n\n{material}",
)


def _pair_up(templates, materials, fill, min_chars: int, max_chars: int) -> list[tuple[str, str]]:
    """(source, request) for each template with the next unused material whose request falls in the
    size band: the one shared iterator is what keeps every material to one prompt."""
    materials = iter(materials)
    out = []
    for template in templates:
        for source, material in materials:
            content = fill(template, material)
            if min_chars <= len(content) <= max_chars:
                out.append((source, content))
                break
        else:
            raise RuntimeError("not enough distinct source text in the size band for no-repeat")
    return out


def _one_function_per_module(functions: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """A seeded pick of one function per module, so two prompts never quote the same module's code."""
    seen: set[str] = set()
    out = []
    for source, code in rng.sample(functions, len(functions)):
        module = source.split(":", 1)[0]
        if module not in seen:
            seen.add(module)
            out.append((source, code))
    return out


def _no_repeat(n: int, rng: random.Random, max_tokens: int, min_tokens: int, max_prompt_tokens: int) -> list[Prompt]:
    """Language-reference topics and stdlib functions alternating, each under its own template and
    each source used once. At most one prompt per template: past that the set would repeat one."""
    if n > len(NO_REPEAT_PROSE) + len(NO_REPEAT_CODE):
        raise ValueError(f"no-repeat has {len(NO_REPEAT_PROSE) + len(NO_REPEAT_CODE)} templates; "
                         f"{n} prompts would repeat one")
    text_band = (int(min_tokens * CHARS_PER_TOKEN_TEXT), int(max_prompt_tokens * CHARS_PER_TOKEN_TEXT))
    code_band = (int(min_tokens * CHARS_PER_TOKEN_CODE), int(max_prompt_tokens * CHARS_PER_TOKEN_CODE))
    topics = [(source, text) for source, text in _documentation_passages() if source.startswith("pydoc topic")]
    prose = _pair_up(rng.sample(NO_REPEAT_PROSE, (n + 1) // 2), rng.sample(topics, len(topics)),
                     lambda template, text: _fill_prose(template, text, text_band[1]), *text_band)
    functions = _one_function_per_module(_stdlib_functions(code_band[0] // 2, code_band[1]), rng)
    code = _pair_up(rng.sample(NO_REPEAT_CODE, n // 2), functions,
                    lambda template, text: template.replace("{material}", _fenced(text)), *code_band)
    requests = [(*prose[i // 2], CHARS_PER_TOKEN_TEXT) if i % 2 == 0 else (*code[i // 2], CHARS_PER_TOKEN_CODE)
                for i in range(n)]
    return [Prompt(f"no-repeat-{i}", (("user", content),), max_tokens, source, int(len(content) / per_token),
                   "no-repeat")
            for i, (source, content, per_token) in enumerate(requests)]


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
    "multi-turn-edit": DatasetSpec(_multi_turn_edit, f"conversations of {MTE_TURNS} edit requests on function sources "
                                   f"from the {_PY} standard library at {stdlib_dir()}; the assistant turns are the "
                                   "function with each asked-for edit applied here (rename, added comment)", 128),
    "templated": DatasetSpec(_templated, "one instruction written here over the Python documentation passages of "
                             "`summarise` (see there)", 96),
    "no-repeat": DatasetSpec(_no_repeat, f"{len(NO_REPEAT_PROSE) + len(NO_REPEAT_CODE)} distinct templates written "
                             f"here, each used once, over pydoc_data topics and one function per module of the {_PY} "
                             f"standard library at {stdlib_dir()}", 96),
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

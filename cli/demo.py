"""The `smartspec up --demo` workload: the same few prompts without speculation, then with the
goodput policy, and a table of what the controller chose and what it bought.

The prompts are built from text that exists on every Python installation (standard-library
docstrings and source), so the demo needs no data set: a summary, a code edit (where n-gram prompt
lookup shines: the answer copies much of the prompt) and a chat question.
"""

from __future__ import annotations

import asyncio
import inspect
import json  # its module docstring is the text the summarise prompt summarises
import statistics
import textwrap
from dataclasses import dataclass
from typing import Any, Sequence

from smartspec.clients.client import AsyncClient
from smartspec.clients.table import format_table
from smartspec.clients.types import GenerationResult


@dataclass(frozen=True)
class DemoPrompt:
    name: str
    prompt: str | list[dict[str, str]]  # raw text, or chat messages


def demo_prompts() -> list[DemoPrompt]:
    doc = inspect.getdoc(json) or ""
    summary_source = doc.split("\n\n")[0] + "\n\n" + doc.split("\n\n")[1] if "\n\n" in doc else doc
    code = inspect.getsource(textwrap.indent)
    return [
        DemoPrompt("summarise", f"Summarise this documentation in two sentences.\n\n{summary_source}\n\nSummary:"),
        DemoPrompt("code-edit", "Rewrite this function with type hints and the same behaviour.\n\n"
                                f"```python\n{code}```\n\nRewritten:\n```python\n"),
        DemoPrompt("chat", [{"role": "user", "content":
                             "What does this Python function do? Answer in one short paragraph.\n\n"
                             + (inspect.getdoc(statistics.median) or "")}]),
    ]


async def run_round(client: AsyncClient, prompts: Sequence[DemoPrompt], max_tokens: int) -> list[GenerationResult]:
    """All prompts at once (a real mixed batch), greedy so both rounds must produce the same text."""
    return list(await asyncio.gather(*(
        client.complete(p.prompt, max_tokens=max_tokens, temperature=0.0) for p in prompts
    )))


def compact_ks(ks: Sequence[int], limit: int = 8) -> str:
    """k over time as runs of k*repeats, e.g. [0,0,3,3,3,2] -> "0*2 3*3 2"; long histories keep the first runs."""
    runs: list[list[int]] = []
    for k in ks:
        if runs and runs[-1][0] == k:
            runs[-1][1] += 1
        else:
            runs.append([k, 1])
    parts = [f"{k}*{n}" if n > 1 else str(k) for k, n in runs]
    return " ".join(parts[:limit]) + (" ..." if len(parts) > limit else "")


def k_range(ks: Sequence[int]) -> str:
    if not ks:
        return "-"
    return f"{min(ks)}/{statistics.median(ks):g}/{max(ks)}"


def speedup(baseline: GenerationResult, result: GenerationResult) -> float:
    return baseline.total_ms / result.total_ms if result.total_ms > 0 else float("nan")


def report_table(prompts: Sequence[DemoPrompt], baseline: Sequence[GenerationResult],
                 speculative: Sequence[GenerationResult]) -> str:
    rows = []
    for prompt, off, on in zip(prompts, baseline, speculative):
        ks = on.speculation.speculation_lengths
        rows.append((
            prompt.name, on.usage.completion_tokens, f"{off.total_ms:.0f}", f"{on.total_ms:.0f}",
            f"{speedup(off, on):.2f}x", f"{on.speculation.acceptance_rate:.2f}", k_range(ks), compact_ks(ks),
            "yes" if on.text == off.text else "NO",
        ))
    total_off = sum(r.total_ms for r in baseline)
    total_on = sum(r.total_ms for r in speculative)
    table = format_table(
        ("request", "tokens", "off ms", "goodput ms", "speedup", "acceptance", "k min/med/max", "k over time (k*repeats)",
         "same text"),
        rows,
    )
    return f"{table}\n\nsum of latencies: off {total_off:.0f} ms, goodput {total_on:.0f} ms " \
           f"({total_off / total_on if total_on else float('nan'):.2f}x)"


async def run_demo(client: AsyncClient, max_tokens: int = 64) -> dict[str, Any]:
    """Round 1 with policy `off`, round 2 with `goodput`; returns both rounds and the printed table."""
    prompts = demo_prompts()
    await client.set_policy("off")
    baseline = await run_round(client, prompts, max_tokens)
    await client.set_policy("goodput")
    speculative = await run_round(client, prompts, max_tokens)
    return {"prompts": prompts, "off": baseline, "goodput": speculative,
            "table": report_table(prompts, baseline, speculative)}


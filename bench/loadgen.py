"""Open-loop load: send each request at its scheduled time, whatever happened to the earlier ones.

Why open loop: a closed loop (send the next request when one finishes) slows its own arrivals when
the server slows down, hiding exactly the queueing that speculation can make worse. Here a single
dispatcher sleeps until each arrival time and starts the request as its own task; latency counts
from the *scheduled* arrival, so a late dispatcher cannot flatter the server (the lag is reported).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from smartspec.bench.datasets import Prompt
from smartspec.bench.report import point_metrics


@dataclass
class RequestOutcome:
    """One request of a point, timed on the load generator's clock (seconds from the point's start)."""

    index: int  # position in the point's prompt list
    scheduled_s: float
    sent_s: float
    first_token_s: float = float("nan")
    finish_s: float = float("nan")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    proposed: int = 0
    requested: int = 0  # proposals asked for (sum of the request's k)
    accepted: int = 0
    tested: int = 0
    k_sum: int = 0
    decode_steps: int = 0
    error: str = ""


def tested_positions(accepted: int, acceptance_rate: float, speculation_lengths: Sequence[int]) -> int:
    """Tested positions of a request from its SpeculationStats (rate = accepted / tested).

    With nothing accepted the rate is 0 and says nothing about the count: each step with k > 0
    then tested exactly one position (its first proposal, rejected).
    """
    if accepted > 0 and acceptance_rate > 0:
        return int(round(accepted / acceptance_rate))
    return sum(1 for k in speculation_lengths if k > 0)


async def _one(client: Any, prompt: Prompt, outcome: RequestOutcome, clock: Callable[[], float], start: float,
               temperature: float, seed: int) -> None:
    try:
        stream = client.chat(prompt.as_message_dicts(), max_tokens=prompt.max_tokens, temperature=temperature,
                             ignore_eos=True, seed=seed)
        async for delta in stream:
            if delta.text or getattr(delta, "token_ids", None):
                if outcome.first_token_s != outcome.first_token_s:  # NaN: the first one
                    outcome.first_token_s = clock() - start
        outcome.finish_s = clock() - start
        result = stream.result
        spec = result.speculation
        if outcome.first_token_s != outcome.first_token_s:
            outcome.first_token_s = outcome.finish_s
        outcome.prompt_tokens = result.usage.prompt_tokens
        outcome.completion_tokens = result.usage.completion_tokens
        outcome.proposed = spec.proposed_tokens
        outcome.requested = spec.requested_tokens or int(sum(spec.speculation_lengths))
        outcome.accepted = spec.accepted_tokens
        outcome.tested = tested_positions(spec.accepted_tokens, spec.acceptance_rate, spec.speculation_lengths)
        outcome.k_sum = int(sum(spec.speculation_lengths))
        outcome.decode_steps = len(spec.speculation_lengths)
    except Exception as exc:  # noqa: BLE001 - a failed request is data for the report, not a crash
        outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.finish_s = clock() - start


async def run_point(client: Any, prompts: Sequence[Prompt], arrivals_s: np.ndarray, *, temperature: float = 0.0,
                    seed: int = 0, clock: Callable[[], float] = time.perf_counter,
                    on_done: Callable[[RequestOutcome], None] | None = None) -> list[RequestOutcome]:
    """Send prompts[i] at arrivals_s[i] (seconds from now) and wait for all of them.

    `client` is a smartspec.AsyncClient (anything with the same `chat` streaming method).
    """
    if len(prompts) != len(arrivals_s):
        raise ValueError(f"{len(prompts)} prompts for {len(arrivals_s)} arrival times")
    start = clock()
    tasks = []
    outcomes = []
    for i, (prompt, at) in enumerate(zip(prompts, arrivals_s.tolist())):
        delay = start + at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        outcome = RequestOutcome(index=i, scheduled_s=at, sent_s=clock() - start)
        outcomes.append(outcome)
        task = asyncio.create_task(_one(client, prompt, outcome, clock, start, temperature, seed + i))
        if on_done is not None:
            task.add_done_callback(lambda _t, o=outcome: on_done(o))
        tasks.append(task)
    await asyncio.gather(*tasks)
    return outcomes


def summarise_point(outcomes: Sequence[RequestOutcome]) -> dict[str, Any]:
    """Report metrics over the requests that succeeded, plus failure count, dispatch lag and detail.

    Latency is counted from the scheduled arrival (open loop).
    """
    ok = [o for o in outcomes if not o.error]
    errors = [o.error for o in outcomes if o.error]
    if not ok:
        raise RuntimeError(f"every request of the point failed; first error: {errors[0] if errors else '?'}")

    def col(name: str) -> np.ndarray:
        return np.array([getattr(o, name) for o in ok])

    metrics = point_metrics(
        arrival_s=col("scheduled_s"), first_token_s=col("first_token_s"), finish_s=col("finish_s"),
        completion_tokens=col("completion_tokens"), accepted=col("accepted"), tested=col("tested"),
        k_sum=col("k_sum"), decode_steps=col("decode_steps"),
    )
    lag = np.array([o.sent_s - o.scheduled_s for o in outcomes])
    metrics.update({
        "failed": len(errors),
        "errors": sorted(set(errors))[:5],
        "max_dispatch_lag_s": float(lag.max()) if lag.size else 0.0,
        "mean_prompt_tokens": float(col("prompt_tokens").mean()),
        "detail": {
            "index": col("index").tolist(),
            "prompt_tokens": col("prompt_tokens").tolist(),
            "completion_tokens": col("completion_tokens").tolist(),
            "proposed": col("proposed").tolist(),
            "requested": col("requested").tolist(),
            "accepted": col("accepted").tolist(),
            "tested": col("tested").tolist(),
            "latency_s": (col("finish_s") - col("scheduled_s")).round(4).tolist(),
        },
    })
    return metrics

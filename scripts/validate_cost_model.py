"""Does the cost model predict the step times a real worker measures? Fit it online, check it on new steps.

Drives real `Engine`s (the default model; prompt lookup wrapped so it always offers exactly k
tokens), one per batch size, one step at a time, with a planner that hands out the wanted k per
row, and records what the worker reports per step (`StepFacts.draft_ms`, `verify_ms`, `total_ms`).
Compositions: all k = 0, half the rows at 4 (the rest 0), all at 2, all at 4, all at 8, one row at
8 (the rest 0). Each round runs every (batch size, composition) once, in a shuffled order, so a
slow minute of a shared machine hits every point alike; rounds alternate between the training pass
and the validation pass.

The training steps are fed to `OnlineCostFit.observe` in the order they ran (the controller's own
fit with its defaults: the prior worth 5 steps, forgetting 0.99). The validation steps are then
predicted by the fitted model and compared per (batch, composition), as medians over the repeats.
Compared is draft + verify (what the model's terms predict); the worker's total (plus planning and
admission, the model's mean `overhead_ms`) is shown alongside.

The machine may be shared: a step during which other processes used more than `--busy-share` of
the CPUs (from /proc/stat, less this process's own time) is measured again once the machine has
been quiet for a moment (at most `--max-wait` s of waiting per run), up to `--retries` times; the
report counts them. Slowdowns from outside this kernel's view (the host) are not detected: that
is what the shuffled rounds are for.

    .venv/bin/python scripts/validate_cost_model.py --quick            # ~2 min on a quiet 2-core box
    .venv/bin/python scripts/validate_cost_model.py --save steps.json  # keep the raw steps
    .venv/bin/python scripts/validate_cost_model.py --from-json steps.json --prior old   # refit only

What a serving step does that these do not: prefill (no measured step prefills), sampling (greedy
only), and the controller round trip (a local planner answers at once; and since the engines'
steps alternate, each step's total_ms starts at its own start, as after an idle wait).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from smartspec.core.cost_fit import DEFAULT_SPEED_WEIGHT, OnlineCostFit
from smartspec.core.cost_model import DEFAULT_COST_MODEL, CostModel

COMPOSITIONS = ("all-0", "half-4", "all-2", "all-4", "all-8", "one-8")   # measured by default
# Every composition --compositions may name, in the order tables list them.
KNOWN_COMPOSITIONS = ("all-0", "all-1", "half-4", "all-2", "all-3", "all-4", "all-8", "one-8")
PRIORS = {
    "default": DEFAULT_COST_MODEL,
    # the default before the per-row and width terms (hand-fitted to four older CPU points)
    "old": CostModel(c_fixed_ms=84.84, c_spec_ms=46.45, c_tok_ms=2.944, c_kv_ms=0.01109),
}


def composition_ks(name: str, batch: int) -> list[int]:
    """The k of each row (rows in request order) for a named composition."""
    if name.startswith("all-"):
        return [int(name[4:])] * batch
    if name == "half-4":
        return [4] * (batch // 2) + [0] * (batch - batch // 2)
    if name == "one-8":
        return [8] + [0] * (batch - 1)
    raise ValueError(f"unknown composition {name!r}")


def compositions_for(batch: int, names: Sequence[str] = COMPOSITIONS) -> list[str]:
    """Compositions whose k vector differs from every earlier one (at batch 1, half-4 is all-0 and
    one-8 is all-8: measuring them twice would only weigh those points double)."""
    seen, kept = set(), []
    for name in names:
        ks = tuple(composition_ks(name, batch))
        if ks not in seen:
            seen.add(ks)
            kept.append(name)
    return kept


# ---------------------------------------------------------------------------------------------
# Contention: how much CPU did other processes use while a step ran?
# ---------------------------------------------------------------------------------------------

TICKS = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1


@dataclass(frozen=True)
class CpuSample:
    wall_s: float
    busy_s: float  # all CPUs, all processes (steal included: a host that takes our vCPU counts)
    own_s: float  # this process

    @staticmethod
    def now() -> "CpuSample":
        times = os.times()
        own = times.user + times.system
        try:
            with open("/proc/stat") as stat:
                values = [int(v) for v in stat.readline().split()[1:9]]
        except (OSError, ValueError):  # not Linux: nobody else is seen
            return CpuSample(time.perf_counter(), own, own)
        user, nice, system, idle, iowait, irq, softirq, steal = values
        return CpuSample(time.perf_counter(), (user + nice + system + irq + softirq + steal) / TICKS, own)


def others_share(before: CpuSample, after: CpuSample) -> float:
    """Share of all CPUs that other processes used between two samples (0..1, tick resolution)."""
    wall = max(after.wall_s - before.wall_s, 1e-6)
    others = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return max(0.0, others) / (wall * CPUS)


def wait_for_quiet(busy_share: float, probe_s: float = 0.3, max_wait_s: float = 30.0) -> float:
    """Sleep until two probes in a row see the others below `busy_share`; returns the seconds waited."""
    start, quiet = time.perf_counter(), 0
    while quiet < 2 and time.perf_counter() - start < max_wait_s:
        before = CpuSample.now()
        time.sleep(probe_s)
        quiet = quiet + 1 if others_share(before, CpuSample.now()) < busy_share else 0
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Driving a real engine
# ---------------------------------------------------------------------------------------------


class ScriptedPlanner:
    """Hands out the k the script wants for each request, and keeps the step's facts."""

    def __init__(self) -> None:
        self.wanted: dict[str, int] = {}
        self.last_facts = None

    def plan(self, step_index, queries, queued_requests) -> dict[str, int]:
        return {q.request_id: self.wanted.get(q.request_id, 0) for q in queries}

    def observe(self, facts) -> None:
        self.last_facts = facts

    def close(self) -> None:
        pass


def exactly_k_proposer():
    """Prompt lookup (its lookups and index upkeep cost what they cost while serving), padded with
    repeats of its last token so that every row offers exactly the k it was asked for."""
    from smartspec.worker.proposers import Proposal, Proposer, make_proposer

    inner = make_proposer("ngram")

    class ExactlyK(Proposer):
        kind = inner.kind
        reports_lookahead = inner.reports_lookahead

        def propose(self, requests):
            answers = inner.propose(requests)
            return [Proposal((a.tokens + [(a.tokens or r.token_ids)[-1]] * r.k)[: r.k])
                    for a, r in zip(answers, requests)]

        def release(self, seq_id):
            inner.release(seq_id)

        def lookahead(self, seq_id, token_ids, max_k):
            return inner.lookahead(seq_id, token_ids, max_k)

    return ExactlyK()


def prompt_source(tokenizer) -> list[int]:
    """Real text with repeats for prompt lookup to find: this repository's Python sources."""
    root = Path(__file__).resolve().parents[1]
    text = "\n".join(path.read_text() for path in sorted((root / "controller").glob("*.py")))
    return tokenizer(text)["input_ids"]


def run_one_step(engine) -> None:
    """What the engine's loop does for one step, on this thread (so the script decides when steps run)."""
    with engine._lock:
        incoming = list(engine._inbox)
        engine._inbox.clear()
    engine._waiting.extend((handle, handle.submitted_at) for handle in incoming)
    engine._step()


@dataclass
class Measured:
    batch: int
    composition: str
    split: str  # "train" | "validate" | "warmup"
    round: int
    ks: list[int]  # proposed tokens per row (= asked: the proposer always fills)
    contexts: list[int]  # context each row attended over (as the controller computes it)
    draft_ms: float
    verify_ms: float
    total_ms: float
    others_share: float
    retries: int
    disturbed: bool

    @property
    def measured_ms(self) -> float:
        return self.draft_ms + self.verify_ms


def attended_context(context_after: int, accepted: int, prefill: int) -> int:
    """controller.planner.attended_context: the context after the step, less what the step added."""
    return max(0, context_after - accepted - 1 - prefill)


@dataclass
class Patience:
    """How long the whole run may wait for a quiet machine; once spent, disturbed steps are only
    re-measured at once (up to `retries`), then kept and counted."""

    busy_share: float
    retries: int
    wait_left_s: float

    def wait(self) -> None:
        if self.wait_left_s > 0:
            self.wait_left_s -= wait_for_quiet(self.busy_share, max_wait_s=min(30.0, self.wait_left_s))


@dataclass
class Rig:
    """One engine holding `batch` decoding requests, ready to step at any composition."""

    batch: int
    engine: Any
    planner: ScriptedPlanner
    ids: list[str]
    names: list[str]


def build_rig(model, batch: int, steps_planned: int, context_range: tuple[int, int], source: list[int],
              rng: random.Random, names: Sequence[str] = COMPOSITIONS) -> Rig:
    """An engine with `batch` requests admitted and prefilled (prompt lengths drawn from the range),
    to be stepped at the compositions `names`."""
    from smartspec.worker.engine import Engine, EngineConfig
    from smartspec.worker.sequence import GenerationRequest

    lo, hi = context_range
    # room for every planned step to accept all 8 proposals, twice over (re-measured steps)
    config = EngineConfig(max_batch_size=batch, max_context_tokens=hi + 2 * 9 * steps_planned + 64,
                          token_budget=max(2048, batch * 9), max_k=8)
    planner = ScriptedPlanner()
    engine = Engine(model, exactly_k_proposer(), config, planner)
    ids = [f"b{batch}-r{i:02d}" for i in range(batch)]
    for request_id in ids:
        length = rng.randint(lo, hi)
        offset = rng.randint(0, len(source) - length - 1)
        engine.submit(GenerationRequest(request_id, tuple(source[offset: offset + length]),
                                        max_tokens=10**6, ignore_eos=True))
    while len(engine._running) < batch or any(s.prefilling for s in engine._running.values()):
        run_one_step(engine)  # admission and chunked prefill; nothing recorded
    return Rig(batch, engine, planner, ids, compositions_for(batch, names))


def measure_step(rig: Rig, name: str, split: str, round_index: int, patience: Patience, log) -> Measured:
    """One engine step at a composition, re-measured while other processes disturb it."""
    rig.planner.wanted = dict(zip(rig.ids, composition_ks(name, rig.batch)))
    for attempt in range(patience.retries + 1):
        # Steps of the engines alternate, so each step's total starts at its own start (as after
        # an idle wait): the other engines' steps in between are no step's cost.
        rig.engine._previous_step_end = None
        before = CpuSample.now()
        run_one_step(rig.engine)
        share = others_share(before, CpuSample.now())
        if share < patience.busy_share or attempt == patience.retries:
            break
        patience.wait()
    facts = rig.planner.last_facts
    rows = sorted(facts.requests, key=lambda f: f.request_id)
    if [f.proposed_tokens for f in rows] != composition_ks(name, rig.batch):
        log(f"batch {rig.batch} {name}: ran {[f.proposed_tokens for f in rows]} (context window reached?)")
    return Measured(
        batch=rig.batch, composition=name, split=split, round=round_index,
        ks=[f.proposed_tokens for f in rows],
        contexts=[attended_context(f.context_tokens, f.accepted_tokens, f.prefill_tokens) for f in rows],
        draft_ms=facts.draft_ms, verify_ms=facts.verify_ms, total_ms=facts.total_ms,
        others_share=share, retries=attempt, disturbed=share >= patience.busy_share,
    )


def measure(model, batches: Sequence[int], rounds: int, context_range: tuple[int, int], source: list[int],
            rng: random.Random, patience: Patience, log, on_round=None,
            names: Sequence[str] = COMPOSITIONS) -> list[Measured]:
    """Every batch size's engine at once; each round runs every (batch, composition) once in a
    shuffled order, so a slow minute of the machine hits all points alike instead of one batch
    size's block. Rounds alternate between the training and the validation pass."""
    rigs = []
    for batch in batches:
        rigs.append(build_rig(model, batch, (rounds + 1) * len(compositions_for(batch, names)), context_range, source,
                              rng, names))
        log(f"batch {batch:>2}: prefilled")
    measured = [measure_step(rig, name, "warmup", -1, patience, log)  # first forward at each shape
                for rig in rigs for name in rig.names]
    for round_index in range(rounds):
        split = "train" if round_index % 2 == 0 else "validate"
        order = [(rig, name) for rig in rigs for name in rig.names]
        rng.shuffle(order)
        done = [measure_step(rig, name, split, round_index, patience, log) for rig, name in order]
        measured += done
        log(f"round {round_index + 1}/{rounds} ({split}): {len(done)} steps, "
            f"{sum(m.retries for m in done)} re-measured, {sum(m.disturbed for m in done)} kept disturbed")
        if on_round is not None:
            on_round(measured)
    return measured


# ---------------------------------------------------------------------------------------------
# Fit and report
# ---------------------------------------------------------------------------------------------


def fit_default(paths: Sequence[Path]) -> str:
    """Every measured step of the saved runs (both passes), fed in order to OnlineCostFit without
    forgetting, starting from the replaced model (worth 5 steps); 3 significant digits, as code."""
    fit = OnlineCostFit.create(PRIORS["old"], forgetting=1.0)
    steps = 0
    for path in paths:
        for m in (Measured(**m) for m in json.loads(path.read_text())["steps"] if m["split"] != "warmup"):
            fit.observe(m.ks, m.contexts, None, m.draft_ms, m.verify_ms, m.total_ms)
            steps += 1
    values = ",\n".join(f"    {name}={float(f'{value:.3g}')!r}" for name, value in fit.model().to_dict().items())
    return f"# {steps} steps from {', '.join(str(p) for p in paths)}\nDEFAULT_COST_MODEL = CostModel(\n{values},\n)"


def fit_online(train: Sequence[Measured], prior: CostModel, token_counts: bool = True) -> CostModel:
    """The controller's fit (its defaults: prior worth 5 steps, forgetting 0.99), fed the training
    steps in the order they ran (batch sizes and compositions mixed, as a busy worker's are).
    token_counts=False: the line alone, without the per-count table (the model before it).
    Without the speed factor: it is the machine's speed at the last training step, which the
    held-out steps, measured at other moments, do not share (`ahead_of_step` measures it)."""
    fit = OnlineCostFit.create(prior, token_counts=token_counts, speed_weight=None)
    for m in train:
        fit.observe(m.ks, m.contexts, None, m.draft_ms, m.verify_ms, m.total_ms)
    return fit.model()


def ahead_of_step(measured: Sequence[Measured], prior: CostModel, speed_weight: float | None) -> str:
    """The controller's online fit as it serves: every kept step (training and validation, in the order
    they ran) predicted just before the fit learns from it. Median |error| and mean signed error,
    over all steps and over the speculative and plain ones (the first 20 steps left out: the prior)."""
    fit = OnlineCostFit.create(prior, speed_weight=speed_weight)
    errors: dict[str, list[float]] = {"speculative": [], "plain": []}
    for index, m in enumerate(m for m in measured if m.split != "warmup"):
        model = fit.model()
        predicted = float(model.draft_ms(m.ks, m.contexts) + model.verify_ms(m.ks, m.contexts))
        if index >= 20:
            errors["speculative" if any(m.ks) else "plain"].append(predicted / (m.draft_ms + m.verify_ms) - 1.0)
        fit.observe(m.ks, m.contexts, None, m.draft_ms, m.verify_ms, m.total_ms)

    def summary(values: list[float]) -> str:
        if not values:
            return "none"
        return f"{100 * float(np.median(np.abs(values))):.1f}% / {100 * float(np.mean(values)):+.1f}%"
    every = errors["speculative"] + errors["plain"]
    return (f"all {summary(every)}, speculative {summary(errors['speculative'])}, "
            f"plain {summary(errors['plain'])}")


@dataclass
class Row:
    batch: int
    composition: str
    measured_ms: float
    predicted_ms: float
    baseline_ms: float  # the line alone's prediction (the same fit without the per-count table)
    total_ms: float
    steps: int

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1.0

    @property
    def baseline_error(self) -> float:
        return self.baseline_ms / self.measured_ms - 1.0


def compare(model: CostModel, validate: Sequence[Measured], baseline: CostModel) -> list[Row]:
    """Per (batch, composition): medians over the validation repeats of measured and predicted ms."""
    groups: dict[tuple[int, str], list[Measured]] = {}
    for m in validate:
        groups.setdefault((m.batch, m.composition), []).append(m)
    rows = []
    for (batch, name), steps in sorted(groups.items(), key=lambda item: (item[0][0], KNOWN_COMPOSITIONS.index(item[0][1]))):
        predicted = [model.draft_ms(m.ks, m.contexts) + model.verify_ms(m.ks, m.contexts) for m in steps]
        line = [baseline.draft_ms(m.ks, m.contexts) + baseline.verify_ms(m.ks, m.contexts) for m in steps]
        rows.append(Row(batch, name, statistics.median(m.measured_ms for m in steps), statistics.median(predicted),
                        statistics.median(line),
                        statistics.median(m.total_ms for m in steps), len(steps)))
    return rows


def error_summary(errors: Sequence[float], rows: Sequence[Row]) -> tuple[str, str, str]:
    """(median / mean / worst |error|, mean signed error per composition, per batch size)."""
    errors = np.asarray(errors)  # [points]
    overall = (f"median |pred - meas| / meas **{100 * np.median(np.abs(errors)):.1f}%** "
               f"(mean {100 * np.mean(np.abs(errors)):.1f}%, worst {100 * np.max(np.abs(errors)):.1f}%)")
    by_comp = [f"{name} {100 * np.mean(errors[[r.composition == name for r in rows]]):+.1f}%"
               for name in KNOWN_COMPOSITIONS if any(r.composition == name for r in rows)]
    by_batch = [f"{batch}: {100 * np.mean(errors[[r.batch == batch for r in rows]]):+.1f}%"
                for batch in sorted({r.batch for r in rows})]
    return overall, ", ".join(by_comp), ", ".join(by_batch)


def report(rows: Sequence[Row], model: CostModel, measured: Sequence[Measured], meta: dict[str, Any],
           ahead: Sequence[str] = ()) -> str:
    lines = [
        f"Fitted online on {meta['train_steps']} training steps; validated on {meta['validate_steps']} other steps "
        f"(medians of {meta['repeats']} repeats per point). Model: {meta['model']}, {CPUS} CPUs, "
        f"contexts {meta['context_range'][0]}-{meta['context_range'][1]} tokens at the start. "
        f"Line-alone error: the same online fit without the per-count table (the model before it).",
        "",
        "| batch | composition | measured ms | predicted ms | error | line-alone error | worker total ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row.batch} | {row.composition} | {row.measured_ms:.1f} | {row.predicted_ms:.1f} | "
                     f"{100 * row.error:+.1f}% | {100 * row.baseline_error:+.1f}% | {row.total_ms:.1f} |")
    overall, by_comp, by_batch = error_summary([row.error for row in rows], rows)
    lines += ["", f"This model: {overall}.", f"Mean signed error per composition: {by_comp}.",
              f"Mean signed error per batch size: {by_batch}."]
    overall, by_comp, by_batch = error_summary([row.baseline_error for row in rows], rows)
    lines += [f"Line alone: {overall.replace('**', '')}; per composition: {by_comp}; per batch size: {by_batch}."]
    kept = [m for m in measured if m.split != "warmup"]
    lines.append(f"Noise: {sum(m.retries for m in kept)} of {len(kept)} steps were re-measured because other "
                 f"processes were busy; {sum(m.disturbed for m in kept)} stayed disturbed after "
                 f"{meta['retries']} tries and were kept. Median share of the CPUs others used during kept steps: "
                 f"{100 * statistics.median(m.others_share for m in kept):.0f}%.")
    if ahead:
        lines += ["", "Ahead of each step (the online fit predicting every kept step, in the order they ran, "
                  "before it learns from it; median |error| / mean signed error): "
                  f"with the speed factor (the controller's fit) {ahead[0]}; without it {ahead[1]}."]
    scalars = {k: v for k, v in model.to_dict().items() if k != "token_count_ms"}
    lines += ["", "Fitted coefficients: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()) + "."]
    if model.token_count_ms:
        lines += ["", "Per-count table (ms beyond the line, by query tokens N): " + ", ".join(
            f"{n}: {v:+.1f}" for n, v in enumerate(model.token_count_ms) if v) + "."]
    return "\n".join(lines)


def code_state() -> dict[str, Any]:
    """The commit measured, and which engine-side files differed from it (a shared working tree)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "worker", "core/cost_model.py", "core/cost_fit.py").splitlines()
    return {"git_commit": git("rev-parse", "--short", "HEAD"), "uncommitted": [line[3:] for line in changed]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 rounds per batch size (3 train, 3 validate)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per batch size, alternating train/validate")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--contexts", default="150:600", help="prompt length range LO:HI, drawn per request")
    parser.add_argument("--compositions", default=",".join(COMPOSITIONS),
                        help=f"which to measure, of {', '.join(KNOWN_COMPOSITIONS)}")
    parser.add_argument("--busy-share", type=float, default=0.15,
                        help="re-measure a step during which others used more than this share of the CPUs")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--max-wait", type=float, default=300.0,
                        help="seconds the whole run may wait for the machine to be quiet")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default, as the worker runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prior", choices=sorted(PRIORS), default="default",
                        help="what the online fit starts from (worth 5 steps, as in the controller): "
                             "DEFAULT_COST_MODEL, or the linear model it replaced (no per-row or width terms)")
    parser.add_argument("--save", type=Path, help="write the raw steps as JSON")
    parser.add_argument("--from-json", type=Path, help="refit and report steps saved earlier; measure nothing")
    parser.add_argument("--markdown", type=Path, help="also write the report here")
    parser.add_argument("--fit-default", nargs="+", type=Path, metavar="JSON",
                        help="print the fit over every step of these saved runs, no forgetting (how "
                             "DEFAULT_COST_MODEL was made), and exit")
    args = parser.parse_args(argv)
    if args.fit_default:
        print(fit_default(args.fit_default))
        return 0
    rounds = 6 if args.quick else args.rounds
    lo, hi = (int(v) for v in args.contexts.split(":"))
    names = args.compositions.split(",")   # checked before the model loads: a typo costs nothing
    unknown = sorted(set(names) - set(KNOWN_COMPOSITIONS))
    if unknown:
        parser.error(f"--compositions: unknown {', '.join(unknown)} (known: {', '.join(KNOWN_COMPOSITIONS)})")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.from_json:
        data = json.loads(args.from_json.read_text())
        meta, measured = data["meta"], [Measured(**m) for m in data["steps"]]
    else:
        import torch

        from smartspec.worker.model import load_model

        torch.manual_seed(args.seed)
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        model = load_model()
        source = prompt_source(model.tokenizer)
        rng = random.Random(args.seed)
        started = time.perf_counter()
        state = code_state()
        patience = Patience(args.busy_share, args.retries, args.max_wait)
        batches = [int(b) for b in args.batch_sizes.split(",")]

        def meta_now() -> dict[str, Any]:
            return {"model": model.name, "context_range": [lo, hi], "rounds": rounds, "retries": args.retries,
                    "busy_share": args.busy_share, "seconds": round(time.perf_counter() - started, 1),
                    "torch_threads": torch.get_num_threads(), "cpus": CPUS, **state}

        def save(steps: list[Measured]) -> None:  # after every round: a run cut short keeps what it measured
            if args.save:
                args.save.write_text(json.dumps({"meta": meta_now(), "steps": [m.__dict__ for m in steps]}))

        measured = measure(model, batches, rounds, (lo, hi), source, rng, patience, log, on_round=save, names=names)
        meta = meta_now()
        log(f"measured in {meta['seconds']:.0f} s")

    train = [m for m in measured if m.split == "train"]
    validate = [m for m in measured if m.split == "validate"]
    prior = PRIORS[args.prior]
    model_fit = fit_online(train, prior)
    meta = {**meta, "retries": meta.get("retries", args.retries), "train_steps": len(train),
            "validate_steps": len(validate), "repeats": meta["rounds"] // 2}
    ahead = [ahead_of_step(measured, prior, weight) for weight in (DEFAULT_SPEED_WEIGHT, None)]
    text = report(compare(model_fit, validate, fit_online(train, prior, token_counts=False)), model_fit, measured, meta,
                  ahead)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

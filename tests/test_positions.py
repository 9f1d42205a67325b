"""Positions: prompt lookup's per-position table, its exact replay in the simulator, and the proof that
the replay is exact (on a tiny random model, the engine at k = 3 accepts what walking the table says)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smartspec.bench.acceptance_models import PositionReplay, parse_acceptance, replay, with_fill
from smartspec.bench.arrivals import make_arrivals
from smartspec.bench.calibrate import predict_points
from smartspec.bench.positions import load_positions, walk
from smartspec.bench.simulator import StepModel, WorkerSpec, simulate
from smartspec.bench.step_models import PRESETS
from smartspec.bench.workload import Workload
from smartspec.core.policies import get
from tiny_model import write_tiny_model

CPU = PRESETS["cpu-smollm2"]

# A hand-written table: 12 completion tokens, positions p = 1..11 (entry p - 1).
#   p:        1  2  3  4  5  6  7  8  9 10 11
OFFERED = [0, 8, 8, 8, 0, 0, 8, 8, 8, 8, 8]
MATCHED = [0, 5, 4, 3, 0, 0, 0, 2, 3, 2, 1]
# Walked by hand (k clamped to min(k, offered, 12 - p - 1); a step moves p by accepted + 1):
#   k = 3: p=1 k0 -> 2; p=2 k3 acc3 -> 6; p=6 k0 -> 7; p=7 k3 acc0 -> 8; p=8 k3 acc2 -> 11; p=11 k0 -> 12
#   k = 8: p=1 k0 -> 2; p=2 k8 acc5 -> 8; p=8 k3 acc2 -> 11; p=11 k0 -> 12
BY_HAND = {  # k: (accepted, proposed, tested, decode steps)
    3: (5, 9, 7, 6),
    8: (7, 11, 9, 4),
}


def table(entries, max_k=8):
    return {"kind": "positions", "proposer": "ngram", "max_k": max_k, "model": "hand",
            "dataset": {"name": "hand", "seed": 0, "prompts": len(entries), "max_tokens": 12},
            "requests": entries}


def entry(index, offered, matched, prompt_tokens=40):
    return {"index": index, "prompt_tokens": prompt_tokens, "completion_tokens": len(offered) + 1,
            "offered": list(offered), "matched": list(matched)}


HAND = table([entry(9, [0] * 5, [0] * 5, prompt_tokens=30), entry(5, OFFERED, MATCHED)])  # 9: never matches


# --- the replay model ------------------------------------------------------------------------

def test_position_replay_reads_the_table_at_each_cursor():
    rng = np.random.default_rng(0)
    model = PositionReplay.from_table(HAND, 3, index=[9, 5, 5])
    both = np.array([1, 2])
    assert model.proposable(np.arange(3), 8, rng).tolist() == [0, 0, 0]  # p = 1: no match anywhere
    model.advance(both, np.array([1, 1]))  # request 1 and 2 at p = 2; request 0 stays
    assert model.proposable(np.arange(3), 8, rng).tolist() == [0, 8, 8]
    assert model.proposable(both, 4, rng).tolist() == [4, 4]  # capped by the worker's max_k
    assert model.propose(both, np.array([2, 8]), rng).tolist() == [2, 8]
    assert model.accept(both, np.array([2, 8]), rng).tolist() == [2, 5]  # min(k, matched = 5)
    model.advance(np.array([1]), np.array([4]))  # request 1 to p = 6 (offers nothing), request 2 stays at p = 2
    assert model.propose(both, np.array([8, 8]), rng).tolist() == [0, 8]
    assert model.accept(np.array([1]), np.array([3]), rng).tolist() == [0]
    model.advance(both, np.array([100, 100]))  # past the recorded end: nothing offered, nothing accepted
    assert model.proposable(both, 8, rng).tolist() == [0, 0]
    assert model.accept(both, np.array([3, 3]), rng).tolist() == [0, 0]
    with pytest.raises(ValueError, match="max_k=8"):
        model.propose(both, np.array([9, 1]), rng)
    # the rate a static max_k run would measure: 7 accepted of 9 tested (by hand above); 0 when never tested
    assert model.mean_rates().tolist() == pytest.approx([0.0, 7 / 9, 7 / 9])
    assert model.cursor.tolist() == [0, 105, 101]


@pytest.mark.parametrize("k", [3, 8])
def test_walk_is_the_hand_walk(k):
    w = walk(OFFERED, MATCHED, 12, k)
    assert (w.accepted, w.proposed, w.tested, w.decode_steps) == BY_HAND[k]


@pytest.mark.parametrize("lookahead", [True, False])
@pytest.mark.parametrize("k", [3, 8])
def test_fixed_k_simulation_follows_the_table_exactly(k, lookahead):
    workload = Workload(np.array([0.0, 0.0, 0.5]), np.array([40, 30, 40]), np.array([12, 6, 12]))
    result = simulate(workload, get("fixed"), {"k": k}, step_model=StepModel(CPU),
                      acceptance=replay(HAND, [5, 9, 5]), worker=WorkerSpec(max_batch_size=2, lookahead=lookahead))
    accepted, proposed, tested, steps = BY_HAND[k]
    assert result.completion_tokens.tolist() == [12, 6, 12]  # the recorded completion lengths
    assert result.accepted.tolist() == [accepted, 0, accepted]
    assert result.proposed.tolist() == [proposed, 0, proposed]
    assert result.tested.tolist() == [tested, 0, tested]
    assert result.decode_steps.tolist() == [steps, 5, steps]  # 11 tokens after the first in `steps` steps
    if lookahead:  # the planner never asks a request that has no match
        assert result.requested.tolist() == [proposed, 0, proposed]
    else:  # every step asks min(k, tokens left - 1): k=3 at p = 1,2,6,7,8,11 -> 3+3+3+3+3+0; the
        # 6-token request at p = 1..5 -> min(k, 4) + min(k, 3) + 2 + 1 + 0
        asked = {3: (15, 9), 8: (19, 10)}[k]
        assert result.requested.tolist() == [asked[0], asked[1], asked[0]]


def test_replay_spec_file_and_checks(tmp_path):
    path = tmp_path / "pos.json"
    path.write_text(json.dumps(HAND))
    model = parse_acceptance(f"replay:{path}")(4, np.random.default_rng(0))
    assert isinstance(model, PositionReplay)
    assert model.rows.tolist() == [0, 1, 0, 1]  # request j replays the file's (j mod 2)-th entry
    assert model.fills is None
    with pytest.raises(ValueError, match="fill"):
        with_fill(parse_acceptance(f"replay:{path}"), [0.5])(2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no entry"):
        PositionReplay.from_table(HAND, 1, index=[7])
    bad = [
        table([entry(0, [8, 0], [9, 0])]),  # matched > offered
        table([entry(0, [8, 0], [1, 0])], max_k=4),  # offered > max_k
        table([{**entry(0, [8, 0], [1, 0]), "completion_tokens": 5}]),  # wrong length
        table([entry(0, [0], [0]), entry(0, [0], [0])]),  # duplicate index
        {**HAND, "kind": "bench"},
    ]
    for data in bad:
        with pytest.raises(ValueError):
            load_positions(data)


def test_simulate_cli_takes_replay_and_rejects_fill_with_it(tmp_path, capsys):
    from smartspec.cli import main

    path = tmp_path / "pos.json"
    path.write_text(json.dumps(HAND))
    out = tmp_path / "s.json"
    assert main(["simulate", "--step-model", "cpu-smollm2", "--alpha", f"replay:{path}", "--rates", "1",
                 "--policies", "fixed:8", "--requests", "4", "--output-tokens", "12", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    # requests alternate the two entries: (7 + 0 + 7 + 0) accepted over (9 + 0 + 9 + 0) tested
    assert record["acceptance_rate"] == pytest.approx(14 / 18)
    assert main(["simulate", "--alpha", f"replay:{path}", "--fill", "0.5", "--requests", "4"]) == 2
    assert main(["simulate", "--alpha", f"replay:{tmp_path / 'missing.json'}", "--requests", "4"]) == 2
    assert main(["simulate", "--positions", str(path), "--requests", "4"]) == 2
    assert main(["simulate", "--alpha", f"replay:{path}", "--max-k", "12", "--requests", "4"]) == 2
    assert "max_k=8" in capsys.readouterr().err


# --- calibration with positions --------------------------------------------------------------

def bursty_entry(rng, index, completion):
    """Copied spans (offered 8, matching for a run of positions) between stretches of no match or of
    wrong guesses, like prompt lookup on a summary."""
    offered, matched = [], []
    p = 1
    while p < completion:
        span = int(rng.integers(2, 12))
        kind = rng.integers(3)
        for j in range(span):
            if p >= completion:
                break
            left = completion - p
            if kind == 0:
                offered.append(0)
                matched.append(0)
            elif kind == 1:
                offered.append(8)
                matched.append(min(8, span - j, left))
            else:
                offered.append(8)
                matched.append(0)
            p += 1
    return {"index": index, "prompt_tokens": int(rng.integers(80, 200)), "completion_tokens": completion,
            "offered": offered, "matched": matched}


def test_calibration_with_positions_replays_the_measured_run_exactly(tmp_path, capsys):
    rng = np.random.default_rng(5)
    n = 24
    entries = [bursty_entry(rng, i, int(rng.integers(30, 70))) for i in range(n)]
    positions = table(entries[::-1])  # stored out of order: the detail's "index" must pick the entry
    positions["dataset"] = {"name": "summarise", "seed": 3, "prompts": n, "max_tokens": 70}
    meta = {"requests": n, "seed": 3, "arrival": "poisson", "cv": 1.0, "dataset": dict(positions["dataset"])}
    worker = WorkerSpec(max_batch_size=8, max_k=8)
    records = []
    for rate in (0.5, 4.0):
        for policy, params in (("off", {}), ("fixed:3", {"k": 3})):
            wl = Workload(make_arrivals(n, rate, seed=3), np.array([e["prompt_tokens"] for e in entries]),
                          np.array([e["completion_tokens"] for e in entries]))
            r = simulate(wl, get(policy.split(":")[0]), params, step_model=StepModel(CPU),
                         acceptance=replay(table(entries)), worker=worker, seed=11)  # request j: entry j
            records.append({"policy": policy, "rate": rate, **r.metrics(), "detail": r.detail(wl.prompt_tokens)})
    rows = predict_points(meta, records, StepModel(CPU), worker, seed=7, positions=positions)
    for row, record in zip(rows, records):
        assert row["predicted_mean_latency_s"] == pytest.approx(row["measured_mean_latency_s"], rel=1e-12)
        assert row["predicted_mean_k"] == pytest.approx(record["mean_k"], rel=1e-12)
    # the default (iid at each prompt's measured rate) is close but not exact: the replay is what made it so
    iid = predict_points(meta, records, StepModel(CPU), worker, seed=7)
    assert any(abs(r["ratio"] - 1) > 1e-6 for r in iid if r["policy"] != "off")
    with pytest.raises(ValueError, match="seed"):
        predict_points({**meta, "dataset": {**meta["dataset"], "seed": 4}}, records, StepModel(CPU), worker,
                       positions=positions)

    # the same through the CLI: smartspec simulate --calibrate-from bench.json --positions FILE
    from smartspec.bench.report import write_json
    from smartspec.cli import main

    bench, pos, out = tmp_path / "bench.json", tmp_path / "pos.json", tmp_path / "cal.json"
    write_json(bench, {**meta, "worker": {"max_batch_size": 8, "max_k": 8, "lookahead": True}}, records)
    pos.write_text(json.dumps(positions))
    args = ["simulate", "--calibrate-from", str(bench), "--step-model", "cpu-smollm2", "--positions", str(pos)]
    assert main(args + ["--json", str(out)]) == 0
    assert "positions replayed" in capsys.readouterr().out
    cal = json.loads(out.read_text())
    assert cal["meta"]["positions"] == str(pos)
    assert all(r["ratio"] == pytest.approx(1.0, rel=1e-12) for r in cal["rows"])
    write_json(bench, {**meta, "worker": {"max_batch_size": 8, "max_k": 12}}, records)
    assert main(args) == 2  # recorded at max_k 8, the bench worker could ask for 12
    assert "max_k=8" in capsys.readouterr().err


# --- recording on a real (tiny, random) model ------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama whose greedy text falls into repeats that prompt lookup finds (init 0.1),
    with a word-level tokenizer ("t5" -> 5) and a toy chat template (tests/tiny_model.py)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-positions"))


PROMPTS = [
    tuple([7, 19, 33, 41, 58, 60] * 4 + [12, 90, 5]),
    tuple([23, 44, 81, 9, 17] * 3 + [100, 64, 3, 77]),
    tuple(range(20, 52)),
]
MAX_TOKENS = 24


def test_recorded_table_is_what_the_engine_does_at_k3(tiny):
    from smartspec.bench.positions import greedy_continuations, record_token_prompts
    from smartspec.worker.engine import Engine, EngineConfig
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.sequence import GenerationRequest
    from smartspec.worker.steps import StaticPlanner

    entries = record_token_prompts(tiny, PROMPTS, MAX_TOKENS, max_k=8, max_batch_size=1, max_context_tokens=256)
    assert [e["index"] for e in entries] == [0, 1, 2]
    for e, prompt in zip(entries, PROMPTS):
        assert e["prompt_tokens"] == len(prompt) and e["completion_tokens"] == MAX_TOKENS
        assert len(e["offered"]) == len(e["matched"]) == MAX_TOKENS - 1
        assert all(o in (0, 8) for o in e["offered"])  # prompt lookup copies all max_k or finds nothing
        assert all(0 <= m <= o for o, m in zip(e["offered"], e["matched"]))
    load_positions(table(entries))

    config = EngineConfig(max_batch_size=1, max_context_tokens=256, token_budget=512, max_k=8)
    engine = Engine(tiny, make_proposer("ngram"), config, StaticPlanner(3))
    engine.start()
    try:
        outcomes = [engine.submit(GenerationRequest(f"k3-{i}", p, MAX_TOKENS, ignore_eos=True)).result(timeout=120)
                    for i, p in enumerate(PROMPTS)]
    finally:
        engine.stop(0)
    plain = greedy_continuations(tiny, [GenerationRequest(f"k0-{i}", p, MAX_TOKENS, ignore_eos=True)
                                        for i, p in enumerate(PROMPTS)], max_batch_size=1, max_context_tokens=256)
    total_accepted = 0
    for e, outcome, text in zip(entries, outcomes, plain):
        assert list(outcome.token_ids) == text  # lossless: the table's text is the speculative run's text
        w = walk(e["offered"], e["matched"], e["completion_tokens"], 3)
        spec = outcome.speculation
        assert (spec.accepted, spec.proposed, spec.tested, spec.decode_steps) == (
            w.accepted, w.proposed, w.tested, w.decode_steps)
        total_accepted += spec.accepted
    # not vacuous: speculation was accepted, and some runs were cut short by a wrong guess
    assert total_accepted > 0
    assert any(o.speculation.tested > o.speculation.accepted for o in outcomes)
    # and the simulator, replaying the table at fixed:3, makes the same counts per request
    workload = Workload(np.array([0.0, 100.0, 200.0]), np.array([len(p) for p in PROMPTS]),
                        np.full(3, MAX_TOKENS))
    sim = simulate(workload, get("fixed"), {"k": 3}, step_model=StepModel(CPU), acceptance=replay(table(entries)),
                   worker=WorkerSpec(max_batch_size=1))
    assert sim.accepted.tolist() == [o.speculation.accepted for o in outcomes]
    assert sim.decode_steps.tolist() == [o.speculation.decode_steps for o in outcomes]


def test_record_dataset_tokenizes_like_the_worker(tiny):
    from smartspec.bench.datasets import Dataset, Prompt
    from smartspec.bench.positions import record_dataset

    prompts = tuple(Prompt(f"p{i}", (("user", text),), 10, "test", 0, "summarise")
                    for i, text in enumerate(["t7 t8 t9 t20 t7 t8 t9 t20 t7 t8", "t30 t31 t32"]))
    data = record_dataset(tiny, Dataset("summarise", "test", 3, prompts), max_k=4, max_batch_size=2,
                          max_context_tokens=256)
    assert data["kind"] == "positions" and data["max_k"] == 4 and data["proposer"] == "ngram"
    assert data["dataset"] == {"name": "summarise", "seed": 3, "prompts": 2, "max_tokens": 10}
    for i, (e, p) in enumerate(zip(data["requests"], prompts)):
        expected = tiny.tokenizer.apply_chat_template(p.as_message_dicts(), add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if not isinstance(expected, list) else expected
        assert e["index"] == i and e["prompt_tokens"] == len(expected) == len(p.messages[0][1].split()) + 3
        assert e["completion_tokens"] == 10 and max(e["offered"]) <= 4
    load_positions(data)

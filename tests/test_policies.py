"""Built-in policies, parameter validation, the registry (with entry-point plugins) and the guard."""

from __future__ import annotations

import logging
import math
import textwrap
import uuid

import numpy as np
import pytest

from smartspec.core.cost_model import DEFAULT_COST_MODEL, CostModel
from smartspec.core.policies import (
    BasePolicy,
    BatchState,
    ParameterSpec,
    ParameterType,
    PolicyError,
    Registry,
    RequestState,
    get,
    guarded_decide,
    names,
)


def batch_of(acceptances, *, max_k=8, context=200, step_index=0, pooled_evidence=float("inf"),
             **request_fields) -> BatchState:
    requests = tuple(
        RequestState(request_id=f"r{i}", acceptance=a, context_tokens=context, **request_fields)
        for i, a in enumerate(acceptances)
    )
    return BatchState(requests=requests, max_k=max_k, step_index=step_index, pooled_evidence=pooled_evidence)


def decide(name: str, batch: BatchState, cost: CostModel = DEFAULT_COST_MODEL, **params) -> list[int]:
    policy = get(name)
    return guarded_decide(policy, batch, cost, policy.validate(params))


# ---------------------------------------------------------------- validation


def test_builtins_are_registered_and_documented():
    assert {"goodput", "off", "fixed", "batch-threshold", "table", "heuristic"} <= set(names())
    for name in names():
        policy = get(name)
        assert policy.description
        for spec in policy.parameters:
            assert spec.description
            assert policy.validate({})[spec.name] == spec.default  # defaults pass their own checks
            assert spec.coerce(spec.default) == spec.default


def test_validate_fills_defaults_and_keeps_given_values():
    params = get("goodput").validate({"probe_interval": 3})
    assert params["probe_interval"] == 3
    assert params["min_gain"] == get("goodput").validate({})["min_gain"]


@pytest.mark.parametrize(
    ("policy", "raw", "field", "words"),
    [
        ("fixed", {"kk": 3}, "kk", "unknown parameter"),
        ("fixed", {"k": "3"}, "k", "integer"),
        ("fixed", {"k": True}, "k", "bool"),
        ("fixed", {"k": 2.5}, "k", "integer"),
        ("fixed", {"k": -1}, "k", ">= 0"),
        ("fixed", {"k": 65}, "k", "<= 64"),
        ("goodput", {"min_gain": float("nan")}, "min_gain", "finite"),
        ("goodput", {"min_gain": "high"}, "min_gain", "number"),
        ("table", {"ks": [1, -2, 3], "batch_sizes": [1, 2, 3]}, "ks[1]", ">= 0"),
        ("table", {"ks": 3}, "ks", "list"),
        ("table", {"ks": [1, 2]}, "ks", "one entry per"),
        ("table", {"batch_sizes": [4, 4, 8]}, "batch_sizes[1]", "increasing"),
        ("table", {"batch_sizes": [], "ks": []}, "batch_sizes", "empty"),
        ("batch-threshold", {"batch_size": 0}, "batch_size", ">= 1"),
        ("heuristic", {"start_k": 1, "min_k": 2}, "start_k", "min_k"),
    ],
)
def test_bad_parameters_name_the_field(policy, raw, field, words):
    with pytest.raises(PolicyError) as info:
        get(policy).validate(raw)
    assert info.value.field == field
    assert words in info.value.message


def test_integral_floats_are_ints_and_lists_become_tuples():
    assert get("fixed").validate({"k": 3.0}) == {"k": 3}
    params = get("table").validate({"batch_sizes": [2, 8.0], "ks": (5, 1)})
    assert params == {"batch_sizes": (2, 8), "ks": (5, 1)}
    spec = ParameterSpec("flag", ParameterType.BOOL, False, "a switch")
    with pytest.raises(PolicyError, match="true or false"):
        spec.coerce(1)


# ---------------------------------------------------------------- simple policies


def test_off_and_fixed():
    batch = batch_of([0.9, 0.1, 0.5])
    assert decide("off", batch) == [0, 0, 0]
    assert decide("fixed", batch, k=3) == [3, 3, 3]
    assert decide("fixed", batch_of([0.9], max_k=2), k=6) == [2]  # clamped to the worker's max


def test_batch_threshold_switches_off_at_the_threshold():
    assert decide("batch-threshold", batch_of([0.5] * 3), k=5, batch_size=4) == [5] * 3
    assert decide("batch-threshold", batch_of([0.5] * 4), k=5, batch_size=4) == [0] * 4
    assert decide("batch-threshold", batch_of([0.5] * 9), k=5, batch_size=4) == [0] * 9


@pytest.mark.parametrize(("size", "expected"), [(1, 7), (2, 3), (4, 3), (5, 1), (16, 1), (17, 0)])
def test_table_picks_the_range_containing_the_batch_size(size, expected):
    params = {"batch_sizes": [1, 4, 16], "ks": [7, 3, 1]}
    assert decide("table", batch_of([0.5] * size), **params) == [expected] * size


def test_heuristic_grows_after_full_acceptance_and_shrinks_otherwise():
    requests = (
        RequestState("new", 0.5, 100),  # never speculated: start value
        RequestState("hit", 0.5, 100, last_k=3, last_fully_accepted=True),
        RequestState("miss", 0.5, 100, last_k=3, last_fully_accepted=False),
        RequestState("floor", 0.5, 100, last_k=1, last_fully_accepted=False),
        RequestState("ceiling", 0.5, 100, last_k=7, last_fully_accepted=True),
    )
    batch = BatchState(requests=requests, max_k=8)
    assert decide("heuristic", batch, start_k=4) == [4, 5, 2, 1, 8]


# ---------------------------------------------------------------- goodput policy


def test_goodput_low_load_high_acceptance_speculates_to_the_limit():
    assert decide("goodput", batch_of([0.9])) == [8]
    assert decide("goodput", batch_of([0.9]), max_k=3) == [3]  # parameter caps below the worker's K


def test_goodput_same_requests_at_batch_128_with_costly_verify_do_not_speculate():
    costly = DEFAULT_COST_MODEL.replace(c_tok_ms=20.0, c_spec_ms=50.0)
    assert decide("goodput", batch_of([0.9] * 4), costly, min_gain=0.0)[0] > 0
    assert decide("goodput", batch_of([0.9] * 128), costly, min_gain=0.0) == [0] * 128


def test_goodput_low_acceptance_does_not_speculate():
    assert decide("goodput", batch_of([0.02] * 4)) == [0] * 4


def test_goodput_min_gain_requires_a_margin():
    # a = 0.45 at batch 1: speculating wins, but only by a few percent under the default model
    batch = batch_of([0.45])
    assert decide("goodput", batch, min_gain=0.0)[0] > 0
    assert decide("goodput", batch, min_gain=0.5) == [0]


def test_goodput_plans_with_the_per_count_table_only_when_asked():
    """12 plain rows cost as much as 24 tokens (the reference CPU's shape): with `count_table=true`
    every row speculates one token; by default goodput plans on the line alone and runs them plain."""
    line = CostModel(c_fixed_ms=45.0, c_tok_ms=3.0, c_spec_ms=5.0)
    cost = line.replace(token_count_ms=[0.0] * 12 + [3.0 * (24 - n) + 5.0 for n in range(12, 24)])
    batch = batch_of([0.3] * 12, max_k=4)
    assert decide("goodput", batch, cost, probe_interval=0, count_table=True) == [1] * 12
    assert decide("goodput", batch, cost, probe_interval=0) == [0] * 12


def test_probe_interval_stretches_so_probes_cost_at_most_the_budget():
    from smartspec.core.policies.goodput import PROBE_BUDGET, probe_interval_for

    assert probe_interval_for(0.0, 8) == 8 and probe_interval_for(0.1, 8) == 8  # 0.1 / 8 < 2%
    assert probe_interval_for(0.6, 8) == 30 and probe_interval_for(0.6, 8, budget=0.06) == 10
    for share in (0.05, 0.3, 0.59, 1.7):
        interval = probe_interval_for(share, 8)
        assert share / interval <= PROBE_BUDGET + 1e-12 and (interval == 8 or share / (interval - 1) > PROBE_BUDGET)


def test_goodput_probes_a_full_batch_less_often_than_a_single_request():
    """At batch 32 a probe step costs ~60% more than a plain one under the default model: due
    probes wait for a step aligned to the stretched interval, not to probe_interval."""
    from smartspec.core.cost_model import DEFAULT_COST_MODEL as model
    from smartspec.core.policies.goodput import probe_interval_for

    held = {"steps_since_speculation": 200}
    contexts = np.full(32, 200.0)
    share = float(model.predict_ms(np.ones(32), contexts) / model.predict_ms(np.zeros(32), contexts) - 1.0)
    stretched = probe_interval_for(share, 8)
    assert stretched > 16
    off_grid = 8 * stretched + 8  # a multiple of 8, not of the stretched interval
    assert off_grid % stretched != 0
    assert decide("goodput", batch_of([0.0] * 32, step_index=off_grid, context=200, **held),
                  probe_interval=8) == [0] * 32
    assert decide("goodput", batch_of([0.0] * 32, step_index=8 * stretched, context=200, **held),
                  probe_interval=8) == [1] * 32
    assert decide("goodput", batch_of([0.0], step_index=8, context=200, **held), probe_interval=8) == [1]


def test_goodput_probes_requests_held_at_zero():
    held = {"steps_since_speculation": 64}  # due at any interval the probes' cost stretches 8 to
    # nobody speculates: probes wait for an aligned step so the batch pays c_spec once per interval
    # (step 0 is aligned to any interval the cost of the probes stretches it to)
    assert decide("goodput", batch_of([0.0, 0.0], step_index=0, **held), probe_interval=8) == [1, 1]
    assert decide("goodput", batch_of([0.0, 0.0], step_index=17, **held), probe_interval=8) == [0, 0]
    assert decide("goodput", batch_of([0.0], step_index=0, **held), probe_interval=0) == [0]
    not_yet = batch_of([0.0], step_index=16, steps_since_speculation=7)
    assert decide("goodput", not_yet, probe_interval=8) == [0]
    # someone already speculates: a due probe rides along at once
    mixed = BatchState(
        requests=(
            RequestState("good", 0.95, 200),
            RequestState("held", 0.0, 200, steps_since_speculation=9),
            RequestState("fresh", 0.0, 200, steps_since_speculation=2),
        ),
        max_k=8,
        step_index=17,
    )
    ks = decide("goodput", mixed, probe_interval=8)
    assert ks[0] > 1 and ks[1:] == [1, 0]


def test_goodput_probes_at_once_while_nothing_was_ever_verified():
    """A cold controller's estimates are the default guess; trying is the only way to learn, so every
    request held at 0 is probed this very step. Once anything was verified, probes wait again."""
    cold = batch_of([0.0, 0.0], step_index=3, pooled_evidence=5.0)
    assert decide("goodput", cold, probe_interval=8) == [1, 1]
    warm = batch_of([0.0, 0.0], step_index=3, pooled_evidence=20.0)
    assert decide("goodput", warm, probe_interval=8) == [0, 0]
    assert decide("goodput", cold, probe_interval=0) == [0, 0]  # probing disabled means disabled


# ---------------------------------------------------------------- guard


class Recorder(BasePolicy):
    """Returns whatever it is told to and remembers the batch it saw."""

    name = "recorder"

    def __init__(self, answer):
        self.answer = answer
        self.seen: BatchState | None = None

    def decide(self, batch, cost, params):
        self.seen = batch
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_guard_replaces_non_finite_acceptance_by_the_prior_and_clips():
    policy = Recorder([1, 1, 1, 1])
    batch = batch_of([math.nan, math.inf, 1.7, 0.3])
    guarded_decide(policy, batch, DEFAULT_COST_MODEL, {}, prior_acceptance=0.6)
    assert [r.acceptance for r in policy.seen.requests] == [0.6, 0.6, 1.0, 0.3]


def test_guard_clamps_to_zero_and_max_k():
    batch = batch_of([0.5] * 4, max_k=4)
    assert guarded_decide(Recorder([-3, 2, 9, 4]), batch, DEFAULT_COST_MODEL, {}) == [0, 2, 4, 4]


@pytest.mark.parametrize("answer", [RuntimeError("boom"), [1, 2], [1, math.nan, 1], ["a", "b", "c"], None])
def test_guard_falls_back_to_no_speculation_and_logs(answer, caplog):
    batch = batch_of([0.5] * 3)
    with caplog.at_level(logging.ERROR, logger="smartspec.core.policies.guard"):
        assert guarded_decide(Recorder(answer), batch, DEFAULT_COST_MODEL, {}) == [0, 0, 0]
    assert "recorder" in caplog.text


def test_guard_turns_an_impossible_cost_model_into_no_speculation():
    assert decide("goodput", batch_of([0.9, 0.9]), CostModel()) == [0, 0]


# ---------------------------------------------------------------- registry


def test_registry_get_unknown_names_the_field():
    with pytest.raises(PolicyError) as info:
        get("no-such-policy")
    assert info.value.field == "name"
    assert "goodput" in info.value.message  # lists what exists
    assert str(info.value).startswith("name: unknown policy 'no-such-policy'")
    with pytest.raises(KeyError):  # a failed lookup is also a KeyError
        get("no-such-policy")


def test_registry_rejects_duplicates_and_non_policies():
    registry = Registry([get("off")])
    with pytest.raises(ValueError, match="already registered"):
        registry.register(get("off"))
    registry.register(get("off"), replace=True)
    with pytest.raises(TypeError):
        registry.register(object())
    assert registry.names() == ["off"]
    assert [p.name for p in registry.list()] == ["off"]


def test_entry_point_plugins_load_from_a_dist_info_on_sys_path(tmp_path, monkeypatch, caplog):
    module = f"smartspec_test_plugin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        from smartspec.core.policies import BasePolicy, ParameterSpec, ParameterType

        class Always(BasePolicy):
            description = "always k"
            parameters = (ParameterSpec("k", ParameterType.INT, 2, "the k", minimum=0),)

            def __init__(self, name):
                self.name = name

            def decide(self, batch, cost, params):
                return [params["k"]] * len(batch.requests)

        OBJECT = Always("plugin-object")

        def factory():
            return Always("plugin-factory")

        NOT_A_POLICY = 42
    """))
    dist = tmp_path / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(f"""
        [smartspec.policies]
        object = {module}:OBJECT
        factory = {module}:factory
        broken = {module}:NOT_A_POLICY
        missing = {module}:NOWHERE
    """))
    monkeypatch.syspath_prepend(str(tmp_path))

    registry = Registry([get("off")])
    with caplog.at_level(logging.ERROR):
        added = registry.load_entry_points()

    assert sorted(added) == ["plugin-factory", "plugin-object"]
    assert "broken" in caplog.text and "missing" in caplog.text  # bad plugins are skipped, loudly
    plugin = registry.get("plugin-factory")
    assert guarded_decide(plugin, batch_of([0.5] * 2), DEFAULT_COST_MODEL, plugin.validate({"k": 3})) == [3, 3]


def test_parameter_types_match_the_wire_enum():
    from smartspec.v1 import admin_pb2

    for kind in ParameterType:
        assert admin_pb2.ParameterType.Value(f"PARAMETER_TYPE_{kind.name}") == kind.value

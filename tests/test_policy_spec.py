"""One policy-spec grammar (smartspec.core.policy_spec) behind every command line that names a
policy: `policy set`, `worker --local-policy`, `bench --policies`, `simulate --policies`."""

from __future__ import annotations

import pytest

from smartspec.bench import cli as bench_cli
from smartspec.bench import simulate_cli
from smartspec.cli import build_parser, main
from smartspec.clients.errors import InvalidArgumentError
from smartspec.clients.policy_cli import parse_policy_set
from smartspec.clients.types import ParameterSchema, PolicyInfo
from smartspec.controller.codec import policy_info
from smartspec.core.errors import FieldError
from smartspec.core.policies import ParameterType, get, list_policies
from smartspec.core.policy_spec import (
    parse_policy_list,
    parse_policy_spec,
    read_policy_spec,
    split_policy_list,
)
from smartspec.worker.local_policy import local_policy_choice

# spec -> the parameters it names (before defaults are filled in)
SPECS = {
    "off": ("off", {}),
    "fixed": ("fixed", {}),
    "fixed:3": ("fixed", {"k": 3}),
    "fixed:k=3": ("fixed", {"k": 3}),
    " fixed : k = 3 ": ("fixed", {"k": 3}),
    "goodput:max_k=6,min_gain=0.05": ("goodput", {"max_k": 6, "min_gain": 0.05}),
    "goodput:max_k=6:min_gain=0.05": ("goodput", {"max_k": 6, "min_gain": 0.05}),
    "goodput:6,probe_interval=4": ("goodput", {"max_k": 6, "probe_interval": 4}),
    "batch-threshold:2:16": ("batch-threshold", {"k": 2, "batch_size": 16}),
    "table:batch_sizes=1/8,ks=5/0": ("table", {"batch_sizes": [1, 8], "ks": [5, 0]}),
    "heuristic:start_k=3,min_k=2": ("heuristic", {"start_k": 3, "min_k": 2}),
}


def controller_schemas() -> list[PolicyInfo]:
    """What `policy set` reads from the controller (ListPolicies), built by the controller's codec."""
    return [PolicyInfo.from_proto(policy_info(policy)) for policy in list_policies()]


def bench_policies(text: str):
    args = build_parser(only="bench").parse_args(["bench", "--policies", text, "--requests", "1"])
    return bench_cli.read_inputs(args).policies


def simulate_policies(text: str):
    args = build_parser(only="simulate").parse_args(["simulate", "--policies", text])
    return simulate_cli.read_inputs(args).policies


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_every_documented_form_reads_to_the_same_name_and_typed_parameters(spec):
    name, params = SPECS[spec]
    assert read_policy_spec(spec) == (name, params)
    assert {k: type(v) for k, v in read_policy_spec(spec).params.items()} == {k: type(v) for k, v in params.items()}
    assert parse_policy_spec(spec) == (name, get(name).validate(params))   # defaults filled, bounds checked


def test_one_grammar_through_policy_set_local_policy_bench_and_simulate():
    schemas = controller_schemas()
    specs = [spec.strip() for spec in SPECS if spec.strip() != "off"]
    listed = "off," + ",".join(specs)
    bench = bench_policies(listed)
    simulate = simulate_policies(listed)
    assert [label for label, _, _ in bench] == ["off", *specs] == [label for label, _, _ in simulate]
    for index, spec in enumerate(specs, start=1):
        expected = parse_policy_spec(spec)
        set_name, set_params = parse_policy_set(schemas, spec)          # what `policy set SPEC` sends
        assert (set_name, set_params) == read_policy_spec(spec)          # the controller fills defaults
        assert (set_name, get(set_name).validate(set_params)) == expected
        choice = local_policy_choice(spec)                               # `worker --local-policy SPEC`
        assert (choice.name, dict(choice.params)) == expected and choice.policy is get(expected.name)
        assert bench[index][1:] == expected == simulate[index][1:]


def test_key_value_words_are_the_same_parameters_as_in_the_spec():
    schemas = controller_schemas()
    # `policy set table --param batch_sizes=1,8 --param ks=5,0` (a word holds one parameter, so a list
    # may use commas) is `table:batch_sizes=1/8,ks=5/0`
    assert parse_policy_set(schemas, "table", ["batch_sizes=1,8", "ks=5,0"]) == \
        parse_policy_set(schemas, "table:batch_sizes=1/8,ks=5/0") == ("table", {"batch_sizes": [1, 8], "ks": [5, 0]})
    assert parse_policy_set(schemas, "fixed", ["k=3"]) == parse_policy_set(schemas, "fixed:3") == ("fixed", {"k": 3})
    # `worker --local-policy fixed --local-policy-param k=5`; words come after the spec's ARGS, later wins
    assert local_policy_choice("fixed", ["k=5"]).params == parse_policy_spec("fixed:k=5").params == {"k": 5}
    assert parse_policy_spec("fixed:3", ["k=5"]).params == {"k": 5}
    assert parse_policy_spec("goodput:min_gain=0.5", ["max_k=2"]) == parse_policy_spec("goodput:max_k=2,min_gain=0.5")


def test_values_are_typed_by_the_schema_the_caller_passes_else_the_registry_else_their_look():
    assert read_policy_spec("goodput:min_gain=1").params == {"min_gain": 1.0}     # registry: FLOAT
    assert type(read_policy_spec("goodput:min_gain=1").params["min_gain"]) is float
    assert read_policy_spec("fixed:3", schema=[("k", ParameterType.FLOAT)]).params == {"k": 3.0}
    assert type(read_policy_spec("fixed:3", schema=[("k", ParameterType.FLOAT)]).params["k"]) is float
    assert read_policy_spec("fixed:k=3", schema=[("k", ParameterType.STRING)]).params == {"k": "3"}
    for word, value in (("yes", True), ("OFF", False), ("1", True), ("false", False)):
        assert read_policy_spec(f"p:b={word}", schema=[("b", ParameterType.BOOL)]).params == {"b": value}
    # a policy this process does not know: by the look of each value
    unknown = read_policy_spec("plugin:a=1,b=0.5,c=true,d=4/2,e=fast", ["f=3,4", "g=x:y"])
    assert unknown == ("plugin", {"a": 1, "b": 0.5, "c": True, "d": [4, 2], "e": "fast", "f": [3, 4], "g": "x:y"})
    assert [type(v) for v in unknown.params.values()] == [int, float, bool, list, str, list, str]
    # `policy set` types by the controller's schema even where this process knows another
    newer = [PolicyInfo("fixed", "", (ParameterSchema("k", "float", 4.0, ""),))]
    assert parse_policy_set(newer, "fixed:3") == ("fixed", {"k": 3.0})


def test_a_list_splits_at_commas_that_do_not_start_a_parameter():
    assert split_policy_list("off,fixed:1,fixed:3,fixed:5,goodput") == ["off", "fixed:1", "fixed:3", "fixed:5",
                                                                       "goodput"]
    assert split_policy_list(" off , goodput:max_k=6,min_gain=0.05,table:ks=4/2,batch_sizes=1/8,fixed:k=3,") == [
        "off", "goodput:max_k=6,min_gain=0.05", "table:ks=4/2,batch_sizes=1/8", "fixed:k=3"]
    labels = [label for label, _, _ in parse_policy_list("off,goodput:max_k=6,min_gain=0.05,fixed:3")]
    assert labels == ["off", "goodput:max_k=6,min_gain=0.05", "fixed:3"]
    # a label re-reads to the same policy (bench records name their policy by it; calibrate re-reads it)
    for label, name, params in parse_policy_list("off,goodput:max_k=6,min_gain=0.05,table:ks=4/2,batch_sizes=1/8"):
        assert parse_policy_spec(label) == (name, params)


@pytest.mark.parametrize("spec, field, words", [
    ("fixed:x", "policy.k", "expected int, got 'x'"),
    ("fixed:k=three", "policy.k", "expected int"),
    ("goodput:min_gain=fast", "policy.min_gain", "expected float"),
    ("table:ks=4/x", "policy.ks", "expected int_list"),
    ("fixed:kk=1", "policy.kk", "unknown parameter of 'fixed' (allowed: k)"),
    ("fixed:k=1000", "policy.k", "must be <= 64"),                    # the policy's own bounds
    ("table:ks=-1/2", "policy.ks[0]", "must be >= 0"),
    ("warp:9", "policy", "unknown policy 'warp'"),
    ("fixed:1:2", "policy", "at most 1 positional"),
    ("table:ks=4,2", "policy", "positional value '2' after a named one"),
    ("", "policy", "no policy name"),
    (":3", "policy", "no policy name"),
    ("k=3", "policy", "is not NAME[:ARGS]"),
])
def test_bad_specs_are_field_errors_naming_the_field(spec, field, words):
    with pytest.raises(FieldError) as caught:
        parse_policy_spec(spec)
    assert caught.value.field == field and words in caught.value.message
    assert str(caught.value).startswith(f"{field}: ")


def test_each_command_line_names_its_own_field():
    with pytest.raises(FieldError) as caught:
        local_policy_choice("fixed:x")
    assert caught.value.field == "local_policy.k"
    with pytest.raises(FieldError) as caught:
        local_policy_choice("fixed", ["k"])
    assert caught.value.field == "local_policy" and "KEY=VALUE" in caught.value.message
    with pytest.raises(FieldError) as caught:
        parse_policy_list("off,fixed:3,warp")
    assert caught.value.field == "policies[2]"
    with pytest.raises(FieldError) as caught:
        parse_policy_list(" , ")
    assert caught.value.field == "policies"
    with pytest.raises(FieldError) as caught:
        read_policy_spec("plugin:3")          # no schema: a positional value has no parameter to go to
    assert caught.value.field == "policy" and "KEY=VALUE" in caught.value.message
    with pytest.raises(InvalidArgumentError, match=r"policy\.k: expected int, got 'x'"):
        parse_policy_set(controller_schemas(), "fixed:k=x")
    with pytest.raises(InvalidArgumentError, match="unknown policy 'warp'"):
        parse_policy_set(controller_schemas(), "warp:3")


def test_bench_and_simulate_exit_2_naming_the_spec_at_fault(capsys):
    assert main(["simulate", "--policies", "off,fixed:k=x", "--requests", "5"]) == 2
    assert "policies[1].k: expected int, got 'x'" in capsys.readouterr().err
    assert main(["bench", "--worker", "127.0.0.1:1", "--controller", "127.0.0.1:2",
                 "--policies", "off,goodput:max_k=6,min_gain=20"]) == 2
    assert "policies[1].min_gain: must be <= 10" in capsys.readouterr().err

"""Client subcommands end to end: `smartspec policy|status` against a real ControllerServer on a
real Redis, `smartspec generate` against a real gRPC worker servicer; exit codes and error lines."""

from __future__ import annotations

import json

import pytest

from smartspec.cli import main
from smartspec.controller.server import ControllerServer
from smartspec.clients.errors import InvalidArgumentError
from smartspec.clients.policy_cli import parse_parameters
from smartspec.core.security import ServerSecurity
from smartspec.clients.types import ParameterSchema, PolicyInfo
from smartspec.v1 import generation_pb2_grpc
from test_sdk import AioServerThread, EchoGeneration, free_closed_port, self_signed_certificate


def smartspec(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_policy_set_then_get_round_trips_typed_values(controller, capsys):
    addr = ("--controller", controller.address)
    code, out, _ = smartspec(capsys, "policy", "get", "--json", *addr)
    assert code == 0
    before = json.loads(out)["version"]

    code, out, err = smartspec(capsys, "policy", "set", "table", "--param", "batch_sizes=1,8",
                               "--param", "ks=5,0", *addr)
    assert code == 0, err
    assert "table" in out and f"version {before + 1}" in out

    code, out, _ = smartspec(capsys, "policy", "get", "--json", *addr)
    active = json.loads(out)
    assert active["name"] == "table" and active["version"] == before + 1
    assert active["parameters"]["batch_sizes"] == [1, 8] and active["parameters"]["ks"] == [5, 0]

    code, out, _ = smartspec(capsys, "policy", "set", "goodput", "--param", "min_gain=0.25", "--json",
                             "--expected-version", str(before + 1), *addr)
    assert code == 0 and json.loads(out)["parameters"]["min_gain"] == 0.25


def test_policy_set_bad_input_exits_2_with_one_clear_line(controller, capsys):
    addr = ("--controller", controller.address)
    cases = [
        (("policy", "set", "fixed", "--param", "k=three"), "k"),            # not an int (parsed here)
        (("policy", "set", "fixed", "--param", "k=1000"), '"k"'),           # out of bounds (controller)
        (("policy", "set", "fixed", "--param", "kk=1"), "kk"),               # no such parameter
        (("policy", "set", "no-such-policy"), "no-such-policy"),
    ]
    for argv, field in cases:
        code, out, err = smartspec(capsys, *argv, *addr)
        assert code == 2, (argv, err)
        assert out == "" and len(err.strip().splitlines()) == 1
        assert "INVALID_ARGUMENT" in err and field in err


def test_stale_expected_version_is_failed_precondition_exit_1(controller, capsys):
    addr = ("--controller", controller.address)
    smartspec(capsys, "policy", "set", "off", *addr)
    smartspec(capsys, "policy", "set", "off", *addr)
    code, _, err = smartspec(capsys, "policy", "set", "off", "--expected-version", "1", *addr)
    assert code == 1 and "FAILED_PRECONDITION" in err


def test_policy_list_shows_every_policy_with_schema(controller, capsys):
    code, out, _ = smartspec(capsys, "policy", "list", "--json", "--controller", controller.address)
    policies = {p["name"]: p for p in json.loads(out)}
    assert {"goodput", "off", "fixed", "table"} <= set(policies)
    k = next(p for p in policies["fixed"]["parameters"] if p["name"] == "k")
    assert k["type"] == "int" and k["minimum"] is not None
    code, text, _ = smartspec(capsys, "policy", "list", "--controller", controller.address)
    assert code == 0 and "goodput:" in text and "batch_sizes" in text


def test_status_reports_policy_and_redis(controller, capsys, monkeypatch):
    monkeypatch.setenv("SMARTSPEC_CONTROLLER", controller.address)  # flags are env vars too
    smartspec(capsys, "policy", "set", "fixed", "--param", "k=2")
    code, out, _ = smartspec(capsys, "status", "--json")
    status = json.loads(out)
    assert code == 0 and status["redis_ok"] is True
    assert status["policy"]["name"] == "fixed" and status["policy"]["parameters"] == {"k": 2}
    code, text, _ = smartspec(capsys, "status")
    assert "fixed" in text and "redis ok" in text


def test_unreachable_controller_exits_1(capsys):
    code, out, err = smartspec(capsys, "status", "--controller", f"127.0.0.1:{free_closed_port()}", "--timeout", "2")
    assert code == 1 and out == "" and "UNAVAILABLE" in err


def test_token_is_sent_and_checked(redis_url, redis_prefix, capsys):
    server = ControllerServer(port=0, redis_url=redis_url, prefix=redis_prefix,
                              security=ServerSecurity(auth_token="t0ken"))
    server.start()
    try:
        code, _, err = smartspec(capsys, "policy", "get", "--controller", server.address, "--token", "nope")
        assert code == 1 and "UNAUTHENTICATED" in err
        code, out, _ = smartspec(capsys, "policy", "get", "--controller", server.address, "--token", "t0ken")
        assert code == 0 and "version" in out
    finally:
        server.stop(grace=0)


@pytest.fixture
def echo_worker():
    servicer = EchoGeneration()
    server = AioServerThread([(generation_pb2_grpc.add_GenerationServicer_to_server, servicer)])
    yield server, servicer
    server.stop()


def test_generate_streams_text_and_json_has_stats(echo_worker, capsys):
    server, servicer = echo_worker
    code, out, err = smartspec(capsys, "generate", "--worker", server.address, "red green blue", "--max-tokens", "2",
                               "--temperature", "0", "--stop", "X", "--stop", "Y", "--seed", "3")
    assert code == 0 and out == "red green \n" and "acceptance" in err
    sent = servicer.received[-1]
    assert list(sent.stop) == ["X", "Y"] and sent.seed == 3 and sent.max_tokens == 2

    code, out, _ = smartspec(capsys, "generate", "--worker", server.address, "--json", "--chat",
                             "--system", "sys words", "user words", "--max-tokens", "10")
    result = json.loads(out)
    assert code == 0 and result["text"] == "sys words user words "
    assert set(result["speculation"]) >= {"acceptance_rate", "speculation_lengths", "mean_accepted_length"}
    assert result["usage"]["completion_tokens"] == 4
    assert [m.role for m in servicer.received[-1].messages] == ["system", "user"]


def test_generate_rejected_by_worker_exits_2(echo_worker, capsys):
    server, _ = echo_worker
    code, out, err = smartspec(capsys, "generate", "--worker", server.address, "a", "--max-tokens", "999")
    assert code == 2 and "INVALID_ARGUMENT" in err and "max_tokens" in err


def test_parameter_parsing_follows_the_schema():
    def parse(kind: str, raw: str):
        policy = PolicyInfo("pol", "", (ParameterSchema("p", kind, "", None),))
        return parse_parameters(policy, [f"p={raw}"])["p"]

    assert parse("int", "7") == 7
    assert parse("float", "0.5") == 0.5
    assert [parse("bool", v) for v in ("true", "OFF", "1", "no")] == [True, False, True, False]
    assert parse("int_list", "4, 2,0") == [4, 2, 0]
    assert parse("string", "a=b") == "a=b"
    for kind, raw in (("int", "1.5"), ("bool", "maybe"), ("int_list", "1,x"), ("float", "fast")):
        with pytest.raises(InvalidArgumentError, match=f"expected {kind}"):
            parse(kind, raw)
    policy = PolicyInfo("fixed", "", (ParameterSchema("k", "int", 4, ""),))
    assert parse_parameters(policy, ["k=2"]) == {"k": 2}
    with pytest.raises(InvalidArgumentError, match="KEY=VALUE"):
        parse_parameters(policy, ["k"])


def test_generate_over_tls_with_token(tmp_path, capsys):
    key, cert = self_signed_certificate(tmp_path)
    server = AioServerThread([(generation_pb2_grpc.add_GenerationServicer_to_server, EchoGeneration())],
                             ServerSecurity(auth_token="tok", tls_cert_file=str(cert), tls_key_file=str(key)))
    try:
        worker = ("--worker", f"localhost:{server.port}")
        code, out, _ = smartspec(capsys, "generate", *worker, "--tls-ca", str(cert), "--token", "tok", "over tls", "--max-tokens", "5")
        assert code == 0 and out == "over tls \n"
        code, _, err = smartspec(capsys, "generate", *worker, "--tls-ca", str(cert), "over tls", "--max-tokens", "5")
        assert code == 1 and "UNAUTHENTICATED" in err
    finally:
        server.stop()

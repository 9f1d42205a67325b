"""deploy/k8s against the Kubernetes API schemas (kubernetes-validate, offline, strict) and against the
code: every SMARTSPEC_* variable is a flag of the container's subcommand and reaches its parsed
options, probes ask the gRPC health of the port and service each server really serves, the worker
Service is headless (what the SDK's dns:/// round robin needs), names and ports line up.

(No cluster here: kubernetes-validate ships the OpenAPI schemas of each Kubernetes release.)
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from smartspec.cli import build_parser
from smartspec.clients.addresses import ADMIN_SERVICE, GENERATION_SERVICE, Servers
from smartspec.controller.server import SERVICE_NAMES as CONTROLLER_SERVICES
from smartspec.worker.server import GENERATION_SERVICE as WORKER_SERVICE
from test_compose import option_for_env, subcommand_parser

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
DOCUMENTS = [doc for name in KUSTOMIZATION["resources"] for doc in yaml.safe_load_all((K8S / name).read_text())
             if doc]
# The oldest release these manifests are for (gRPC probes are GA since 1.27) and the newest schemas shipped.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def objects(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in DOCUMENTS if doc["kind"] == kind}


def workloads() -> dict[str, dict]:
    return {**objects("Deployment"), **objects("StatefulSet")}


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def smartspec_containers() -> list[tuple[str, dict]]:
    """(workload name, container) of every container that runs the smartspec image."""
    return [(name, c) for name, w in workloads().items() for c in containers(w) if c["image"].startswith("smartspec")]


def env_values(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def errors(document: dict, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [exc.message]
    return []


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_matches_the_kubernetes_schemas(version):
    assert {doc["kind"] for doc in DOCUMENTS} >= {"Namespace", "Service", "StatefulSet", "Deployment"}
    for document in DOCUMENTS:
        assert errors(document, version) == [], (document["kind"], document["metadata"]["name"])


def test_schema_check_catches_mistakes():
    worker = copy.deepcopy(objects("StatefulSet")["smartspec-worker"])
    container = containers(worker)[0]
    container["readinessProbe"]["grpc"]["port"] = "grpc"           # grpc probes take a number only
    assert errors(worker, VERSIONS[-1])
    worker = copy.deepcopy(objects("StatefulSet")["smartspec-worker"])
    containers(worker)[0]["resources"]["limit"] = {"cpu": "1"}      # misspelt key: strict rejects it
    assert errors(worker, VERSIONS[-1])


def test_kustomization_lists_every_file_and_names_every_smartspec_image():
    assert sorted(KUSTOMIZATION["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    images = {image["name"] for image in KUSTOMIZATION["images"]}
    assert {c["image"].split(":")[0] for _, c in smartspec_containers()} <= images
    assert KUSTOMIZATION["namespace"] == objects("Namespace").popitem()[0]


@pytest.mark.parametrize("workload,container", smartspec_containers(), ids=lambda v: v if isinstance(v, str) else "")
def test_variables_are_flags_of_the_subcommand_and_reach_its_options(workload, container, monkeypatch):
    command = container["args"]
    for key in list(os.environ):
        if key.startswith("SMARTSPEC_"):
            monkeypatch.delenv(key)
    values = env_values(container)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    parser = subcommand_parser(command[0])   # built after the env is set: env feeds the defaults
    for entry in container["env"]:
        assert entry["name"].startswith("SMARTSPEC_"), entry["name"]
        assert option_for_env(parser, entry["name"]) is not None, \
            f"{workload}: {entry['name']} is not a flag of `smartspec {command[0]}`"
    args = build_parser(only=command[0]).parse_args(command)   # exactly what the container runs
    for variable, raw in values.items():
        action = option_for_env(parser, variable)
        expected = action.type(raw) if action.type else raw
        assert getattr(args, action.dest) == expected, f"{workload}: {variable} did not reach --{action.dest}"


@pytest.mark.parametrize("workload,container", smartspec_containers(), ids=lambda v: v if isinstance(v, str) else "")
def test_probes_ask_grpc_health_of_the_served_port_and_service(workload, container):
    served = {"controller": CONTROLLER_SERVICES, "worker": (WORKER_SERVICE,)}[container["args"][0]]
    port = int(env_values(container)["SMARTSPEC_PORT"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"] == port
    probes = [container[key] for key in ("startupProbe", "readinessProbe", "livenessProbe") if key in container]
    assert len(probes) >= 2
    for probe in probes:
        assert probe["grpc"] == {"port": port, "service": probe["grpc"]["service"]}
        assert probe["grpc"]["service"] in served
    metrics = int(env_values(container)["SMARTSPEC_METRICS_PORT"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == metrics


def test_worker_service_is_headless_so_dns_round_robin_finds_every_worker():
    worker = objects("StatefulSet")["smartspec-worker"]
    service = objects("Service")[worker["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == int(env_values(containers(worker)[0])["SMARTSPEC_PORT"])
    # the address the manifest tells clients to use is one the SDK balances with health checks
    target = f"dns:///{service['metadata']['name']}.{KUSTOMIZATION['namespace']}.svc.cluster.local:{grpc_port['port']}"
    assert target in (K8S / "worker.yaml").read_text()
    servers = Servers.parse(target, "worker")
    assert servers.balanced and servers.health_service == GENERATION_SERVICE == WORKER_SERVICE
    assert ADMIN_SERVICE in CONTROLLER_SERVICES


def test_workers_request_one_gpu_each_and_find_the_controller_service():
    worker = objects("StatefulSet")["smartspec-worker"]
    container = containers(worker)[0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    env = env_values(container)
    assert env["SMARTSPEC_DEVICE"].startswith("cuda")
    host, port = env["SMARTSPEC_CONTROLLER"].rsplit(":", 1)
    controller_service = objects("Service")[host]
    assert any(p["port"] == int(port) for p in controller_service["spec"]["ports"])
    # the worker id comes from the pod name: unique per replica
    worker_id = next(e for e in container["env"] if e["name"] == "SMARTSPEC_WORKER_ID")
    assert worker_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_two_controller_replicas_behind_a_service_share_the_persistent_redis():
    controller = objects("Deployment")["smartspec-controller"]
    assert controller["spec"]["replicas"] == 2
    service = objects("Service")["smartspec-controller"]
    assert service["spec"]["selector"].items() <= controller["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"].get("clusterIP") != "None"

    redis_url = env_values(containers(controller)[0])["SMARTSPEC_REDIS"]
    host, port = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", redis_url).groups()
    redis_service = objects("Service")[host]
    redis = objects("StatefulSet")["smartspec-redis"]
    assert redis_service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    assert any(p["port"] == int(port) for p in redis_service["spec"]["ports"])
    server = containers(redis)[0]
    args = server["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    assert any(m["mountPath"] == data_dir and m["name"] in claims for m in server["volumeMounts"])


def test_every_container_runs_as_non_root_with_limits():
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    for name, workload in workloads().items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert {"requests", "limits"} <= set(container["resources"]), name
            if container["image"].startswith("smartspec"):
                assert pod["securityContext"]["runAsUser"] == uid, name
                # read-only root: the writable places the servers use are volumes ($HOME holds the
                # model converted from GGUF, smartspec.worker.model.loading.cache_root)
                mounts = {m["mountPath"] for m in container["volumeMounts"]}
                assert "/tmp" in mounts, name
                if container["args"][0] == "worker":
                    assert "/home/smartspec" in mounts


def test_readme_gives_the_one_apply_command():
    assert "kubectl apply -k deploy/k8s" in (ROOT / "README.md").read_text()

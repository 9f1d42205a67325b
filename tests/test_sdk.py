"""SDK against real grpc.aio servers on loopback: streaming, sync == async, typed errors, retries,
deadlines, bearer tokens and TLS, several workers behind gRPC's round robin with health checks.

The servicers here are small but real gRPC servers (the wire contract, real sockets); they let the
tests control exactly which status code comes back and count how often a call arrived.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from smartspec import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    SmartspecError,
    TextDelta,
    UnauthenticatedError,
    UnavailableError,
)
from smartspec.clients.addresses import GENERATION_SERVICE, Servers
from smartspec.clients.retry import RetryPolicy, backoff_s
from smartspec.core.security import ServerSecurity
from smartspec.clients.types import to_policy_spec
from smartspec.core.codec import value_from_proto, value_to_proto
from smartspec.core.errors import FieldError
from smartspec.v1 import admin_pb2, admin_pb2_grpc, common_pb2, generation_pb2, generation_pb2_grpc

MAX_TOKENS_LIMIT = 50


class EchoGeneration(generation_pb2_grpc.GenerationServicer):
    """Streams the prompt's words back one delta each, then a result computed from what it sent."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.cancelled = threading.Event()
        self.received: list[generation_pb2.GenerateRequest] = []
        self.info_calls = 0

    async def Generate(self, request, context):
        self.received.append(request)
        if request.max_tokens > MAX_TOKENS_LIMIT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_tokens: must be <= {MAX_TOKENS_LIMIT}")
        if request.prompt == "queue-full":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (8 waiting)")
        if request.request_id and request.request_id in self.running:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request.request_id!r} is running")
        self.running.add(request.request_id)
        source = request.prompt or " ".join(m.content for m in request.messages)
        words = source.split()[: request.max_tokens or None]
        try:
            for index, word in enumerate(words):
                if request.prompt == "slow" or source.startswith("slow"):
                    await asyncio.sleep(0.2)
                yield generation_pb2.GenerateResponse(
                    delta=generation_pb2.TokenDelta(text=word + " ", token_ids=[index, index + 100])
                )
            lengths = [index % 3 for index in range(len(words))]
            yield generation_pb2.GenerateResponse(
                result=generation_pb2.GenerationResult(
                    request_id=request.request_id or "generated-id",
                    text="".join(w + " " for w in words),
                    finish_reason=generation_pb2.FINISH_REASON_LENGTH,
                    usage=generation_pb2.Usage(prompt_tokens=len(source.split()), completion_tokens=len(words)),
                    speculation=generation_pb2.SpeculationStats(
                        proposed_tokens=sum(lengths), accepted_tokens=sum(lengths) // 2,
                        acceptance_rate=0.5, steps=len(words), speculation_lengths=lengths,
                    ),
                    time_to_first_token_ms=1.5,
                    total_ms=9.25,
                )
            )
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.running.discard(request.request_id)

    async def GetWorkerInfo(self, request, context):
        self.info_calls += 1
        return generation_pb2.WorkerInfo(
            worker_id="echo-0", model="echo", proposer="ngram", proposer_kind=common_pb2.PROPOSER_KIND_NGRAM,
            max_speculation_length=5, local_policy=common_pb2.PolicySpec(name="fixed"), reports_proposable_tokens=True,
        )


class FlakyAdmin(admin_pb2_grpc.AdminServicer):
    """Keeps a policy in memory; the first `failures` calls of each method answer UNAVAILABLE."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}
        self.active = admin_pb2.ActivePolicy(policy=common_pb2.PolicySpec(name="goodput"), version=1)

    async def _maybe_fail(self, method: str, context) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "redis unreachable")

    async def ListPolicies(self, request, context):
        await self._maybe_fail("ListPolicies", context)
        k = admin_pb2.ParameterSchema(
            name="k", type=admin_pb2.PARAMETER_TYPE_INT, default_value=common_pb2.ParameterValue(int_value=3),
            minimum=0, maximum=8,
        )
        return admin_pb2.ListPoliciesResponse(policies=[admin_pb2.PolicyInfo(name="fixed", parameters=[k])])

    async def GetPolicy(self, request, context):
        await self._maybe_fail("GetPolicy", context)
        return self.active

    async def SetPolicy(self, request, context):
        await self._maybe_fail("SetPolicy", context)
        if request.expected_version and request.expected_version != self.active.version:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"policy version is {self.active.version}")
        self.active = admin_pb2.ActivePolicy(policy=request.policy, version=self.active.version + 1)
        return self.active

    async def GetStatus(self, request, context):
        await self._maybe_fail("GetStatus", context)
        worker = admin_pb2.WorkerStatus(worker_id="w0", acceptance_rate=0.25, goodput_tok_s=12.0,
                                        cost_model=common_pb2.CostModel(c_fixed_ms=4.0))
        return admin_pb2.ControllerStatus(policy=self.active, workers=[worker], redis_ok=True, controller_id="c1")


class AioServerThread:
    """A grpc.aio server on its own event-loop thread (so blocking and async clients can both call it)."""

    def __init__(self, servicers, security: ServerSecurity = ServerSecurity()) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(servicers, security), self.loop).result(10)
        self.address = f"127.0.0.1:{self.port}"

    async def _start(self, servicers, security: ServerSecurity) -> int:
        self.server = grpc.aio.server(interceptors=security.aio_interceptors())
        for add, servicer in servicers:
            add(servicer, self.server)
        port = security.add_port(self.server, "127.0.0.1:0")
        await self.server.start()
        return port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def echo():
    servicer = EchoGeneration()
    server = AioServerThread([(generation_pb2_grpc.add_GenerationServicer_to_server, servicer)])
    yield server, servicer
    server.stop()


def admin_server(failures: int = 0) -> tuple[AioServerThread, FlakyAdmin]:
    servicer = FlakyAdmin(failures)
    return AioServerThread([(admin_pb2_grpc.add_AdminServicer_to_server, servicer)]), servicer


def free_closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- generation ---------------------------------------------------------------------------------


def test_async_stream_deltas_then_result(echo):
    server, servicer = echo

    async def run():
        async with AsyncClient(worker=server.address) as client:
            stream = client.generate("alpha beta gamma delta", max_tokens=3, temperature=0.0, seed=7, stop="END")
            with pytest.raises(RuntimeError):
                stream.result  # not finished yet
            deltas = [d async for d in stream]
            return deltas, stream.result

    deltas, result = asyncio.run(run())
    assert [d.text for d in deltas] == ["alpha ", "beta ", "gamma "]
    assert deltas[1] == TextDelta("beta ", (1, 101))
    assert result.text == "".join(d.text for d in deltas)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == len(deltas) and result.usage.prompt_tokens == 4
    assert result.speculation.speculation_lengths == (0, 1, 2)
    sent = servicer.received[-1]
    # optional fields are set only when given; a lone stop string stays one stop string
    assert sent.HasField("temperature") and sent.seed == 7 and not sent.HasField("top_p")
    assert list(sent.stop) == ["END"]


def test_sync_client_equals_async_client(echo):
    server, _ = echo
    prompt = "one two three four five"

    async def run_async():
        async with AsyncClient(worker=server.address) as client:
            stream = client.generate(prompt, max_tokens=4)
            deltas = [d async for d in stream]
            return deltas, stream.result, await client.worker_info()

    async_deltas, async_result, async_info = asyncio.run(run_async())
    with Client(worker=server.address) as client:
        stream = client.generate(prompt, max_tokens=4)
        sync_deltas = list(stream)
        assert sync_deltas == async_deltas
        assert stream.result == async_result
        assert client.complete(prompt, max_tokens=4) == async_result
        assert client.worker_info() == async_info
    assert async_info.proposer_kind == "ngram" and async_info.local_policy.name == "fixed"
    assert async_info.reports_proposable_tokens


def test_chat_sends_messages_in_all_accepted_shapes(echo):
    server, servicer = echo
    with Client(worker=server.address) as client:
        result = client.complete(
            [{"role": "system", "content": "be brief"}, ("user", "hello there")], max_tokens=10
        )
    sent = servicer.received[-1]
    assert sent.prompt == "" and [(m.role, m.content) for m in sent.messages] == [
        ("system", "be brief"), ("user", "hello there")]
    assert result.text == "be brief hello there "


def test_cancel_frees_the_server_side_request(echo):
    server, servicer = echo

    async def run():
        async with AsyncClient(worker=server.address) as client:
            stream = client.generate("slow " * 20, max_tokens=20)
            first = await stream.__anext__()
            stream.cancel()
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()
            return first

    assert asyncio.run(run()).text == "slow "
    assert servicer.cancelled.wait(5), "the server never saw the cancellation"


def test_cancelling_the_awaiting_task_cancels_the_call(echo):
    server, servicer = echo

    async def run():
        async with AsyncClient(worker=server.address) as client:
            stream = client.generate("slow " * 20, max_tokens=20)
            await stream.__anext__()
            task = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # checked while the channel is still open: closing it would cancel the call anyway
            return await asyncio.to_thread(servicer.cancelled.wait, 5)

    assert asyncio.run(run()), "a cancelled caller left the generation running"


# --- errors ----------------------------------------------------------------------------------------


def test_status_codes_map_to_typed_errors(echo):
    server, _ = echo
    with Client(worker=server.address) as client:
        with pytest.raises(InvalidArgumentError) as bad:
            client.complete("a b", max_tokens=MAX_TOKENS_LIMIT + 1)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_tokens" in bad.value.details and "INVALID_ARGUMENT" in str(bad.value)
        assert isinstance(bad.value, ValueError)
        with pytest.raises(ResourceExhaustedError):
            client.complete("queue-full")
        # A value that cannot be encoded never reaches the wire, and names the option.
        with pytest.raises(InvalidArgumentError, match="max_tokens|uint32|out of range"):
            client.complete("a", max_tokens=-1)


def test_duplicate_request_id_is_already_exists(echo):
    server, _ = echo
    from smartspec import AlreadyExistsError

    async def run():
        async with AsyncClient(worker=server.address) as client:
            first = client.generate("slow " * 10, max_tokens=10, request_id="same")
            await first.__anext__()  # running now
            with pytest.raises(AlreadyExistsError, match="same"):
                await client.complete("x", request_id="same")
            first.cancel()

    asyncio.run(run())


def test_deadline_exceeded(echo):
    server, _ = echo
    with Client(worker=server.address, stream_timeout=0.3) as client:
        with pytest.raises(DeadlineExceededError):
            client.complete("slow " * 10, max_tokens=10)


def test_wrong_token_is_unauthenticated_and_right_token_works():
    servicer = EchoGeneration()
    server = AioServerThread([(generation_pb2_grpc.add_GenerationServicer_to_server, servicer)],
                             ServerSecurity(auth_token="right-token"))
    try:
        for token in (None, "wrong-token"):
            with Client(worker=server.address, token=token, retries=0) as client:
                with pytest.raises(UnauthenticatedError):
                    client.worker_info()
                with pytest.raises(UnauthenticatedError):
                    client.complete("a b")
        with Client(worker=server.address, token="right-token") as client:
            assert client.complete("a b").text == "a b "
    finally:
        server.stop()


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(key, cert) for localhost, made with the openssl CLI."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return key, cert


def test_tls_with_root_certificate(tmp_path: Path):
    key, cert = self_signed_certificate(tmp_path)
    servicer = EchoGeneration()
    server = AioServerThread([(generation_pb2_grpc.add_GenerationServicer_to_server, servicer)],
                             ServerSecurity(tls_cert_file=str(cert), tls_key_file=str(key)))
    try:
        with Client(worker=f"localhost:{server.port}", tls=str(cert)) as client:
            assert client.complete("secure words").text == "secure words "
        with Client(worker=f"localhost:{server.port}", retries=0, timeout=2) as plaintext:
            with pytest.raises(UnavailableError):
                plaintext.worker_info()
    finally:
        server.stop()


# --- admin and retries -----------------------------------------------------------------------------


def test_idempotent_calls_retry_unavailable_then_succeed():
    server, servicer = admin_server(failures=2)
    try:
        with Client(controller=server.address, retries=3, initial_backoff_s=0.01) as client:
            assert client.get_policy().name == "goodput"
            assert servicer.calls["GetPolicy"] == 3
            assert [p.name for p in client.list_policies()] == ["fixed"]
            assert client.status().workers[0].worker_id == "w0"
    finally:
        server.stop()


def test_retries_give_up_after_the_configured_attempts():
    server, servicer = admin_server(failures=10)
    try:
        with Client(controller=server.address, retries=2, initial_backoff_s=0.01) as client:
            with pytest.raises(UnavailableError, match="redis unreachable"):
                client.get_policy()
        assert servicer.calls["GetPolicy"] == 3
    finally:
        server.stop()


def test_set_policy_is_retried_only_with_expected_version():
    server, servicer = admin_server(failures=1)
    try:
        with Client(controller=server.address, retries=3, initial_backoff_s=0.01) as client:
            with pytest.raises(UnavailableError):
                client.set_policy("fixed", k=2)
            assert servicer.calls["SetPolicy"] == 1  # not idempotent: never repeated
            active = client.set_policy("fixed", expected_version=1, k=2)
            assert active.version == 2 and active.parameters == {"k": 2}
            with pytest.raises(FailedPreconditionError, match="version is 2"):
                client.set_policy("off", expected_version=1)
    finally:
        server.stop()


def test_unreachable_server_is_unavailable_after_retries():
    port = free_closed_port()
    with Client(controller=f"127.0.0.1:{port}", retries=1, initial_backoff_s=0.01, timeout=3) as client:
        with pytest.raises(UnavailableError):
            client.status()


def test_set_policy_sends_typed_parameter_values():
    server, servicer = admin_server()
    try:
        with Client(controller=server.address) as client:
            active = client.set_policy("table", k=3, alpha=0.5, probe=True, mode="greedy", ks=[4, 2, 0])
            sent = servicer.active.policy.parameters
            assert sent["k"].WhichOneof("kind") == "int_value"
            assert sent["alpha"].WhichOneof("kind") == "float_value"
            assert sent["probe"].WhichOneof("kind") == "bool_value"
            assert sent["mode"].WhichOneof("kind") == "string_value"
            assert list(sent["ks"].int_list_value.values) == [4, 2, 0]
            assert active.parameters == {"alpha": 0.5, "k": 3, "ks": [4, 2, 0], "mode": "greedy", "probe": True}
            calls_before = servicer.calls["SetPolicy"]
            with pytest.raises(InvalidArgumentError, match="parameters.bad"):
                client.set_policy("table", bad={"x": 1})
            assert servicer.calls["SetPolicy"] == calls_before
            schema = client.list_policies()[0].parameter("k")
            assert (schema.type, schema.default, schema.minimum, schema.maximum) == ("int", 3, 0.0, 8.0)
            status = client.status()
            assert status.redis_ok and status.workers[0].cost_model.c_fixed_ms == 4.0
    finally:
        server.stop()


def test_parameter_values_round_trip():
    for value in (0, -7, 2.5, True, False, "x", [1, 2, 3], []):
        back = value_from_proto(value_to_proto(value))
        assert back == value and type(back) is type(value)
    spec = to_policy_spec("table", {"ks": (4, 2), "on": True})
    assert value_from_proto(spec.parameters["ks"]) == [4, 2] and spec.parameters["on"].bool_value is True
    with pytest.raises(FieldError, match="p"):
        value_to_proto([1, True], field="p")
    assert value_from_proto(common_pb2.ParameterValue(), required=False) is None   # a schema without a default
    with pytest.raises(FieldError, match="has no value"):
        value_from_proto(common_pb2.ParameterValue(), "p")
    with pytest.raises(InvalidArgumentError, match=r"parameters\.p: "):   # the SDK's error, naming the value
        to_policy_spec("x", {"p": [1, True]})
    with pytest.raises(InvalidArgumentError, match="unsupported"):
        to_policy_spec("x", {"p": {"a": 1}})


def test_backoff_grows_exponentially_and_is_capped():
    policy = RetryPolicy(retries=5, initial_backoff_s=0.1, max_backoff_s=0.5)
    ceilings = [backoff_s(policy, n, rand=lambda: 1.0) for n in range(5)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert backoff_s(policy, 1, rand=lambda: 0.0) == pytest.approx(0.1)  # jitter floor: half


def test_missing_address_is_a_clear_error():
    with Client(worker="127.0.0.1:1") as client:
        with pytest.raises(InvalidArgumentError, match="controller"):
            client.get_policy()
    assert issubclass(UnavailableError, SmartspecError)


def test_blocking_client_mirrors_every_async_method_with_its_signature():
    import inspect

    def public(cls):
        return {n for n, m in vars(cls).items() if not n.startswith("_") and inspect.isfunction(m)}

    assert public(AsyncClient) <= set(dir(Client))
    for name in public(AsyncClient) - {"close"}:
        assert inspect.signature(getattr(Client, name)) == inspect.signature(getattr(AsyncClient, name))
        assert getattr(Client, name).__doc__ == getattr(AsyncClient, name).__doc__


# --- several workers: gRPC round robin with client-side health checks -------------------------------


class HealthyEcho:
    """An echo worker with grpc.health.v1, whose Generation status the test flips."""

    def __init__(self, serving: bool = True) -> None:
        from grpc_health.v1 import health, health_pb2_grpc

        self.servicer = EchoGeneration()
        self.health = health.aio.HealthServicer()
        self.server = AioServerThread([(generation_pb2_grpc.add_GenerationServicer_to_server, self.servicer),
                                       (health_pb2_grpc.add_HealthServicer_to_server, self.health)])
        self.address = self.server.address
        self.set_serving(serving)

    def set_serving(self, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.run_coroutine_threadsafe(self.health.set(GENERATION_SERVICE, status), self.server.loop).result(5)

    def stop(self) -> None:
        if self.server.thread.is_alive():
            self.server.stop()


@pytest.fixture
def fleet():
    servers = [HealthyEcho(), HealthyEcho(), HealthyEcho(serving=False)]
    yield servers
    for server in servers:
        server.stop()


def spread(servers, client, calls: int) -> list[int]:
    """How many of `calls` worker_info calls each server answered."""
    before = [s.servicer.info_calls for s in servers]
    for _ in range(calls):
        client.worker_info()
    return [s.servicer.info_calls - b for s, b in zip(servers, before)]


def test_one_address_is_handed_to_grpc_unchanged_without_a_service_config():
    one = Servers.parse(" 10.1.2.3:50061 ", "worker")
    assert (one.text, one.target(), one.options(), one.balanced) == ("10.1.2.3:50061", "10.1.2.3:50061", [], False)
    assert Servers.parse(["10.1.2.3:50061"], "worker") == one
    assert Servers.parse("unix:/run/w.sock", "worker").options() == []      # other gRPC targets: as is
    assert Servers.parse(None, "worker") is None and Servers.parse(" ", "worker") is None


def test_several_addresses_become_one_round_robin_target_with_health_checks():
    listed = Servers.parse("10.0.0.5:50061, 10.0.0.6:50062", "worker")
    assert Servers.parse(["10.0.0.5:50061", "10.0.0.6:50062"], "worker") == listed
    assert listed.target() == "ipv4:10.0.0.5:50061,10.0.0.6:50062"
    options = dict(listed.options())
    assert json.loads(options["grpc.service_config"]) == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "smartspec.v1.Generation"},   # what worker/server.py reports
    }
    assert options["grpc.default_authority"] == "10.0.0.5:50061"
    assert Servers.parse("[::1]:1,[2001:db8::2]:2", "worker").target() == "ipv6:[::1]:1,[2001:db8::2]:2"
    assert Servers.parse("localhost:7,127.0.0.2:8", "worker").target() == "ipv4:127.0.0.1:7,127.0.0.2:8"
    controllers = Servers.parse("10.0.0.7:50051,10.0.0.8:50051", "controller")
    assert json.loads(dict(controllers.options())["grpc.service_config"])["healthCheckConfig"] == {
        "serviceName": "smartspec.v1.Admin"}
    for target in ("dns:///workers.example:50061", "ipv4:10.0.0.5:1,10.0.0.6:2", "ipv6:[::1]:1"):
        given = Servers.parse(target, "worker")
        assert given.target() == target and given.balanced and "grpc.default_authority" not in dict(given.options())


def test_malformed_lists_are_invalid_arguments_naming_the_entry():
    for bad, entry in (("10.0.0.5:1,10.0.0.6", "10.0.0.6"), ("a:1,b:http", "b:http"), ("a:1,b:70000", "b:70000"),
                       ("a:1,dns:///b:2", "dns:///b:2")):
        with pytest.raises(InvalidArgumentError, match=re.escape(repr(entry))):
            Servers.parse(bad, "worker")
    with pytest.raises(InvalidArgumentError, match="mixes IPv4-only and IPv6-only"):
        Servers.parse("10.0.0.5:1,[::1]:2", "worker").target()
    with pytest.raises(UnavailableError, match="cannot resolve 'no-such-host.invalid'"):
        Servers.parse("10.0.0.5:1,no-such-host.invalid:2", "worker").target()
    with pytest.raises(InvalidArgumentError, match="worker"):
        Client(worker="10.0.0.5:1,oops")   # at construction, before any call


def test_calls_spread_over_the_serving_workers_and_follow_their_health(fleet):
    a, b, c = fleet
    with Client(worker=[s.address for s in fleet], initial_backoff_s=0.01) as client:
        assert client.worker == ",".join(s.address for s in fleet)
        counts = spread(fleet, client, 20)
        assert counts[2] == 0 and counts[0] >= 5 and counts[1] >= 5, counts   # c is NOT_SERVING: skipped
        results = [client.complete(f"w{i} x", max_tokens=2) for i in range(10)]
        assert all(r.text == f"w{i} x " for i, r in enumerate(results))
        assert len(a.servicer.received) >= 3 and len(b.servicer.received) >= 3 and not c.servicer.received

        a.set_serving(False)   # draining: no new calls once the health watch tells the channel
        c.set_serving(True)
        deadline = time.monotonic() + 5
        while spread(fleet, client, 4)[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        counts = spread(fleet, client, 20)
        assert counts[0] == 0 and counts[1] >= 5 and counts[2] >= 5, counts

        b.stop()               # gone: every call lands on c, none fails
        assert spread(fleet, client, 10) == [0, 0, 10]
        assert client.complete("still served", max_tokens=2).text == "still served "


def test_a_list_over_tls_checks_the_first_host_name(tmp_path):
    key, cert = self_signed_certificate(tmp_path)
    security = ServerSecurity(tls_cert_file=str(cert), tls_key_file=str(key))
    servers = [AioServerThread([(generation_pb2_grpc.add_GenerationServicer_to_server, EchoGeneration())], security)
               for _ in range(2)]
    try:
        with Client(worker=[f"localhost:{s.port}" for s in servers], tls=str(cert)) as client:
            assert [client.complete(f"secure {i}").text for i in range(4)] == [f"secure {i} " for i in range(4)]
    finally:
        for server in servers:
            server.stop()


def test_a_dns_target_is_balanced_over_what_the_name_resolves_to(fleet):
    # localhost resolves to 127.0.0.1 and often ::1 too; nothing listens on ::1, so round robin skips it
    with Client(worker=f"dns:///localhost:{fleet[0].server.port}", timeout=5) as client:
        assert spread(fleet, client, 4) == [4, 0, 0]


def test_cli_takes_several_workers_and_controllers(fleet, redis_url, redis_prefix, capsys):
    from smartspec.cli import main
    from smartspec.controller.server import ControllerServer

    code = main(["generate", "--worker", f"{fleet[0].address},{fleet[1].address}", "--json", "a b c",
                 "--max-tokens", "2"])
    assert code == 0 and json.loads(capsys.readouterr().out)["text"] == "a b "
    assert main(["generate", "--worker", f"{fleet[0].address},nope", "x"]) == 2
    assert "'nope' is not HOST:PORT" in capsys.readouterr().err

    replicas = [ControllerServer(port=0, redis_url=redis_url, prefix=redis_prefix) for _ in range(2)]
    for replica in replicas:
        replica.start()
    try:
        seen = set()
        with Client(controller=",".join(r.address for r in replicas)) as client:
            for _ in range(6):
                seen.add(client.status().controller_id)
        assert seen == {r.controller_id for r in replicas}
        code = main(["status", "--json", "--controller", ",".join(r.address for r in replicas)])
        assert code == 0 and json.loads(capsys.readouterr().out)["controller_id"] in seen
    finally:
        for replica in replicas:
            replica.stop(grace=0)

"""The bearer-token guard: what stays open (health only), and how refused calls are logged
(rate-limited per caller host, naming method and peer, never a token)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from smartspec.controller.server import ControllerServer
from smartspec.core.security import (
    AioBearerTokenInterceptor,
    RefusalLog,
    ServerSecurity,
    _peer_host,
    add_security_options,
)
from smartspec.v1 import admin_pb2, admin_pb2_grpc

SECRET = "s3cret-token-value"
WRONG = "not-the-right-one"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "smartspec.core.security"]


def test_peer_host_drops_the_connection_port():
    assert _peer_host("ipv4:10.0.0.7:53122") == "ipv4:10.0.0.7"
    assert _peer_host("ipv6:[::1]:40000") == "ipv6:[::1]"
    assert _peer_host("unix:/tmp/sock") == "unix:/tmp/sock"
    assert _peer_host("") == "unknown peer"


def test_refusal_log_one_line_per_host_per_interval_with_a_count(caplog):
    clock = FakeClock()
    refusals = RefusalLog(interval_s=60.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="smartspec.core.security")
    refusals.record("ipv4:10.0.0.7:1000", "/smartspec.v1.Controller/Connect", "wrong bearer token")
    assert len(_lines(caplog)) == 1                         # the first refusal is said at once
    for second in range(1, 60):                             # a tight retry loop for a minute: silent
        clock.now += 1.0
        refusals.record(f"ipv4:10.0.0.7:{1000 + second}", "/smartspec.v1.Controller/Connect", "wrong bearer token")
    refusals.record("ipv4:10.0.0.8:5", "/smartspec.v1.Admin/GetPolicy", "no bearer token")   # another host
    lines = _lines(caplog)
    assert len(lines) == 2 and "ipv4:10.0.0.8" in lines[1] and "no bearer token" in lines[1]
    clock.now += 1.0                                        # 60 s after the first line
    refusals.record("ipv4:10.0.0.7:2000", "/smartspec.v1.Admin/SetPolicy", "wrong bearer token")
    lines = _lines(caplog)
    assert len(lines) == 3
    assert lines[2].startswith("refused 60 calls from ipv4:10.0.0.7: wrong bearer token")
    assert "/smartspec.v1.Admin/SetPolicy" in lines[2] and "/smartspec.v1.Controller/Connect" in lines[2]
    assert refusals.refused == 62                          # 61 from one host, 1 from the other


def test_refusal_log_forgets_quiet_hosts_when_full():
    clock = FakeClock()
    refusals = RefusalLog(interval_s=1.0, clock=clock)
    refusals.MAX_HOSTS = 3
    for host in range(10):
        clock.now += 2.0
        refusals.record(f"ipv4:10.0.0.{host}:1", "/m", "no bearer token")
    assert len(refusals._hosts) <= 3


def test_controller_refuses_reflection_and_logs_refusals_but_health_stays_open(redis_url, redis_prefix, caplog):
    caplog.set_level(logging.WARNING, logger="smartspec.core.security")
    srv = ControllerServer(0, redis_url, redis_prefix, security=ServerSecurity(auth_token=SECRET))
    srv.start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as info:
                list(reflect.ServerReflectionInfo(iter([ask]), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = next(reflect.ServerReflectionInfo(iter([ask]), timeout=10,
                                                       metadata=[("authorization", f"Bearer {SECRET}")]))
            assert "smartspec.v1.Controller" in {s.name for s in answer.list_services_response.service}

            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING

            admin = admin_pb2_grpc.AdminStub(ch)
            for _ in range(5):
                with pytest.raises(grpc.RpcError) as info:
                    admin.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=10,
                                    metadata=[("authorization", f"Bearer {WRONG}")])
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop(0)
    lines = _lines(caplog)
    # one line for the whole burst from this host (the reflection refusal came first), naming the
    # method and the peer, and no token, right or wrong
    assert len(lines) == 1, lines
    assert "ipv4:127.0.0.1" in lines[0] and "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in lines[0]
    assert "no bearer token" in lines[0]
    text = caplog.text
    assert SECRET not in text and WRONG not in text


def test_aio_interceptor_refuses_and_logs(caplog):
    caplog.set_level(logging.WARNING, logger="smartspec.core.security")
    refusals = RefusalLog(interval_s=60.0)

    async def echo(request, context):
        return request

    async def main():
        server = grpc.aio.server(interceptors=[AioBearerTokenInterceptor(SECRET, refusals)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Echo", {
            "Say": grpc.unary_unary_rpc_method_handler(echo)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                say = ch.unary_unary("/t.Echo/Say")
                codes = []
                for token in (None, WRONG, WRONG):
                    metadata = None if token is None else (("authorization", f"Bearer {token}"),)
                    try:
                        await say(b"hi", metadata=metadata, timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
                assert await say(b"hi", metadata=(("authorization", f"Bearer {SECRET}"),), timeout=10) == b"hi"
                return codes
        finally:
            await server.stop(0)

    codes = asyncio.run(main())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert refusals.refused == 3
    lines = _lines(caplog)
    assert len(lines) == 1 and "/t.Echo/Say" in lines[0] and "no bearer token" in lines[0]
    assert WRONG not in caplog.text and SECRET not in caplog.text


def test_help_says_only_health_is_open():
    import argparse

    parser = argparse.ArgumentParser()
    add_security_options(parser)
    action = next(a for a in parser._actions if "--auth-token" in a.option_strings)
    assert "but gRPC health" in action.help and "reflection included" in action.help

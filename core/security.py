"""Server-side transport security shared by the controller and worker servers.

A bearer token (checked by an interceptor, UNAUTHENTICATED otherwise) and optional TLS. Only the
gRPC health service stays open, so orchestrators can probe without the token; reflection lists every
method and message of the API, so it needs the token like the services it describes (grpcurl sends
it with `-H 'authorization: Bearer TOKEN'`).

Refused calls are logged (`RefusalLog`): at most one line per caller host per minute, with the count
of calls refused since the last line, the methods and why (no token, a wrong one, a malformed
header), never a token itself.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

log = logging.getLogger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
REFUSAL_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class ServerSecurity:
    """What a server needs to authenticate callers; all empty = plaintext, no token."""

    auth_token: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [BearerTokenInterceptor(self.auth_token)] if self.auth_token else []

    def aio_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [AioBearerTokenInterceptor(self.auth_token)] if self.auth_token else []

    def add_port(self, server, address: str) -> int:
        """Bind `address` (plaintext or TLS) on a grpc or grpc.aio server; returns the port."""
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("TLS needs both a certificate file and a key file")
        if not self.tls_cert_file:
            return server.add_insecure_port(address)
        credentials = grpc.ssl_server_credentials(
            [(Path(self.tls_key_file).read_bytes(), Path(self.tls_cert_file).read_bytes())]
        )
        return server.add_secure_port(address, credentials)


def _token_problem(metadata, expected: str) -> str | None:
    """Why the call's `authorization` metadata does not carry `expected` (None: it does)."""
    for key, value in metadata or ():
        if key != "authorization":
            continue
        if not isinstance(value, str) or not value.startswith("Bearer "):
            return "authorization header is not `Bearer TOKEN`"
        if hmac.compare_digest(value[len("Bearer "):].encode(), expected.encode()):
            return None
        return "wrong bearer token"
    return "no bearer token"


def _peer_host(peer: str) -> str:
    """`ipv4:10.0.0.7:53122` -> `ipv4:10.0.0.7` (each connection has its own port: rate-limit by host)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        head, _, port = peer.rpartition(":")
        if port.isdigit() and head not in ("ipv4", "ipv6"):
            return head
    return peer or "unknown peer"


@dataclass
class _Refusals:
    logged_at: float = -math.inf      # clock time of the last line for this host
    count: int = 0                    # refused since that line
    methods: set[str] = field(default_factory=set)
    reasons: set[str] = field(default_factory=set)


class RefusalLog:
    """Logs refused calls without flooding: the first refusal from a caller host at once, then at
    most one line per host per `interval_s`, counting the calls refused in between. A peer that
    retries in a tight loop (a worker with the wrong token) costs one line a minute."""

    MAX_HOSTS = 4096
    MAX_METHODS = 4

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._log = logger
        self._lock = threading.Lock()
        self._hosts: dict[str, _Refusals] = {}
        self.refused = 0                  # calls refused in all (for tests and curiosity)

    def record(self, peer: str, method: str, reason: str) -> None:
        host = _peer_host(peer)
        now = self._clock()
        with self._lock:
            self.refused += 1
            entry = self._hosts.get(host)
            if entry is None:
                if len(self._hosts) >= self.MAX_HOSTS:
                    self._forget_quiet(now)
                entry = self._hosts[host] = _Refusals()
            entry.count += 1
            if len(entry.methods) < self.MAX_METHODS:
                entry.methods.add(method)
            entry.reasons.add(reason)
            if now - entry.logged_at < self.interval_s:
                return
            count, methods, reasons = entry.count, sorted(entry.methods), sorted(entry.reasons)
            entry.logged_at, entry.count, entry.methods, entry.reasons = now, 0, set(), set()
        self._log.warning(
            "refused %d call%s from %s: %s (%s); at most one such line per caller per %.0f s",
            count, "" if count == 1 else "s", host, "; ".join(reasons), ", ".join(methods), self.interval_s)

    def _forget_quiet(self, now: float) -> None:
        """Drop hosts with nothing pending whose last line is older than the interval (holding _lock)."""
        for host in [h for h, e in self._hosts.items() if e.count == 0 and now - e.logged_at >= self.interval_s]:
            del self._hosts[host]
        if len(self._hosts) >= self.MAX_HOSTS:   # still full: a flood of distinct hosts; forget the oldest
            oldest = min(self._hosts, key=lambda h: self._hosts[h].logged_at)
            del self._hosts[oldest]


def _is_open(method: str) -> bool:
    return method.startswith(OPEN_SERVICES)


DENIED = "missing or wrong bearer token"


def _deny(refusals: RefusalLog, method: str, reason: str):
    def abort(request, context):
        refusals.record(context.peer(), method, reason)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

    return abort


def _handler_like(handler, behaviour):
    """A method handler of the same streaming kind as `handler` that runs `behaviour` instead."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour)
    return grpc.unary_unary_rpc_method_handler(behaviour)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` (sync servers); logs them (`refusals`)."""

    def __init__(self, token: str, refusals: RefusalLog | None = None) -> None:
        self._token = token
        self.refusals = refusals or RefusalLog()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        problem = None if _is_open(method) else _token_problem(handler_call_details.invocation_metadata, self._token)
        if problem is None:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _handler_like(handler, _deny(self.refusals, method, problem))


class AioBearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """The same check for grpc.aio servers."""

    def __init__(self, token: str, refusals: RefusalLog | None = None) -> None:
        self._token = token
        self.refusals = refusals or RefusalLog()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _is_open(method):
            return handler
        problem = _token_problem(handler_call_details.invocation_metadata, self._token)
        if problem is None:
            return handler
        refusals = self.refusals

        async def deny(request, context):
            refusals.record(context.peer(), method, problem)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

        return _handler_like(handler, deny)


def add_security_options(parser) -> None:
    """--auth-token / --tls-cert / --tls-key for server subcommands (SMARTSPEC_* env too)."""
    from smartspec.core.config import add_option

    add_option(parser, "--auth-token", default="", help="require `authorization: Bearer TOKEN` on every call but gRPC health "
                    "(reflection included); refused calls are logged, one line per caller per minute")
    add_option(parser, "--tls-cert", default="", help="PEM certificate file; with --tls-key serves TLS")
    add_option(parser, "--tls-key", default="", help="PEM private key file for --tls-cert")


def security_from_args(args) -> ServerSecurity:
    return ServerSecurity(auth_token=args.auth_token, tls_cert_file=args.tls_cert, tls_key_file=args.tls_key)

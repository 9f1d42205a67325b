"""Server-side transport security shared by the controller and worker servers.

A bearer token (checked by an interceptor, UNAUTHENTICATED otherwise) and optional TLS. Health
checks and reflection stay open so orchestrators can probe without the token.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


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


def _token_ok(metadata, expected: str) -> bool:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return hmac.compare_digest(value[len("Bearer "):].encode(), expected.encode())
    return False


def _is_open(method: str) -> bool:
    return method.startswith(OPEN_SERVICES)


def _deny(details: str):
    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

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
    """Rejects calls without `authorization: Bearer <token>` (sync servers)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_service(self, continuation, handler_call_details):
        if _is_open(handler_call_details.method) or _token_ok(handler_call_details.invocation_metadata, self._token):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        deny = _deny("missing or wrong bearer token")
        return _handler_like(handler, deny)


class AioBearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """The same check for grpc.aio servers."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or _is_open(handler_call_details.method):
            return handler
        if _token_ok(handler_call_details.invocation_metadata, self._token):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        return _handler_like(handler, deny)


def add_security_options(parser) -> None:
    """--auth-token / --tls-cert / --tls-key for server subcommands (SMARTSPEC_* env too)."""
    from smartspec.core.config import add_option

    add_option(parser, "--auth-token", default="", help="require `authorization: Bearer TOKEN` on every call but health")
    add_option(parser, "--tls-cert", default="", help="PEM certificate file; with --tls-key serves TLS")
    add_option(parser, "--tls-key", default="", help="PEM private key file for --tls-cert")


def security_from_args(args) -> ServerSecurity:
    return ServerSecurity(auth_token=args.auth_token, tls_cert_file=args.tls_cert, tls_key_file=args.tls_key)

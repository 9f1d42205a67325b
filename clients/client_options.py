"""Options and error handling shared by the client subcommands (generate, policy, status).

Connection flags are the same everywhere (`--worker`, `--controller`, `--token`, `--tls-ca`,
`--timeout`, each also a SMARTSPEC_* variable), and every SDK error becomes one line on stderr with
the gRPC status name, exit code 2 when the request itself was wrong and 1 otherwise. `--worker` and
`--controller` take what the SDK takes: one HOST:PORT, several comma-separated (round robin over
those whose gRPC health is SERVING), or a gRPC target such as dns:///NAME:PORT (smartspec.clients.addresses).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import grpc

from smartspec.core.config import add_option
from smartspec.clients.errors import SmartspecError

DEFAULT_CONTROLLER = "127.0.0.1:50051"
DEFAULT_WORKER = "127.0.0.1:50061"

# Codes that mean "your input was wrong": fix the command, do not retry it.
BAD_INPUT_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS})
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


def add_connection_options(parser, *, worker: bool = False, controller: bool = False,
                           timeout_s: float = 10.0) -> None:
    if worker:
        add_option(parser, "--worker", default=DEFAULT_WORKER, help="worker address HOST:PORT; several as "
                   "HOST:PORT,HOST:PORT or dns:///NAME:PORT (round robin over the healthy ones)")
    if controller:
        add_option(parser, "--controller", default=DEFAULT_CONTROLLER, help="controller address HOST:PORT; "
                   "several replicas as HOST:PORT,HOST:PORT or dns:///NAME:PORT (round robin)")
    add_option(parser, "--token", default="", help="bearer token sent as `authorization: Bearer TOKEN`")
    add_option(parser, "--tls-ca", default="", help="PEM root certificate: connect with TLS and trust it")
    add_option(parser, "--timeout", default=timeout_s, type=float, help="deadline of each call in seconds")


def client_from_args(args, **overrides: Any):
    """A blocking smartspec.Client configured from the parsed connection options."""
    from smartspec.clients.sync_client import Client

    options: dict[str, Any] = dict(
        worker=getattr(args, "worker", None),
        controller=getattr(args, "controller", None),
        token=args.token or None,
        tls=args.tls_ca or False,
        timeout=args.timeout,
    )
    options.update(overrides)
    return Client(**options)


def exit_code(exc: SmartspecError) -> int:
    return EXIT_BAD_INPUT if exc.code in BAD_INPUT_CODES else EXIT_FAILURE


def reports_errors(run: Callable[[Any], int]) -> Callable[[Any], int]:
    """Wrap a subcommand's run(args): SmartspecError -> one stderr line + exit code, Ctrl-C -> 130."""

    @functools.wraps(run)
    def wrapper(args) -> int:
        try:
            return run(args)
        except SmartspecError as exc:
            print(f"smartspec {args.command}: error: {exc}", file=sys.stderr)
            return exit_code(exc)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130

    return wrapper

"""`smartspec controller`: run one stateless controller replica until SIGTERM / SIGINT."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from smartspec.controller.redis_connect import URL_HELP
from smartspec.core.config import add_option
from smartspec.core.security import add_security_options, security_from_args
from smartspec.core.tracing import TracingUnavailable, add_tracing_options, configure_from_args, shutdown as stop_tracing


def configure(parser) -> None:
    add_option(parser, "--host", default="0.0.0.0", help="address to bind the gRPC server to")
    add_option(parser, "--port", default=50051, type=int, help="gRPC port (0 picks a free one)")
    add_option(parser, "--redis", default="redis://127.0.0.1:6379/0",
               help="Redis holding all state: " + URL_HELP)
    add_option(parser, "--redis-prefix", default="smartspec:",
               help="prefix of every Redis key (on a cluster it gets a hash tag: smartspec: -> {smartspec}:)")
    add_option(parser, "--redis-timeout-s", default=0.5, type=float,
               help="Redis socket timeout; past it a step is planned from priors (degraded)")
    add_option(parser, "--metrics-port", default=0, type=int, help="Prometheus /metrics port (0 = off)")
    add_option(parser, "--max-workers", default=64, type=int,
               help="threads = concurrent worker streams + unary calls this replica serves")
    add_option(parser, "--grace-s", default=5.0, type=float, help="seconds in-flight calls get on shutdown")
    add_option(parser, "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    add_security_options(parser)
    add_tracing_options(parser)


def run(args) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        configure_from_args(args, "smartspec-controller")
    except TracingUnavailable as exc:
        print(f"smartspec controller: {exc}", file=sys.stderr)
        return 2
    from smartspec.controller.server import ControllerServer  # heavy imports only when running

    server = ControllerServer(
        port=args.port,
        redis_url=args.redis,
        prefix=args.redis_prefix,
        host=args.host,
        security=security_from_args(args),
        metrics_port=args.metrics_port,
        max_workers=args.max_workers,
        redis_timeout_s=args.redis_timeout_s,
    )
    port = server.start()
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    print(f"controller listening on {shown_host}:{port}", flush=True)
    if server.bound_metrics_port:
        print(f"controller metrics on http://{shown_host}:{server.bound_metrics_port}/metrics", flush=True)

    stop_requested = threading.Event()

    def request_stop(signum, _frame) -> None:
        logging.getLogger(__name__).info("received %s, shutting down", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while not stop_requested.wait(0.5):
        pass
    server.stop(args.grace_s)
    stop_tracing()   # flush the spans still batched
    return 0

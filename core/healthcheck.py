"""`python -m smartspec.core.healthcheck [HOST:PORT]`: exit 0 when the server's gRPC health is SERVING.

For container health checks (compose.yaml, Dockerfile) and scripts. Asks the standard
grpc.health.v1 service, which the servers leave open without a bearer token. Without an address it
checks 127.0.0.1 on $SMARTSPEC_PORT, the port the container's own server was told to use.

    python -m smartspec.core.healthcheck 127.0.0.1:50051 --service smartspec.v1.Admin
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0, tls_ca: str = "") -> str:
    """The serving status name ("SERVING", "NOT_SERVING", ...) or the gRPC error code's name."""
    if tls_ca:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smartspec.core.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default=f"127.0.0.1:{os.environ.get('SMARTSPEC_PORT') or 50051}",
                        help="HOST:PORT of a smartspec controller or worker (default: 127.0.0.1:$SMARTSPEC_PORT)")
    parser.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--tls-ca", default="", help="PEM root certificate when the server uses TLS")
    args = parser.parse_args(argv)
    status = check(args.address, args.service, args.timeout, args.tls_ca)
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())

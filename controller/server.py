"""A controller replica: Controller + Admin services, gRPC health and reflection, metrics.

Why the sync gRPC server with a thread pool rather than grpc.aio: a step is a blocking Redis round
trip (redis-py) plus CPU-bound policy math (numpy); under asyncio both would have to be pushed to
threads anyway. Each Connect stream holds one thread for its lifetime, so `max_workers` bounds the
number of connected workers plus in-flight unary calls; `maximum_concurrent_rpcs` is set to the
same number so an overloaded replica answers RESOURCE_EXHAUSTED instead of queueing silently.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from smartspec.controller.admin_servicer import AdminServicer
from smartspec.controller.controller_servicer import ControllerServicer
from smartspec.controller.decider import Decider
from smartspec.controller.metrics import ControllerMetrics
from smartspec.controller.planner import PlannerSettings
from smartspec.core.policies import Registry, default_registry
from smartspec.controller.store import DEFAULT_PREFIX, ControllerStore
from smartspec.core.security import ServerSecurity
from smartspec.v1 import admin_pb2, admin_pb2_grpc, controller_pb2, controller_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    controller_pb2.DESCRIPTOR.services_by_name["Controller"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


class ControllerServer:
    """One in-process controller replica. `start()` binds (port 0 picks one) and returns the port."""

    def __init__(
        self,
        port: int = 0,
        redis_url: str = "redis://127.0.0.1:6379/0",
        prefix: str = DEFAULT_PREFIX,
        *,
        host: str = "127.0.0.1",
        security: ServerSecurity = ServerSecurity(),
        metrics_port: int = 0,
        metrics_host: str = "0.0.0.0",
        max_workers: int = 64,
        registry: Registry | None = None,
        settings: PlannerSettings = PlannerSettings(),
        redis_timeout_s: float = 0.5,
        redis_retry_after_s: float = 1.0,
        controller_id: str | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.bound_metrics_port: int | None = None
        self.controller_id = controller_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.metrics = ControllerMetrics()
        self.store = ControllerStore(redis_url, prefix, timeout_s=redis_timeout_s,
                                     retry_after_s=redis_retry_after_s)
        self.decider = Decider(self.store, registry or default_registry(), self.metrics, settings)
        self.health = health.HealthServicer()
        self._security = security
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="controller"),
            interceptors=security.interceptors(),
            maximum_concurrent_rpcs=max_workers,
        )
        controller_pb2_grpc.add_ControllerServicer_to_server(ControllerServicer(self.decider), self._server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.decider, self.controller_id), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"{self.host}:{self.port}"

    def start(self) -> int:
        address = f"[{self.host}]:{self.requested_port}" if ":" in self.host else f"{self.host}:{self.requested_port}"
        self.port = self._security.add_port(self._server, address)
        if not self.port:
            raise OSError(f"could not bind the controller to {address}")
        self._server.start()
        if self.metrics_port:
            self.bound_metrics_port = self.metrics.serve(self.metrics_port, self.metrics_host)
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if not self.store.ping():
            log.warning("redis not reachable at start (%s); planning from priors until it is",
                        self.store.target.describe())
        log.info("controller %s serving on %s (metrics port %s), state in %s under %r", self.controller_id,
                 self.address, self.bound_metrics_port or "off", self.store.target.describe(), self.store.prefix)
        return self.port

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def stop(self, grace: float | None = 5.0) -> None:
        """Health goes NOT_SERVING, in-flight calls get `grace` seconds, then everything closes."""
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self.metrics.close()
        self.store.close()
        log.info("controller %s stopped", self.controller_id)

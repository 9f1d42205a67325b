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
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from smartspec.controller.admin_servicer import AdminServicer
from smartspec.controller.controller_servicer import ControllerServicer
from smartspec.controller.decider import Decider
from smartspec.controller.metrics import ControllerMetrics
from smartspec.controller.planner import PlannerSettings
from smartspec.core.policies import Registry, default_registry
from smartspec.controller.store import DEFAULT_PREFIX, ControllerStore
from smartspec.controller.validation import InvalidInput
from smartspec.core.errors import FieldError, abort
from smartspec.core.security import ServerSecurity
from smartspec.core.wire_check import deserializer, varint_at
from smartspec.v1 import admin_pb2, controller_pb2

log = logging.getLogger(__name__)

CONTROLLER_SERVICE = controller_pb2.DESCRIPTOR.services_by_name["Controller"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
SERVICE_NAMES = (CONTROLLER_SERVICE.full_name, ADMIN_SERVICE.full_name)


_decode_worker_message = deserializer(controller_pb2.WorkerMessage, InvalidInput)
_REPORT_STEP_INDEX = (controller_pb2.WorkerMessage.DESCRIPTOR.fields_by_name["report"].number,
                      controller_pb2.StepReport.DESCRIPTOR.fields_by_name["step_index"].number)


def decode_worker_message(data: bytes) -> controller_pb2.WorkerMessage | InvalidInput:
    """Connect's deserializer: the message, or the InvalidInput naming the field with invalid
    UTF-8 (`hello.worker_id`, `report.requests[0].request_id`) and, as `step_index`, the report's
    step index read from the raw bytes (0 if none), so its error plan answers the right step."""
    message = _decode_worker_message(data)
    if isinstance(message, InvalidInput):
        message.step_index = varint_at(data, _REPORT_STEP_INDEX) or 0
    return message


def _refusing_undecodable(method: Callable) -> Callable:
    """A unary method whose request may be the InvalidInput of an undecodable message: answered
    INVALID_ARGUMENT naming the field, before the servicer sees it."""
    def handler(request, context):
        if isinstance(request, FieldError):
            abort(context, request)
        return method(request, context)
    return handler


def add_service(servicer: object, service: ServiceDescriptor, server: grpc.Server) -> None:
    """What the generated `add_*Servicer_to_server` does, except that every request deserializer
    never raises (`smartspec.core.wire_check.deserializer`): bytes that are no message (invalid
    UTF-8 in a string field) become the InvalidInput naming the field, answered INVALID_ARGUMENT
    (unary) or handled by the stream's servicer (Connect: see ControllerServicer), instead of
    failing in gRPC's deserialisation with INTERNAL "Exception deserializing request!"."""
    handlers = {}
    for method in service.methods:
        request_class = GetMessageClass(method.input_type)
        response_class = GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
                 (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler,
                 (True, True): grpc.stream_stream_rpc_method_handler}
        if not method.client_streaming:   # a stream's servicer reads (and answers) each message itself
            behaviour = _refusing_undecodable(behaviour)
        handlers[method.name] = kinds[(method.client_streaming, method.server_streaming)](
            behaviour,
            request_deserializer=(decode_worker_message if request_class is controller_pb2.WorkerMessage
                                  else deserializer(request_class, InvalidInput)),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


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
        add_service(ControllerServicer(self.decider), CONTROLLER_SERVICE, self._server)
        add_service(AdminServicer(self.decider, self.controller_id), ADMIN_SERVICE, self._server)
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

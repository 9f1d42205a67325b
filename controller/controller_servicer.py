"""The Controller gRPC service: thin mapping between the wire and `Decider`.

Reply first, persist after: a stream yields each plan before storing its step, so a worker's round
trip covers one Redis read and the planning, not the write. The write still finishes before the
stream reads the next report (it runs on the stream's thread, after the plan is handed to gRPC),
and the stream plans from its own `StreamMemory`, so no step can see state older than the last
one's. Unary Decide (a what-if path for callers without a stream) stores before it returns, and
only under its own namespace: it never changes what a stream reads (see `Decider.session_for`).
"""

from __future__ import annotations

import logging
from typing import Iterator

import grpc

from smartspec.core.cost_model import CostModel
from smartspec.controller.decider import Decider, DecidedStep
from smartspec.controller.plans import error_plan
from smartspec.controller.stream_memory import StreamMemory
from smartspec.core.errors import FieldError, abort
from smartspec.controller.validation import InvalidInput, validate_cost_override, validate_hello
from smartspec.v1 import controller_pb2, controller_pb2_grpc

log = logging.getLogger(__name__)


class ControllerServicer(controller_pb2_grpc.ControllerServicer):
    def __init__(self, decider: Decider) -> None:
        self._decider = decider

    def Connect(self, request_iterator: Iterator[controller_pb2.WorkerMessage],
                context: grpc.ServicerContext) -> Iterator[controller_pb2.StepPlan]:
        """hello, then one plan per report in order; a bad report gets an error plan, not a closed stream."""
        first = next(request_iterator, None)
        if first is None:
            return
        if isinstance(first, InvalidInput):  # bytes the deserializer could not decode (invalid UTF-8)
            self._decider.metrics.rejected_reports.labels("hello").inc()
            abort(context, first)
        if first.WhichOneof("kind") != "hello":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "hello: the first WorkerMessage of a Connect stream must be a hello")
        session = self._open(first.hello, context)
        memory = StreamMemory()
        try:
            for message in request_iterator:
                if isinstance(message, InvalidInput):   # undecodable bytes: refused like a bad report
                    yield self._undecodable(session, message)
                    continue
                kind = message.WhichOneof("kind")
                if kind == "hello":  # one hello per stream: a worker re-introduces itself by reconnecting
                    self._decider.metrics.rejected_reports.labels("hello").inc()
                    abort(context, InvalidInput(
                        "hello", "a Connect stream carries exactly one hello, its first message; reconnect "
                        f"to introduce the worker again (this stream is worker {session.worker_id!r})",
                        code=grpc.StatusCode.FAILED_PRECONDITION))
                if kind != "report":
                    self._decider.metrics.rejected_reports.labels("kind").inc()
                    yield error_plan(0, InvalidInput("kind", "WorkerMessage has neither hello nor report"))
                    continue
                planned = self._plan_or_error(session, message.report, memory)
                try:
                    yield planned.plan
                finally:  # also when the stream is cancelled right after the plan went out
                    self._decider.persist(session, planned, memory)
        finally:
            self._decider.flush(session, memory)

    def _undecodable(self, session, error: InvalidInput) -> controller_pb2.StepPlan:
        """The error plan for a message that did not decode: a report's fields are named as in any
        refused report (`requests[0].request_id`), at the step index read from the raw bytes."""
        field = error.field.removeprefix("report.")
        log.warning("rejected undecodable message worker_id=%s step=%d field=%s: %s",
                    session.worker_id, getattr(error, "step_index", 0), field, error.message)
        self._decider.metrics.rejected_reports.labels(field.split("[")[0].split(".")[0]).inc()
        return error_plan(getattr(error, "step_index", 0), InvalidInput(field, error.message))

    def _open(self, hello: controller_pb2.WorkerHello, context: grpc.ServicerContext):
        try:
            validate_hello(hello, "hello")
        except InvalidInput as exc:
            abort(context, exc)
        return self._decider.connect(hello)

    def _plan_or_error(self, session, report: controller_pb2.StepReport, memory: StreamMemory) -> DecidedStep:
        try:
            return self._decider.plan(session, report, memory)
        except InvalidInput as exc:
            log.warning("rejected report worker_id=%s step=%d request_id=%s field=%s: %s",
                        session.worker_id, report.step_index, exc.request_id or "-", exc.field, exc.message)
            self._decider.metrics.rejected_reports.labels(exc.field.split("[")[0]).inc()
            return DecidedStep(error_plan(report.step_index, exc), None)
        except Exception:  # noqa: BLE001 - a controller bug costs this step's speculation, not the stream
            log.exception("planning failed worker_id=%s step=%d", session.worker_id, report.step_index)
            return DecidedStep(error_plan(report.step_index, InvalidInput(
                "", "internal controller error; see controller logs", grpc.StatusCode.INTERNAL)), None)

    def Decide(self, request: controller_pb2.DecideRequest,
               context: grpc.ServicerContext) -> controller_pb2.StepPlan:
        """Unary what-if: validate the carried hello and report, plan in Decide's own namespace
        (see `Decider.session_for`), and map bad input to INVALID_ARGUMENT naming the field."""
        try:
            if not request.HasField("worker"):
                raise InvalidInput("worker", "is required (the worker's hello)")
            validate_hello(request.worker, "worker")
            override = None
            if request.HasField("cost_model_override"):
                validate_cost_override(request.cost_model_override)
                override = CostModel.from_proto(request.cost_model_override)
            session = self._decider.session_for(request.worker)
            return self._decider.step(session, request.report, field_prefix="report.", cost_override=override)
        except FieldError as exc:
            self._decider.metrics.rejected_reports.labels(exc.field.split("[")[0]).inc()
            abort(context, exc)
        except Exception:  # noqa: BLE001 - a controller bug is INTERNAL, never UNKNOWN
            log.exception("Decide failed worker_id=%s step=%d", request.worker.worker_id, request.report.step_index)
            context.abort(grpc.StatusCode.INTERNAL, "internal controller error; see controller logs")

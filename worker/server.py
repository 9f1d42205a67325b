"""The worker's gRPC server: a thin Generation servicer (proto -> domain -> engine -> proto),
grpc.health.v1, reflection, and the lifecycle (`start` / `wait_for_termination` / `stop(grace)`).
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from smartspec.core import tracing
from smartspec.core.codec import policy_spec_proto
from smartspec.core.cost_fit import fit_profile
from smartspec.core.cost_model import DEFAULT_COST_MODEL
from smartspec.core.errors import abort
from smartspec.core.security import ServerSecurity
from smartspec.v1 import common_pb2, controller_pb2, generation_pb2, generation_pb2_grpc

from .controller_link import ControllerLink, LinkConfig
from .engine import DuplicateRequestError, Engine, EngineConfig, EngineStoppedError, QueueFullError, RequestHandle
from .local_policy import LocalPolicyPlanner, PolicyChoice, local_policy_choice
from .metrics import WorkerMetrics
from .profile import measure_profile, profiled_proposer
from .proposers.choice import ProposerChoice
from .requests import InvalidRequest, RequestLimits, decode_generate_request, to_domain
from .sequence import FinishReason, GenerationFailed, GenerationOutcome, TokenDelta
from .steps import Planner

log = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name

_FINISH_REASONS = {
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: generation_pb2.FINISH_REASON_CANCELLED,
}


@dataclass(frozen=True)
class WorkerOptions:
    worker_id: str = "worker-0"
    host: str = "127.0.0.1"
    port: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    default_max_tokens: int = 256
    controller: str | None = None         # "HOST:PORT"; None: plan in-process with local_policy
    plan_deadline_ms: float | None = None  # None = adaptive (see controller_link)
    controller_auth_token: str = ""
    controller_tls_ca: str = ""
    local_policy: str = "goodput"         # a policy spec (smartspec.core.policy_spec), used without a controller
    local_policy_params: tuple[str, ...] = ()   # KEY=VALUE words added to it
    cost_profile_id: str = ""
    profile_steps: int = 3                # timed repeats per profile point (median sent); 0 = no profile
    metrics_port: int = 0                 # 0 = no /metrics endpoint
    dtype: str = "float32"
    proposer_name: str = ""               # for status pages, e.g. "ngram"


def result_to_proto(outcome: GenerationOutcome) -> generation_pb2.GenerationResult:
    stats = outcome.speculation
    return generation_pb2.GenerationResult(
        request_id=outcome.request_id,
        text=outcome.text,
        finish_reason=_FINISH_REASONS[outcome.finish_reason],
        usage=generation_pb2.Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens),
        speculation=generation_pb2.SpeculationStats(
            proposed_tokens=stats.proposed,
            accepted_tokens=stats.accepted,
            acceptance_rate=stats.acceptance_rate,
            mean_accepted_length=stats.mean_accepted_length,
            steps=stats.decode_steps,
            mean_speculation_length=stats.mean_k,
            speculation_lengths=stats.ks,
            requested_tokens=stats.requested,
        ),
        time_to_first_token_ms=outcome.time_to_first_token_ms,
        total_ms=outcome.total_ms,
        queue_ms=outcome.queue_ms,
    )


def policy_to_proto(choice: PolicyChoice | None) -> common_pb2.PolicySpec:
    if choice is None:
        return common_pb2.PolicySpec()
    return policy_spec_proto(choice.name, choice.params, choice.policy)


def add_generation_service(servicer: "GenerationServicer", server: grpc.Server) -> None:
    """`generation_pb2_grpc.add_GenerationServicer_to_server`, except that Generate's request
    deserializer is `decode_generate_request`: bytes that are no GenerateRequest (invalid UTF-8 in
    a string field) reach the servicer as the InvalidRequest naming the field, answered with
    INVALID_ARGUMENT, instead of failing in gRPC's deserialisation with INTERNAL."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=decode_generate_request,
            response_serializer=generation_pb2.GenerateResponse.SerializeToString,
        ),
        "GetWorkerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetWorkerInfo,
            request_deserializer=generation_pb2.GetWorkerInfoRequest.FromString,
            response_serializer=generation_pb2.WorkerInfo.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(GENERATION_SERVICE, handlers),))
    server.add_registered_method_handlers(GENERATION_SERVICE, handlers)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, worker: "WorkerServer") -> None:
        self._worker = worker

    def Generate(self, request: generation_pb2.GenerateRequest | InvalidRequest,
                 context: grpc.ServicerContext) -> Iterator:
        if tracing.ENABLED:
            return traced_generate(self._generate, request, context)
        return self._generate(request, context)

    def _generate(self, request: generation_pb2.GenerateRequest | InvalidRequest,
                  context: grpc.ServicerContext, span=None) -> Iterator:
        engine = self._worker.engine
        if isinstance(request, InvalidRequest):  # bytes the deserializer could not decode (invalid UTF-8)
            abort(context, request)
        try:
            with engine.tokenizer_lock:
                domain = to_domain(request, self._worker.model.tokenizer, self._worker.limits)
        except InvalidRequest as exc:
            abort(context, exc)
        try:
            handle: RequestHandle = engine.submit(domain, trace=span)
        except QueueFullError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except DuplicateRequestError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {exc}")
        except EngineStoppedError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        # The client going away (or the RPC ending any other way) frees the slot.
        context.add_callback(lambda: engine.cancel(domain.request_id, handle))
        for event in handle.events():
            if isinstance(event, TokenDelta):
                yield generation_pb2.GenerateResponse(
                    delta=generation_pb2.TokenDelta(text=event.text, token_ids=event.token_ids))
            elif isinstance(event, GenerationFailed):
                context.abort(grpc.StatusCode.INTERNAL, event.message)
            else:
                yield generation_pb2.GenerateResponse(result=result_to_proto(event))

    def GetWorkerInfo(self, request, context) -> generation_pb2.WorkerInfo:
        return self._worker.info()


def traced_generate(generate, request, context: grpc.ServicerContext) -> Iterator:
    """`generate` (the servicer's body) inside one `smartspec.generate` span, whose parent is the
    caller's `traceparent` metadata if it sent one; the result's figures become its attributes."""
    span = tracing.start_span("smartspec.generate", parent_context=tracing.extract(context.invocation_metadata()))
    if not isinstance(request, InvalidRequest):
        span.set_attributes({"smartspec.max_tokens": request.max_tokens,
                             "smartspec.request_id": request.request_id})
    try:
        for response in generate(request, context, span):
            if response.HasField("result"):
                result = response.result
                span.set_attributes({
                    "smartspec.request_id": result.request_id,
                    "smartspec.prompt_tokens": result.usage.prompt_tokens,
                    "smartspec.completion_tokens": result.usage.completion_tokens,
                    "smartspec.proposed_tokens": result.speculation.proposed_tokens,
                    "smartspec.accepted_tokens": result.speculation.accepted_tokens,
                    "smartspec.finish_reason": generation_pb2.FinishReason.Name(result.finish_reason)})
            yield response
    except BaseException as exc:   # an abort (grpc raises to end the RPC), a cancelled stream
        tracing.record_error(span, exc)
        raise
    finally:
        span.end()


class WorkerServer:
    """One worker: engine + planner (controller link or local policy) + gRPC server.

    The model and proposer are passed in, so tests (and `smartspec up`) can load a model once and
    serve it from several servers in turn. `planner` overrides the controller / local policy.
    """

    def __init__(self, model: Any, proposer: Any, options: WorkerOptions = WorkerOptions(), *,
                 planner: Planner | None = None, security: ServerSecurity = ServerSecurity()) -> None:
        self.model = model
        self.proposer = proposer
        self.options = options
        self.security = security
        self.metrics = WorkerMetrics(options.engine.max_k, options.engine.max_batch_size)
        self.engine = Engine(model, proposer, options.engine, planner, metrics=self.metrics)
        self.limits = RequestLimits(self.engine.context_window, options.default_max_tokens)
        self._planner_override = planner
        self.local_policy: PolicyChoice | None = None
        self.link: ControllerLink | None = None
        self.profile: list[common_pb2.ProfileSample] = []
        self.port: int | None = None
        self._health = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._stopped = threading.Event()
        if planner is None and options.controller is None:
            # Validate the policy spec before anything starts (a typo is a startup error).
            self.local_policy = local_policy_choice(options.local_policy, options.local_policy_params)

    def start(self) -> int:
        """Bind, profile, connect the planner, start the engine; returns the bound port."""
        opts = self.options
        cfg = opts.engine
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.max_batch_size + cfg.max_queue + 16,
                                       thread_name_prefix="smartspec-worker-rpc"),
            interceptors=self.security.interceptors(),
        )
        add_generation_service(GenerationServicer(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection((GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._server)
        self.port = self.security.add_port(self._server, f"{opts.host}:{opts.port}")
        for service in ("", GENERATION_SERVICE):
            self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.start()
        if opts.metrics_port:
            self.metrics.serve(opts.metrics_port)

        if opts.profile_steps > 0:
            self.profile = measure_profile(self.model, profiled_proposer(self.proposer), self.engine.cache,
                                           repeats=opts.profile_steps)
            if isinstance(self.proposer, ProposerChoice) and self.proposer.has_costly_member:
                self.proposer.seed_costs(fit_profile(self.profile))
        self.engine.planner = self._make_planner()
        self.engine.start()
        for service in ("", GENERATION_SERVICE):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def _make_planner(self) -> Planner:
        opts = self.options
        if self._planner_override is not None:
            return self._planner_override
        if opts.controller is None:
            cost = fit_profile(self.profile) if self.profile else DEFAULT_COST_MODEL
            return LocalPolicyPlanner(self.local_policy, max_k=opts.engine.max_k, cost=cost, metrics=self.metrics,
                                      proposer=self.proposer)
        self.link = ControllerLink(
            LinkConfig(
                address=opts.controller,
                plan_deadline_ms=opts.plan_deadline_ms,
                fallback_k=opts.engine.fallback_k,
                auth_token=opts.controller_auth_token,
                tls_ca_file=opts.controller_tls_ca,
            ),
            self.hello(),
            metrics=self.metrics,
            proposer=self.proposer,
        )
        self.link.start()
        return self.link

    def hello(self) -> controller_pb2.WorkerHello:
        opts = self.options
        return controller_pb2.WorkerHello(
            worker_id=opts.worker_id,
            proposer_kind=self.proposer.kind,
            max_speculation_length=opts.engine.max_k,
            max_batch_size=opts.engine.max_batch_size,
            cost_profile_id=opts.cost_profile_id,
            profile=self.profile,
            model=getattr(self.model, "name", ""),
            proposer=opts.proposer_name or type(self.proposer).__name__,
            device=str(self.model.module.device),
            member_kinds=self.proposer.member_kinds if isinstance(self.proposer, ProposerChoice) else [],
        )

    def info(self) -> generation_pb2.WorkerInfo:
        opts = self.options
        snapshot = self.engine.snapshot()
        planner = self.engine.planner
        return generation_pb2.WorkerInfo(
            worker_id=opts.worker_id,
            model=getattr(self.model, "name", ""),
            proposer=opts.proposer_name or type(self.proposer).__name__,
            proposer_kind=self.proposer.kind,
            device=str(self.model.module.device),
            dtype=opts.dtype,
            max_speculation_length=opts.engine.max_k,
            max_batch_size=opts.engine.max_batch_size,
            context_window=self.engine.context_window,
            controller=opts.controller or "none",   # generation.proto: "HOST:PORT" or "none"
            controller_connected=bool(self.link and self.link.connected),
            fallback_steps=getattr(planner, "fallback_steps", 0),
            running_requests=snapshot.running,
            queued_requests=snapshot.queued,
            local_policy=policy_to_proto(self.local_policy),
            reports_proposable_tokens=self.proposer.reports_lookahead,
        )

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting, let running requests finish within `grace` s, cancel the rest, close."""
        if self._stopped.is_set():
            return
        self._health.enter_graceful_shutdown()
        self.engine.stop(grace)
        if self._server is not None:
            self._server.stop(0.5).wait()
        if self.engine.planner is not None:
            self.engine.planner.close()
        self.metrics.close()
        self._stopped.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

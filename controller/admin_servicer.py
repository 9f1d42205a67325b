"""The Admin gRPC service: list, read and swap the speculation policy; status of workers."""

from __future__ import annotations

import logging

import grpc

from smartspec.controller import codec
from smartspec.core.cost_fit import OnlineCostFit
from smartspec.controller.decider import Decider
from smartspec.core.policies import PolicyError
from smartspec.controller.store import StoreUnavailable, WorkerRecord
from smartspec.controller.store_policy import PolicyRecord, VersionMismatch
from smartspec.controller.worker_session import DECIDE_NAMESPACE
from smartspec.controller.validation import InvalidInput
from smartspec.core.codec import parameters_from_proto
from smartspec.core.errors import FieldError, abort
from smartspec.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

# Workers not seen for this long are no longer "connected" on the status page.
STATUS_WINDOW_S = 300.0


def _parameter_field(error: PolicyError) -> str:
    """`max_k` -> `policy.parameters["max_k"]`; `table[2]` -> `policy.parameters["table"][2]`."""
    name, bracket, rest = error.field.partition("[")
    return f'policy.parameters["{name}"]' + (bracket + rest if bracket else "")


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, decider: Decider, controller_id: str) -> None:
        self._decider = decider
        self._controller_id = controller_id

    def ListPolicies(self, request, context) -> admin_pb2.ListPoliciesResponse:
        return admin_pb2.ListPoliciesResponse(
            policies=[codec.policy_info(self._decider.registry.get(name)) for name in self._decider.registry.names()]
        )

    def GetPolicy(self, request, context) -> admin_pb2.ActivePolicy:
        try:
            stored = self._decider.store.get_policy()
        except StoreUnavailable as exc:
            self._decider.redis.failure(exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot read the active policy: {exc}")
        self._decider.redis.success()
        return self._active_proto(stored)

    def SetPolicy(self, request: admin_pb2.SetPolicyRequest, context) -> admin_pb2.ActivePolicy:
        """Validate by registered name and typed parameters, then persist with version + 1."""
        name = request.policy.name
        try:
            if not name:
                raise InvalidInput("policy.name", "must name a registered policy "
                                                  f"({', '.join(self._decider.registry.names())})")
            try:
                policy = self._decider.registry.get(name)
            except PolicyError as exc:
                raise InvalidInput("policy.name", exc.message) from None
            raw = parameters_from_proto(request.policy.parameters)
            try:
                params = policy.validate(raw)
            except PolicyError as exc:
                raise InvalidInput(_parameter_field(exc), exc.message) from None
        except FieldError as exc:
            abort(context, exc)

        try:
            record = self._decider.store.set_policy(name, params, request.expected_version)
        except VersionMismatch as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"expected_version: {exc}")
        except StoreUnavailable as exc:
            self._decider.redis.failure(exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"policy not changed, Redis is unreachable: {exc}")
        self._decider.redis.success()
        self._decider.remember_policy(record)
        log.info("policy set name=%s version=%d parameters=%s", record.name, record.version, params)
        return codec.active_policy_proto(record, policy)

    def GetStatus(self, request, context) -> admin_pb2.ControllerStatus:
        """Works while Redis is down too: redis_ok=false, the policy last seen, no workers."""
        status = admin_pb2.ControllerStatus(controller_id=self._controller_id)
        store = self._decider.store
        try:
            stored = store.get_policy()
            # Decide callers keep what-if state under DECIDE_NAMESPACE: they are not workers.
            workers = [w for w in store.list_workers(STATUS_WINDOW_S) if not w.worker_id.startswith(DECIDE_NAMESPACE)]
            fits = {w.cost_profile_id: store.get_cost_fit(w.cost_profile_id) for w in workers}
            self._decider.redis.success()
            status.redis_ok = True
        except StoreUnavailable as exc:
            self._decider.redis.failure(exc)
            stored, workers, fits = self._decider.last_policy(), [], {}
            status.redis_ok = False
        status.policy.CopyFrom(self._active_proto(stored))
        for worker in workers:
            try:
                status.workers.append(self._worker_status(worker, fits.get(worker.cost_profile_id)))
            except (TypeError, ValueError, OverflowError) as exc:  # an entry no controller wrote: skip it
                log.warning("unreadable status entry for worker %r: %s", worker.worker_id, exc)
        return status

    def _active_proto(self, stored: PolicyRecord | None) -> admin_pb2.ActivePolicy:
        record, policy, params = self._decider.active_policy(stored)
        return codec.active_policy_proto(PolicyRecord(record.name, params, record.version, record.updated_unix_ms),
                                         policy)

    @staticmethod
    def _worker_status(worker: WorkerRecord, fit: dict | None) -> admin_pb2.WorkerStatus:
        totals, info = worker.totals, worker.info
        status = admin_pb2.WorkerStatus(
            worker_id=worker.worker_id,
            model=info.get("model", ""),
            proposer=info.get("proposer", ""),
            device=info.get("device", ""),
            max_speculation_length=int(info.get("max_speculation_length", 0) or 0),
            last_seen_unix_ms=worker.last_seen_unix_ms,
            steps=totals["steps"],
            proposed_tokens=totals["proposed"],
            accepted_tokens=totals["accepted"],
            generated_tokens=totals["generated"],
            acceptance_rate=totals["accepted"] / totals["tested"] if totals["tested"] else 0.0,
            mean_speculation_length=(totals["planned_k"] / totals["planned_requests"]
                                     if totals["planned_requests"] else 0.0),
            goodput_tok_s=worker.goodput_tok_s,
        )
        if fit is not None:
            try:
                status.cost_model.CopyFrom(OnlineCostFit.from_dict(fit).model().to_proto())
            except (KeyError, TypeError, ValueError):
                log.warning("unreadable cost fit for profile %s", worker.cost_profile_id)
        return status


"""A worker's session (its validated hello and what follows from it) and Decide's what-if sessions.

A stream opens one `WorkerSession` per connection (`open_session`); a unary Decide plans as the same
worker with every key it reads or writes (but the active policy's) moved into its own namespace
(`DECIDE_NAMESPACE`, `what_if_session`), so a what-if never touches a live worker's state.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from smartspec.core.cost_fit import fit_profile
from smartspec.core.cost_model import DEFAULT_COST_MODEL, CostModel
from smartspec.v1 import common_pb2, controller_pb2


@dataclass(frozen=True)
class WorkerSession:
    """A validated hello and what follows from it, computed once per connection."""

    hello: controller_pb2.WorkerHello
    seed_cost: CostModel                          # hello profile fitted over the default model
    proposer_kind: str                            # e.g. "PROPOSER_KIND_NGRAM"
    info: dict[str, str] = field(default_factory=dict)
    member_kinds: tuple[str, ...] = ()            # a choice worker's members' kinds (their prior keys)

    @property
    def worker_id(self) -> str:
        return self.hello.worker_id

    @property
    def cost_profile_id(self) -> str:
        return self.hello.cost_profile_id or self.hello.worker_id


def open_session(hello: controller_pb2.WorkerHello) -> WorkerSession:
    """Derive the per-connection facts of a (validated) hello."""
    return WorkerSession(
        hello=hello,
        seed_cost=fit_profile(hello.profile, DEFAULT_COST_MODEL) if len(hello.profile) else DEFAULT_COST_MODEL,
        proposer_kind=common_pb2.ProposerKind.Name(hello.proposer_kind),
        info={
            "model": hello.model,
            "proposer": hello.proposer,
            "device": hello.device,
            "max_speculation_length": str(hello.max_speculation_length),
            "max_batch_size": str(hello.max_batch_size),
            "cost_profile_id": hello.cost_profile_id or hello.worker_id,
            "proposer_kind": common_pb2.ProposerKind.Name(hello.proposer_kind),
        },
        member_kinds=tuple(common_pb2.ProposerKind.Name(kind) for kind in hello.member_kinds),
    )


# Decide keeps all its state under names no worker can use (ids never contain ':', see
# core/ids.py): its histories under worker `decide:{worker_id}`, its cost fit under profile
# `decide:{cost_profile_id}`, its pooled prior under proposer kind `decide:{kind}`.
DECIDE_NAMESPACE = "decide:"


def what_if_hello(hello: controller_pb2.WorkerHello) -> controller_pb2.WorkerHello:
    """The hello a Decide call plans as: the same worker, its ids moved into Decide's namespace."""
    own = controller_pb2.WorkerHello()
    own.CopyFrom(hello)
    own.worker_id = DECIDE_NAMESPACE + hello.worker_id
    own.cost_profile_id = DECIDE_NAMESPACE + (hello.cost_profile_id or hello.worker_id)
    return own


def what_if_session(hello: controller_pb2.WorkerHello) -> WorkerSession:
    """Decide's session: every key it reads or writes (but the active policy's) is its own."""
    session = open_session(what_if_hello(hello))
    return dataclasses.replace(session, proposer_kind=DECIDE_NAMESPACE + session.proposer_kind,
                               member_kinds=tuple(DECIDE_NAMESPACE + kind for kind in session.member_kinds))


@functools.lru_cache(maxsize=256)
def what_if_session_from_bytes(hello_bytes: bytes) -> WorkerSession:
    """`what_if_session` of a serialised hello, cached: Decide callers resend the same hello."""
    return what_if_session(controller_pb2.WorkerHello.FromString(hello_bytes))

"""The one SDK implementation: an asyncio client on grpc.aio for workers and controllers.

`AsyncClient` talks to a worker (Generation service: generate, chat, worker_info) and/or a
controller (Admin service: policies, status). Every call has a deadline; idempotent calls are
retried with backoff on UNAVAILABLE; errors arrive as typed `SmartspecError`s. The blocking
`smartspec.Client` runs this same class on a private event loop (see sync_client.py).

    async with AsyncClient(worker="127.0.0.1:50061", controller="127.0.0.1:50051") as client:
        stream = client.generate("def fib(n):", max_tokens=32)
        async for delta in stream:
            print(delta.text, end="", flush=True)
        print(stream.result.speculation.acceptance_rate)
        await client.set_policy("fixed", k=3)

Several workers (or controller replicas): pass them all, and gRPC's own client-side load balancing
spreads the calls, round robin over the servers whose grpc.health.v1 status is SERVING (see
addresses.py for every accepted form):

    AsyncClient(worker="10.0.0.5:50061,10.0.0.6:50061")         # or a list of "HOST:PORT"
    AsyncClient(worker="dns:///smartspec-workers.default.svc:50061")   # every address of the name
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence, TypeVar, Union

import grpc

from smartspec.clients.addresses import AddressLike, Servers
from smartspec.clients.errors import InvalidArgumentError, SmartspecError, error_from_rpc
from smartspec.clients.retry import RetryPolicy, retry_unavailable
from smartspec.clients.types import (
    ActivePolicy,
    ChatMessage,
    ControllerStatus,
    GenerationResult,
    PolicyInfo,
    TextDelta,
    WorkerInfo,
    to_policy_spec,
)
from smartspec.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

T = TypeVar("T")

# What `chat` accepts as one message: a ChatMessage, {"role": ..., "content": ...} or (role, content).
MessageLike = Union[ChatMessage, Mapping[str, str], Sequence[str]]

DEFAULT_TIMEOUT_S = 10.0  # unary calls
DEFAULT_STREAM_TIMEOUT_S = 600.0  # a whole generation, first byte to last


def channel_credentials(tls: bool | str | bytes | Path) -> grpc.ChannelCredentials | None:
    """None for plaintext; True = system roots; a path or PEM bytes = that root certificate."""
    if tls is False or tls is None:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    pem = tls if isinstance(tls, bytes) else Path(tls).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=pem)


def _chat_message(message: MessageLike) -> generation_pb2.ChatMessage:
    if isinstance(message, ChatMessage):
        return generation_pb2.ChatMessage(role=message.role, content=message.content)
    if isinstance(message, Mapping):
        return generation_pb2.ChatMessage(role=message.get("role", ""), content=message.get("content", ""))
    if isinstance(message, Sequence) and not isinstance(message, str) and len(message) == 2:
        return generation_pb2.ChatMessage(role=message[0], content=message[1])
    raise InvalidArgumentError(f"messages: cannot use {message!r} as a chat message (role, content)")


class GenerationStream:
    """Text deltas of one generation as an async iterator; `result` once the stream has ended.

        stream = client.generate("Once upon a time", max_tokens=20)
        async for delta in stream:
            print(delta.text, end="")
        print(stream.result.finish_reason)      # "length"

    The call starts on the first iteration. `cancel()` frees the worker's slot at once.
    """

    def __init__(self, start: Callable[[], Awaitable[grpc.aio.UnaryStreamCall]]) -> None:
        self._start = start
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._result: GenerationResult | None = None
        self._done = False

    @property
    def result(self) -> GenerationResult:
        """The final GenerationResult; only after the iteration has finished."""
        if self._result is None:
            raise RuntimeError("the generation has not finished: iterate the stream (or await collect()) first")
        return self._result

    def __aiter__(self) -> "GenerationStream":
        return self

    async def __anext__(self) -> TextDelta:
        if self._done:
            raise StopAsyncIteration
        if self._call is None:
            self._call = await self._start()
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    self._done = True
                    if self._result is None:
                        raise SmartspecError("the worker closed the stream without a result", grpc.StatusCode.UNKNOWN)
                    raise StopAsyncIteration
                kind = message.WhichOneof("kind")
                if kind == "delta":
                    return TextDelta.from_proto(message.delta)
                if kind == "result":
                    self._result = GenerationResult.from_proto(message.result)
        except grpc.aio.AioRpcError as exc:
            self._done = True
            raise error_from_rpc(exc) from None
        except asyncio.CancelledError:
            self.cancel()  # the caller gave up (task cancelled, Ctrl-C in the sync client): free the slot
            raise

    async def collect(self) -> GenerationResult:
        """Drain the stream and return its result."""
        async for _ in self:
            pass
        return self.result

    def cancel(self) -> None:
        """Stop the generation (the worker frees the request's slot)."""
        self._done = True
        if self._call is not None:
            self._call.cancel()


class AsyncClient:
    """Async SDK for smartspec workers (generation) and controllers (admin).

    worker / controller: "HOST:PORT" of the servers this client talks to (either may be omitted).
        Several servers: "HOST:PORT,HOST:PORT" or a list of them, or "dns:///NAME:PORT" for every
        address of a name; calls then go round robin to the servers whose gRPC health is SERVING
        (a call already running on a server that dies fails with UnavailableError: idempotent calls
        are retried, on the next server; a generation is not).
    token: bearer token sent as `authorization: Bearer TOKEN` metadata.
    tls: False (plaintext), True (system root certificates) or a root certificate (path or PEM bytes).
    timeout: deadline of each unary call in seconds; stream_timeout: of each whole generation.
    retries: extra attempts (with exponential backoff) for idempotent calls that hit UNAVAILABLE.

        client = AsyncClient(worker="127.0.0.1:50061")
        result = await client.complete("The capital of France is", max_tokens=8)
        await client.close()
    """

    def __init__(
        self,
        worker: AddressLike | None = None,
        controller: AddressLike | None = None,
        *,
        token: str | None = None,
        tls: bool | str | bytes | Path = False,
        timeout: float = DEFAULT_TIMEOUT_S,
        stream_timeout: float = DEFAULT_STREAM_TIMEOUT_S,
        retries: int = 3,
        initial_backoff_s: float = 0.1,
        tls_server_name: str | None = None,
    ) -> None:
        if timeout <= 0 or stream_timeout <= 0:
            raise ValueError("timeouts must be positive (every call has a deadline)")
        self._servers = {"worker": Servers.parse(worker, "worker"),
                         "controller": Servers.parse(controller, "controller")}
        self.worker: str | None = self._servers["worker"] and self._servers["worker"].text
        self.controller: str | None = self._servers["controller"] and self._servers["controller"].text
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retry_policy = RetryPolicy(retries=retries, initial_backoff_s=initial_backoff_s)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials = channel_credentials(tls)
        self._tls_server_name = tls_server_name
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    # --- plumbing ----------------------------------------------------------------------------

    def _channel(self, role: str) -> grpc.aio.Channel:
        servers = self._servers[role]
        if servers is None:
            raise InvalidArgumentError(f"{role}: this client has no {role} address (pass {role}='HOST:PORT')")
        key = (servers.text, servers.health_service if servers.balanced else "")
        channel = self._channels.get(key)
        if channel is None:
            target, options = servers.target(), servers.options()
            # TLS checks a list's certificates against its first host name (or tls_server_name).
            server_name = self._tls_server_name or (servers.first_host if self._credentials else None)
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(target, options=options)
            else:
                channel = grpc.aio.secure_channel(target, self._credentials, options=options)
            self._channels[key] = channel
        return channel

    def _generation(self) -> generation_pb2_grpc.GenerationStub:
        return generation_pb2_grpc.GenerationStub(self._channel("worker"))

    def _admin(self) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self._channel("controller"))

    async def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None, *, idempotent: bool) -> Any:
        async def attempt() -> Any:
            try:
                return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc) from None

        if not idempotent:
            return await attempt()
        return await retry_unavailable(attempt, self.retry_policy)

    async def close(self) -> None:
        """Close every channel this client opened."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # --- generation (worker) -----------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Iterable[str] = (),
        seed: int | None = None,
        request_id: str = "",
        ignore_eos: bool = False,
        timeout: float | None = None,
    ) -> GenerationStream:
        """Stream a completion of the raw `prompt` (no chat template). Not retried (not idempotent).

            stream = client.generate("def add(a, b):", max_tokens=16, temperature=0)
            async for delta in stream: print(delta.text, end="")
            print(stream.result.usage.completion_tokens)
        """
        request = self._generate_request(
            max_tokens, temperature, top_p, top_k, stop, seed, request_id, ignore_eos, prompt=prompt
        )
        return self._stream(request, timeout)

    def chat(
        self,
        messages: Sequence[MessageLike],
        *,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Iterable[str] = (),
        seed: int | None = None,
        request_id: str = "",
        ignore_eos: bool = False,
        timeout: float | None = None,
    ) -> GenerationStream:
        """Stream a reply to chat `messages`; the worker applies the model's chat template.

            stream = client.chat([{"role": "user", "content": "Say hi"}], max_tokens=16)
            text = (await stream.collect()).text
        """
        request = self._generate_request(
            max_tokens, temperature, top_p, top_k, stop, seed, request_id, ignore_eos,
            messages=[_chat_message(m) for m in messages],
        )
        return self._stream(request, timeout)

    async def complete(self, prompt_or_messages: str | Sequence[MessageLike], **options: Any) -> GenerationResult:
        """Generate to the end and return the GenerationResult (a str prompt, or chat messages).

            result = await client.complete("2 + 2 =", max_tokens=4)
            print(result.text, result.speculation.acceptance_rate)
        """
        if isinstance(prompt_or_messages, str):
            stream = self.generate(prompt_or_messages, **options)
        else:
            stream = self.chat(prompt_or_messages, **options)
        return await stream.collect()

    @staticmethod
    def _generate_request(max_tokens, temperature, top_p, top_k, stop, seed, request_id, ignore_eos,
                          **text: Any) -> generation_pb2.GenerateRequest:
        if isinstance(stop, str):  # a lone string would otherwise become one stop per character
            stop = [stop]
        optional = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
        try:
            return generation_pb2.GenerateRequest(
                max_tokens=max_tokens, stop=list(stop), request_id=request_id, ignore_eos=ignore_eos,
                **{key: value for key, value in optional.items() if value is not None}, **text,
            )
        except (ValueError, TypeError) as exc:  # e.g. max_tokens=-1 does not fit uint32
            raise InvalidArgumentError(f"bad generation option: {exc}") from None

    def _stream(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> GenerationStream:
        async def start() -> grpc.aio.UnaryStreamCall:
            return self._generation().Generate(
                request, timeout=timeout or self.stream_timeout, metadata=self._metadata
            )

        return GenerationStream(start)

    async def worker_info(self, *, timeout: float | None = None) -> WorkerInfo:
        """What the worker serves: model, proposer, limits, controller link, queue.

            info = await client.worker_info(); print(info.model, info.max_speculation_length)
        """
        msg = await self._unary(self._generation().GetWorkerInfo, generation_pb2.GetWorkerInfoRequest(),
                                timeout, idempotent=True)
        return WorkerInfo.from_proto(msg)

    # --- admin (controller) ------------------------------------------------------------------

    async def list_policies(self, *, timeout: float | None = None) -> list[PolicyInfo]:
        """Every registered policy with its parameter schema.

            for p in await client.list_policies(): print(p.name, [x.name for x in p.parameters])
        """
        msg = await self._unary(self._admin().ListPolicies, admin_pb2.ListPoliciesRequest(), timeout, idempotent=True)
        return [PolicyInfo.from_proto(p) for p in msg.policies]

    async def get_policy(self, *, timeout: float | None = None) -> ActivePolicy:
        """The active policy and its version.

            active = await client.get_policy(); print(active.name, active.version)
        """
        msg = await self._unary(self._admin().GetPolicy, admin_pb2.GetPolicyRequest(), timeout, idempotent=True)
        return ActivePolicy.from_proto(msg)

    async def set_policy(
        self, name: str, *, expected_version: int = 0, timeout: float | None = None, **parameters: Any
    ) -> ActivePolicy:
        """Activate policy `name` with typed parameters (int, float, bool, str, list of ints).

        Retried on UNAVAILABLE only with `expected_version` (then a repeat cannot apply twice).

            active = await client.set_policy("batch-threshold", max_batch=8, k=3)
        """
        request = admin_pb2.SetPolicyRequest(policy=to_policy_spec(name, parameters), expected_version=expected_version)
        msg = await self._unary(self._admin().SetPolicy, request, timeout, idempotent=expected_version > 0)
        return ActivePolicy.from_proto(msg)

    async def status(self, *, timeout: float | None = None) -> ControllerStatus:
        """Connected workers with their figures, the active policy, Redis health.

            for w in (await client.status()).workers: print(w.worker_id, w.goodput_tok_s)
        """
        msg = await self._unary(self._admin().GetStatus, admin_pb2.GetStatusRequest(), timeout, idempotent=True)
        return ControllerStatus.from_proto(msg)

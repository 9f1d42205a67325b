"""The SDK against the real servers in-process: a WorkerServer with the real SmolLM2 model
following a real ControllerServer on a real Redis. Sync and async clients must agree; policies set
through the admin API must reach the worker's steps; real validation errors arrive typed."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from smartspec import AsyncClient, Client, InvalidArgumentError
from smartspec.controller.server import ControllerServer
from smartspec.core.processes import free_port

pytestmark = pytest.mark.slow

PROMPT = "Here is a list of fruits: apple, banana, cherry. Again: apple, banana,"


@pytest.fixture(scope="module")
def servers(start_real_stack):
    with start_real_stack(max_context_tokens=256) as addresses:
        yield addresses


def test_sync_and_async_clients_agree_on_a_real_worker(servers):
    worker, controller = servers

    async def run_async():
        async with AsyncClient(worker=worker, controller=controller) as client:
            stream = client.generate(PROMPT, max_tokens=10, temperature=0)
            deltas = [d async for d in stream]
            return deltas, stream.result

    async_deltas, async_result = asyncio.run(run_async())
    with Client(worker=worker, controller=controller) as client:
        stream = client.generate(PROMPT, max_tokens=10, temperature=0)
        sync_deltas = list(stream)
        sync_result = stream.result
        chat = client.complete([{"role": "user", "content": "Name a colour."}], max_tokens=8)

    assert "".join(d.text for d in async_deltas) == async_result.text
    assert sum(len(d.token_ids) for d in async_deltas) == async_result.usage.completion_tokens
    # greedy: the same tokens whichever client asked (how they group into deltas depends on how many
    # tokens each step accepted, so compare the flattened sequence)
    def token_ids(deltas):
        return [t for d in deltas for t in d.token_ids]

    assert token_ids(sync_deltas) == token_ids(async_deltas) and len(token_ids(sync_deltas)) > 0
    assert sync_result.text == async_result.text and sync_result.finish_reason == async_result.finish_reason
    assert sync_result.usage == async_result.usage
    assert chat.text and chat.finish_reason in ("stop", "length") and chat.usage.prompt_tokens > 5


def test_real_validation_errors_are_typed_and_name_the_field(servers):
    worker, _ = servers
    with Client(worker=worker) as client:
        with pytest.raises(InvalidArgumentError, match="top_p"):
            client.complete("hi", top_p=1.5)
        with pytest.raises(InvalidArgumentError, match="max_tokens"):
            client.complete("hi", max_tokens=100_000)
        assert client.complete("hi", max_tokens=2).usage.completion_tokens <= 2  # still serving


def test_policy_set_through_admin_reaches_the_worker(servers):
    worker, controller = servers
    with Client(worker=worker, controller=controller) as client:
        info = client.worker_info()
        assert "SmolLM2" in info.model and info.controller == controller and info.proposer_kind == "ngram"

        version = client.get_policy().version
        active = client.set_policy("off", expected_version=version)
        assert active.version == version + 1
        off = client.complete(PROMPT, max_tokens=12, temperature=0)
        # Plans are made one step ahead: a swap reaches the worker by its second step at the latest.
        assert off.speculation.speculation_lengths and set(off.speculation.speculation_lengths[2:]) == {0}

        client.set_policy("fixed", k=2)
        fixed = client.complete(PROMPT, max_tokens=12, temperature=0)
        assert max(fixed.speculation.speculation_lengths[2:]) <= 2
        assert fixed.text == off.text  # speculation never changes greedy output

        with pytest.raises(InvalidArgumentError, match='parameters\\["k"\\]'):
            client.set_policy("fixed", k=1000)
        assert client.get_policy().parameters == {"k": 2}
        workers = client.status().workers
        assert any(w.worker_id == info.worker_id and w.steps > 0 for w in workers)


def test_retry_reaches_a_controller_that_starts_late(redis_url, redis_prefix):
    port = free_port()
    late = ControllerServer(port=port, redis_url=redis_url, prefix=redis_prefix)
    timer = threading.Timer(0.5, late.start)
    timer.start()
    try:
        started = time.monotonic()
        with Client(controller=f"127.0.0.1:{port}", retries=6, initial_backoff_s=0.2) as client:
            assert client.get_policy().name  # UNAVAILABLE at first, then served
        assert time.monotonic() - started >= 0.4
    finally:
        timer.join()
        late.stop(grace=0)


def test_cli_generate_json_against_the_real_worker(servers, capsys):
    import json

    from smartspec.cli import main

    worker, _ = servers
    assert main(["generate", "--worker", worker, PROMPT, "--max-tokens", "8", "--temperature", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    spec = result["speculation"]
    assert 0 < result["usage"]["completion_tokens"] <= 8 and result["finish_reason"] in ("stop", "length")
    assert len(spec["speculation_lengths"]) == spec["steps"] > 0
    assert 0.0 <= spec["acceptance_rate"] <= 1.0 and result["total_ms"] >= result["time_to_first_token_ms"] > 0


def test_a_worker_list_with_a_dead_entry_is_served_by_the_live_worker(servers):
    # The real WorkerServer's grpc.health.v1 drives the SDK's client-side health checks; the listed
    # address nobody listens on is never picked, so no call fails.
    worker, _ = servers
    dead = f"127.0.0.1:{free_port()}"
    with Client(worker=[dead, worker], timeout=10) as client:
        results = [client.complete(PROMPT, max_tokens=3, temperature=0) for _ in range(3)]
        infos = {client.worker_info().worker_id for _ in range(4)}
    assert [r.usage.completion_tokens for r in results] == [3, 3, 3] and len({r.text for r in results}) == 1
    assert len(infos) == 1

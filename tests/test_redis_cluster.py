"""The controller on a real Redis Cluster and behind a real Redis Sentinel (`controller/redis_connect.py`).

Each test starts its own `redis-server` processes on free loopback ports (a 3-node cluster made with
`redis-cli --cluster create`; a master, its replica and one `redis-server --sentinel`), runs real
controllers against them, and stops every process at the end. Nothing is skipped: a missing
`redis-server` / `redis-cli` is an error.
"""

from __future__ import annotations

import queue
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.sentinel import MasterNotFoundError, Sentinel

from smartspec.controller import redis_connect
from smartspec.controller.history_table import HistoryTable
from smartspec.controller.server import ControllerServer
from smartspec.controller.store import ControllerStore
from smartspec.core.processes import Child, free_port, start_child, stop_all, wait_port_open
from smartspec.core.redis_launcher import find_redis_server
from smartspec.v1 import admin_pb2, admin_pb2_grpc, common_pb2, controller_pb2, controller_pb2_grpc
from wire import comparable, workload

# -- wire messages --------------------------------------------------------------------------------


def hello(worker_id: str = "w0", kind=common_pb2.PROPOSER_KIND_NGRAM, profile_id: str = "cpu-a") -> controller_pb2.WorkerHello:
    return controller_pb2.WorkerHello(
        worker_id=worker_id, proposer_kind=kind, max_speculation_length=6, max_batch_size=16,
        cost_profile_id=profile_id,
        profile=[common_pb2.ProfileSample(batch_size=b, speculation_length=k, context_tokens=200, draft_ms=0.2 * k,
                                          verify_ms=80.0 + 3.0 * b * (k + 1) + (30.0 if k else 0))
                 for b in (1, 8) for k in (0, 4)],
    )


def stream(channel, worker: controller_pb2.WorkerHello, reports) -> list[controller_pb2.StepPlan]:
    messages = [controller_pb2.WorkerMessage(hello=worker)] + [controller_pb2.WorkerMessage(report=r) for r in reports]
    return list(controller_pb2_grpc.ControllerStub(channel).Connect(iter(messages), timeout=30))


def fixed(k: int) -> common_pb2.PolicySpec:
    return common_pb2.PolicySpec(name="fixed", parameters={"k": common_pb2.ParameterValue(int_value=k)})


def scenario(a, b) -> list:
    """Steps and Admin calls spread over two replicas (channels a, b); what a caller sees, in order."""
    admin_a, admin_b = admin_pb2_grpc.AdminStub(a), admin_pb2_grpc.AdminStub(b)
    seen: list = []
    # A worker's stream on replica A, then (a reconnect) on replica B, which continues its histories.
    steps = workload()
    seen += [comparable(p) for p in stream(a, hello(), steps[:4])]
    seen += [comparable(p) for p in stream(b, hello(), steps[4:])]
    # A second worker (another proposer kind and cost profile: other keys) with Decide, alternating.
    other = hello("w1", common_pb2.PROPOSER_KIND_DRAFT, "cpu-b")
    stubs = [controller_pb2_grpc.ControllerStub(ch) for ch in (a, b)]
    seen += [comparable(stubs[i % 2].Decide(controller_pb2.DecideRequest(worker=other, report=r), timeout=10))
             for i, r in enumerate(workload(6))]
    # A policy set through one replica is what the other one reports and plans with.
    set_a = admin_a.SetPolicy(admin_pb2.SetPolicyRequest(policy=fixed(3)), timeout=10)
    got_b = admin_b.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=10)
    seen.append((set_a.policy.name, set_a.version, got_b.policy.name, got_b.version, dict(got_b.policy.parameters)))
    seen += [comparable(p) for p in stream(b, hello("w2"), workload(3))]
    admin_b.SetPolicy(admin_pb2.SetPolicyRequest(policy=common_pb2.PolicySpec(name="goodput"), expected_version=1),
                      timeout=10)
    seen += [comparable(p) for p in stream(a, hello("w2"), workload(5)[3:])]
    status = admin_a.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
    seen.append((status.redis_ok, status.policy.policy.name, status.policy.version,
                 sorted((w.worker_id, w.steps, w.proposed_tokens, w.accepted_tokens, w.generated_tokens)
                        for w in status.workers)))
    return seen


def step_plans(seen: list) -> list[controller_pb2.StepPlan]:
    return [item for item in seen if isinstance(item, controller_pb2.StepPlan)]


# -- real Redis processes -------------------------------------------------------------------------


def redis_binaries() -> tuple[str, str]:
    server = find_redis_server(install=None)
    cli = shutil.which("redis-cli") or str(Path(server).with_name("redis-cli"))
    if not Path(cli).exists():
        raise FileNotFoundError("no redis-cli next to redis-server or on PATH (needed to create the cluster)")
    return server, cli


def start_redis(name: str, argv: list[str], port: int, log_dir: Path, children: list[Child]) -> Child:
    child = start_child(name, argv, log_dir)
    children.append(child)
    if not wait_port_open("127.0.0.1", port, 10):
        raise RuntimeError(f"{name} did not open port {port}:\n{child.log_tail()}")
    return child


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def cluster_ok(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        info = client.execute_command("CLUSTER INFO")   # parsed into a dict by redis-py (raw text by old ones)
        return info.get("cluster_state") == "ok" if isinstance(info, dict) else b"cluster_state:ok" in info
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """A real 3-primary Redis Cluster on loopback; yields its node ports."""
    server, cli = redis_binaries()
    log_dir = tmp_path_factory.mktemp("cluster")
    children: list[Child] = []
    try:
        ports = [free_port() for _ in range(3)]
        for port in ports:
            # the cluster bus gets its own free port: port + 10000 may be taken or past 65535
            start_redis(f"node-{port}", [server, "--bind", "127.0.0.1", "--port", str(port),
                                         "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                                         "--cluster-config-file", str(log_dir / f"nodes-{port}.conf"),
                                         "--dir", str(log_dir), "--save", "", "--appendonly", "no"],
                        port, log_dir, children)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        wait_until(lambda: all(cluster_ok(p) for p in ports), 30, "cluster_state:ok on every node")
        yield ports
    finally:
        stop_all(children)


def cluster_url(ports: list[int]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports[:2]) + "/"


def cluster_client(ports: list[int]) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in ports])


def node_owning(ports: list[int], key: str) -> int:
    """The port of the primary serving `key`'s slot."""
    client = cluster_client(ports)
    try:
        return client.get_node_from_key(key).port
    finally:
        client.close()


# -- no server: URL forms and key tags ------------------------------------------------------------


def test_url_forms():
    t = redis_connect.parse_redis_url("redis+cluster://127.0.0.1:7000,[::1]:7001,node-c/")
    assert (t.kind, t.nodes, t.db) == ("cluster", (("127.0.0.1", 7000), ("::1", 7001), ("node-c", 6379)), 0)
    t = redis_connect.parse_redis_url("rediss+sentinel://u:p%40ss@s1:5000,s2/mymaster/2")
    assert (t.kind, t.nodes, t.master_name, t.db, t.username, t.password, t.ssl) == (
        "sentinel", (("s1", 5000), ("s2", 26379)), "mymaster", 2, "u", "p@ss", True)
    assert "p@ss" not in t.describe() and "p%40ss" not in redis_connect.parse_redis_url(
        "redis://:p%40ss@h:1/0").describe()
    t = redis_connect.parse_redis_url("redis://127.0.0.1:6379/3")
    assert (t.kind, t.url) == ("server", "redis://127.0.0.1:6379/3")
    for bad in ("redis+cluster://h:1/2", "redis+sentinel://h:1/", "redis+sentinel://h:1/m/x",
                "redis+cluster:///", "redis+cluster://h:x/", "redis+cluster://h:1/?ssl=1", "redis+sentinel://h/m/0/1"):
        with pytest.raises(ValueError):
            redis_connect.parse_redis_url(bad)


def test_cluster_keys_of_a_deployment_share_one_slot():
    assert redis_connect.tagged_prefix("smartspec:") == "{smartspec}:"
    assert redis_connect.tagged_prefix("a:b:") == "{a:b}:"
    assert redis_connect.tagged_prefix("{team}:smartspec:") == "{team}:smartspec:"
    assert redis_connect.tagged_prefix("x{y") == "{x{y}"          # no closing brace in the prefix: wrapped
    for untaggable in ("", ":", "}"):
        with pytest.raises(ValueError):
            redis_connect.tagged_prefix(untaggable)
    # Plain Redis: the prefix (and so every key name) is exactly what it was.
    assert ControllerStore("redis://127.0.0.1:1/0", "smartspec:").prefix == "smartspec:"
    # A cluster URL builds nothing until the first call (nothing listens on port 1: a degraded store).
    store = ControllerStore("redis+cluster://127.0.0.1:1/", "smartspec:", timeout_s=0.2)
    assert store.prefix == "{smartspec}:"
    assert not store.ping()
    ids = ["w0", "w}{1", "{w2}", "worker:with:colons", "ü"]
    keys = [store.policy_key(), store.workers_key()]
    for i in ids:
        keys += [store.history_key(i), store.cost_key(i), store.prior_key(i), store.worker_key(i)]
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"smartspec")}
    store.close()


# -- a real cluster ---------------------------------------------------------------------------------


def wipe_cluster(ports: list[int], prefix: str) -> None:
    client = cluster_client(ports)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def start_cli_controller(redis_url: str, prefix: str, log_dir: Path, children: list[Child]) -> str:
    """`python -m smartspec.cli controller --port 0` (a real process); its address."""
    child = start_child("controller", [sys.executable, "-m", "smartspec.cli", "controller", "--host", "127.0.0.1",
                                       "--port", "0", "--redis", redis_url, "--redis-prefix", prefix], log_dir)
    children.append(child)

    def listening():
        if not child.alive():
            raise RuntimeError(f"controller exited:\n{child.log_tail()}")
        for line in child.log_path.read_text(errors="replace").splitlines():
            if line.startswith("controller listening on "):
                return line.rsplit(" ", 1)[1]
        return None

    return wait_until(listening, 60, "the controller to listen", 0.1)


@pytest.mark.slow
def test_cluster_replicas_answer_like_replicas_on_one_server(redis_cluster, redis_url, redis_prefix, tmp_path):
    """Two replicas on a 3-node cluster (one a `smartspec controller` process, one in-process) give the
    plans, policies and status two replicas on one plain Redis give, and store the same keys, all
    in one slot."""
    prefix = f"smartspec-test:{uuid.uuid4().hex[:12]}:"
    tagged = redis_connect.tagged_prefix(prefix)
    url = cluster_url(redis_cluster)
    children: list[Child] = []
    servers: list[ControllerServer] = []
    try:
        on_cluster = [start_cli_controller(url, prefix, tmp_path, children)]
        servers.append(ControllerServer(0, url, prefix, redis_retry_after_s=0.0))
        assert servers[-1].store.prefix == tagged
        servers[-1].start()
        on_cluster.append(servers[-1].address)
        for _ in range(2):
            servers.append(ControllerServer(0, redis_url, redis_prefix, redis_retry_after_s=0.0))
            servers[-1].start()
        on_server = [s.address for s in servers[1:]]

        with grpc.insecure_channel(on_cluster[0]) as a, grpc.insecure_channel(on_cluster[1]) as b:
            cluster_seen = scenario(a, b)
        with grpc.insecure_channel(on_server[0]) as a, grpc.insecure_channel(on_server[1]) as b:
            server_seen = scenario(a, b)

        plans = step_plans(cluster_seen)
        assert len(plans) == 19 and not any(p.degraded or p.HasField("error") for p in plans)
        assert cluster_seen == server_seen
        assert cluster_seen[-1][0] and cluster_seen[-1][1:3] == ("goodput", 2)
        assert [w[0] for w in cluster_seen[-1][3]] == ["w0", "w2"]   # Decide keeps to its own namespace
        # The learned acceptance separates the requests (the plans are informative, not all equal).
        last = {r.request_id: r.speculation_length for r in plans[7].requests}
        assert last["good"] > last["poor"]

        # The same key names under each prefix, and on the cluster all of them in one slot.
        raw = redis.Redis.from_url(redis_url)
        plain_keys = sorted(k.decode()[len(redis_prefix):] for k in raw.scan_iter(match=redis_prefix + "*"))
        raw.close()
        client = cluster_client(redis_cluster)
        cluster_keys = sorted(k.decode() for k in client.scan_iter(match=tagged + "*"))
        assert [k[len(tagged):] for k in cluster_keys] == plain_keys
        assert {"hist:w0", "policy", "workers", "worker:w0"} <= set(plain_keys)
        assert {client.keyslot(k) for k in cluster_keys} == {key_slot(tagged[1:tagged.index("}")].encode())}
        good = HistoryTable.decode(client.get(f"{tagged}hist:w0"))["good"]
        assert (good.accepted, good.steps) == (4 * 7, 8)
        client.close()

        # One step is still one read script and one write script, sent to the one node holding the
        # slot (MONITOR lists what clients send, and the scripts' own calls tagged "lua").
        owner = redis.Redis(port=node_owning(redis_cluster, tagged + "policy"))
        with owner.monitor() as monitor:
            with grpc.insecure_channel(on_cluster[1]) as b:
                controller_pb2_grpc.ControllerStub(b).Decide(
                    controller_pb2.DecideRequest(worker=hello("w9"), report=workload(2)[1]), timeout=10)
            owner.echo("end of step")
            sent = []
            for entry in monitor.listen():
                if entry["command"] == "ECHO end of step":
                    break
                name = entry["command"].split()[0]
                if entry.get("client_type") != "lua" and name not in ("HELLO", "CLIENT"):  # not a handshake
                    sent.append(name)
        owner.close()
        assert sent == ["EVALSHA", "EVALSHA"]
    finally:
        for server in servers:
            server.stop(0)
        stop_all(children)
        wipe_cluster(redis_cluster, tagged)


# -- a real Sentinel ---------------------------------------------------------------------------------


@pytest.fixture
def sentinel_setup(tmp_path):
    """A master, its replica, and one Sentinel (quorum 1) watching them as `mymaster`."""
    server, _cli = redis_binaries()
    children: list[Child] = []
    try:
        master, replica, sentinel = free_port(), free_port(), free_port()
        base = [server, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
        start_redis("master", [*base, "--port", str(master)], master, tmp_path, children)
        start_redis("replica", [*base, "--port", str(replica), "--replicaof", "127.0.0.1", str(master)],
                    replica, tmp_path, children)
        conf = tmp_path / "sentinel.conf"   # Sentinel rewrites its config: a file of its own, writable
        conf.write_text(f"port {sentinel}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor mymaster 127.0.0.1 {master} 1\n"
                        "sentinel down-after-milliseconds mymaster 500\n"
                        "sentinel failover-timeout mymaster 5000\n")
        start_redis("sentinel", [server, str(conf), "--sentinel"], sentinel, tmp_path, children)
        sentinel_client = redis.Redis(port=sentinel, decode_responses=True)

        def replica_known():
            replicas = sentinel_client.execute_command("SENTINEL REPLICAS mymaster")
            return any(r.get("port") == str(replica) and "s_down" not in r.get("flags", "")
                       and r.get("master-link-status") == "ok" for r in replicas)

        wait_until(replica_known, 30, "the Sentinel to see the replica in sync", 0.1)
        yield {"master": master, "replica": replica, "sentinel": sentinel, "children": children,
               "sentinel_client": sentinel_client}
        sentinel_client.close()
    finally:
        stop_all(children)


@pytest.mark.slow
def test_sentinel_controller_serves_steps_and_follows_a_failover(sentinel_setup, redis_url, redis_prefix):
    ports = sentinel_setup
    prefix = f"smartspec-test:{uuid.uuid4().hex[:12]}:"
    url = f"redis+sentinel://127.0.0.1:{ports['sentinel']}/mymaster/0"
    steps = workload(12)
    on_sentinel = ControllerServer(0, url, prefix, redis_retry_after_s=0.0)
    on_server = ControllerServer(0, redis_url, redis_prefix, redis_retry_after_s=0.0)
    on_sentinel.start()
    on_server.start()
    try:
        with grpc.insecure_channel(on_server.address) as channel:
            expected = [comparable(p) for p in stream(channel, hello(), steps[:4])]
            admin_pb2_grpc.AdminStub(channel).SetPolicy(admin_pb2.SetPolicyRequest(policy=fixed(2)), timeout=10)
            expected_policy = controller_pb2_grpc.ControllerStub(channel).Decide(
                controller_pb2.DecideRequest(worker=hello("w9"), report=steps[0]), timeout=10)

        with grpc.insecure_channel(on_sentinel.address) as channel:
            # One live stream: 4 steps, the policy set, the master killed, then steps until they are
            # served from Redis (the new master) again.
            outbox: queue.Queue = queue.Queue()
            outbox.put(controller_pb2.WorkerMessage(hello=hello()))
            replies = controller_pb2_grpc.ControllerStub(channel).Connect(iter(outbox.get, None), timeout=60)
            before = []
            for report in steps[:4]:
                outbox.put(controller_pb2.WorkerMessage(report=report))
                before.append(comparable(next(replies)))
            assert before == expected and not any(p.degraded for p in before)

            admin = admin_pb2_grpc.AdminStub(channel)
            admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=fixed(2)), timeout=10)
            got = comparable(controller_pb2_grpc.ControllerStub(channel).Decide(
                controller_pb2.DecideRequest(worker=hello("w9"), report=steps[0]), timeout=10))
            assert got == comparable(expected_policy)

            master = redis.Redis(port=ports["master"])
            assert master.exists(f"{prefix}hist:w0", f"{prefix}policy") == 2
            assert master.wait(1, 5000) == 1            # the replica holds it all before the master dies
            master.close()
            ports["children"][0].process.kill()          # the master crashes
            ports["children"][0].process.wait()
            watcher = Sentinel([("127.0.0.1", ports["sentinel"])], socket_timeout=1)

            def promoted() -> bool:   # as redis-py (so the controller) sees it: failover over, replica up
                try:
                    return watcher.discover_master("mymaster") == ("127.0.0.1", ports["replica"])
                except MasterNotFoundError:
                    return False

            wait_until(promoted, 30, "the Sentinel to promote the replica", 0.1)
            for client in watcher.sentinels:
                client.close()

            after = []
            for report in steps[4:]:
                outbox.put(controller_pb2.WorkerMessage(report=report))
                after.append(next(replies))
                if len(after) >= 2 and not after[-1].degraded and not after[-2].degraded:
                    break
            outbox.put(None)
            list(replies)
            assert not after[-1].degraded and after[-1].policy_name == "fixed" and after[-1].policy_version == 1
            assert sum(p.degraded for p in after) <= 1   # at most the first step after the crash

            promoted = redis.Redis(port=ports["replica"])
            assert promoted.role()[0] == b"master"
            good = HistoryTable.decode(promoted.get(f"{prefix}hist:w0"))["good"]
            assert good.steps == 4 + len(after)          # the stream's histories went on, on the new master
            assert admin.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=10).version == 1
            assert admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10).redis_ok
            promoted.close()
    finally:
        on_sentinel.stop(0)
        on_server.stop(0)

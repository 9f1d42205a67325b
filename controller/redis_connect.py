"""The controller's Redis client from its `--redis` URL: one server, a Redis Cluster, or the master
that Redis Sentinel names (redis-py's `Redis.from_url`, `RedisCluster`, `Sentinel.master_for`).

    redis://[[user]:password@]host[:port][/db]      one server: exactly `redis.Redis.from_url`, so
    rediss://...   unix://...                       TLS, Unix sockets and query options work as there
    redis+cluster://[[user]:password@]host[:port][,host[:port]...][/]
    rediss+cluster://...                            a Redis Cluster; the nodes are where discovery
                                                    starts (one reachable node is enough), db is 0
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/MASTER_NAME[/db]
    rediss+sentinel://...                           the master the Sentinels at host:port... know as
                                                    MASTER_NAME, asked again after a failover

Ports default to 6379 (servers, cluster nodes) and 26379 (Sentinels). Credentials and TLS are for the
data nodes (the cluster's nodes, the Sentinel-named master); the Sentinels are asked without them.
Cluster and Sentinel URLs take no query options.

In a cluster every key one Lua script touches must hash to one slot, and a step's scripts touch keys
shared across workers (the pooled prior of a proposer kind, a cost profile's fit, the policy), so
the store puts all of a deployment's keys in one slot with a hash tag in the key prefix
(`tagged_prefix`: `smartspec:` becomes `{smartspec}:`). A cluster then gives the deployment its
failover and operations, not sharding: one deployment's keys live on one primary (its replicas
take over when it fails). Deployments with different prefixes land in different slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

SERVER, CLUSTER, SENTINEL = "server", "cluster", "sentinel"
_SCHEMES = {
    "redis+cluster": (CLUSTER, False), "rediss+cluster": (CLUSTER, True),
    "redis+sentinel": (SENTINEL, False), "rediss+sentinel": (SENTINEL, True),
}
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

URL_HELP = ("redis://host:port/db (one server; rediss:// for TLS), "
            "redis+cluster://host:port[,host:port...]/ (Redis Cluster: keys share one slot through the "
            "prefix's hash tag, e.g. {smartspec}:), "
            "redis+sentinel://host:port[,host:port...]/MASTER_NAME[/db] (the master Redis Sentinel names, "
            "followed across failovers)")


@dataclass(frozen=True)
class RedisTarget:
    """What a `--redis` URL names."""

    kind: str                                 # SERVER, CLUSTER or SENTINEL
    url: str
    nodes: tuple[tuple[str, int], ...] = ()   # cluster startup nodes / Sentinels (empty for SERVER)
    master_name: str | None = None            # SENTINEL only
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False

    def describe(self) -> str:
        """The target for logs, without credentials."""
        if self.kind == SERVER:
            return _without_password(self.url)
        nodes = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        if self.kind == CLUSTER:
            return f"redis cluster {nodes}"
        return f"redis sentinel {nodes} master {self.master_name!r} db {self.db}"


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user + ':' if user else ':'}***@{hosts}"


def _parse_node(text: str, default_port: int, url: str) -> tuple[str, int]:
    if text.startswith("["):                      # [ipv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad node {text!r} in {_without_password(url)}")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"a node without a host in {_without_password(url)}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"bad port in node {text!r} of {_without_password(url)}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in node {text!r} of {_without_password(url)}")
    return host, port


def parse_redis_url(url: str) -> RedisTarget:
    """The target of a `--redis` URL (see the module docstring); ValueError for a malformed one."""
    scheme, sep, rest = url.partition("://")
    kind, ssl = _SCHEMES.get(scheme.lower(), (SERVER, False))
    if kind == SERVER or not sep:
        return RedisTarget(SERVER, url)
    if "?" in rest or "#" in rest:
        raise ValueError(f"{scheme}:// URLs take no query options: {_without_password(url)}")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    default_port = DEFAULT_SENTINEL_PORT if kind == SENTINEL else DEFAULT_PORT
    nodes = tuple(_parse_node(node, default_port, url) for node in hosts.split(",") if node.strip())
    if not nodes:
        raise ValueError(f"no host:port in {_without_password(url)}")
    parts = [unquote(part) for part in path.split("/") if part]
    if kind == CLUSTER:
        if parts:
            raise ValueError(f"a Redis Cluster URL has no path (the cluster has one database, 0): "
                             f"{_without_password(url)}")
        return RedisTarget(CLUSTER, url, nodes, None, 0, username, password, ssl)
    if not parts or len(parts) > 2:
        raise ValueError(f"a Sentinel URL names the master: redis+sentinel://host:port/MASTER_NAME[/db], "
                         f"got {_without_password(url)}")
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise ValueError(f"bad db {parts[1]!r} in {_without_password(url)}") from None
    return RedisTarget(SENTINEL, url, nodes, parts[0], db, username, password, ssl)


def connect(target: RedisTarget, *, timeout_s: float) -> Any:
    """A redis-py client for `target` that fails fast: socket timeouts of `timeout_s`, no retries
    (the store maps a failure to a degraded step and tries again later). A cluster client discovers
    the cluster when built, so this raises (RedisError / RedisClusterException) when no node answers."""
    import redis  # here, not at the top: `smartspec controller --help` reads URL_HELP without redis-py
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if target.kind == SERVER:
        return redis.Redis.from_url(target.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                    retry=Retry(NoBackoff(), 0))
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.ssl:
        auth["ssl"] = True
    if target.kind == CLUSTER:
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                            retry=Retry(NoBackoff(), 0), socket_timeout=timeout_s,
                            socket_connect_timeout=timeout_s, **auth)
    from redis.sentinel import Sentinel

    sentinel = Sentinel(list(target.nodes), socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    return sentinel.master_for(target.master_name, db=target.db, socket_timeout=timeout_s,
                               socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0), **auth)


def close(client: Any) -> None:
    """Close a client from `connect`, with the Sentinel connections behind a Sentinel-named master."""
    client.close()
    pool = getattr(client, "connection_pool", None)
    manager = getattr(pool, "sentinel_manager", None) if pool is not None else None
    for sentinel in getattr(manager, "sentinels", ()):
        sentinel.close()


def hash_tag(key: str) -> str | None:
    """The part of `key` Redis Cluster hashes when it is not the whole key: the text between the
    first `{` and the first `}` after it, when not empty (None: the whole key is hashed)."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    return key[start + 1:end] if end > start + 1 else None


def tagged_prefix(prefix: str) -> str:
    """`prefix` with a hash tag that every key under it shares, so that all of them hash to one
    cluster slot: kept when it has one (`{smartspec}:`), else wrapped (`smartspec:` -> `{smartspec}:`,
    `a:b:` -> `{a:b}:`). ValueError when no tag can be made (an empty prefix)."""
    if hash_tag(prefix) is not None:
        return prefix
    body, colon = (prefix[:-1], ":") if prefix.endswith(":") else (prefix, "")
    tagged = "{" + body + "}" + colon
    if hash_tag(tagged) is None:
        raise ValueError(f"key prefix {prefix!r} cannot carry a Redis Cluster hash tag; give one, e.g. {{smartspec}}:")
    return tagged

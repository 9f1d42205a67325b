"""Where a client's workers (or controllers) are: one address, several, or a DNS name, as a gRPC target.

One `HOST:PORT` is handed to gRPC unchanged, exactly as before (one server, gRPC's default
`pick_first`). Several servers are spread by gRPC's own client-side load balancing: the channel gets a
service config with the `round_robin` policy and client-side health checking, so every call goes to
the next server whose `grpc.health.v1` status for the role's service (`smartspec.v1.Generation` on
workers, `smartspec.v1.Admin` on controllers) is SERVING. A server that is starting, draining or
gone gets no new calls; it is picked again once it reports SERVING.

    "10.0.0.5:50061"                          one worker, as given
    "10.0.0.5:50061,10.0.0.6:50061"           several (also a list/tuple of HOST:PORT strings)
    "gpu-a:50061,gpu-b:50061"                 names in a list are resolved once, when the channel opens
    "dns:///workers.example:50061"            every address the name resolves to, re-resolved by gRPC
                                              (a Kubernetes headless Service); round robin
    "ipv4:10.0.0.5:50061,10.0.0.6:50061"      any gRPC target with the dns:, ipv4: or ipv6: scheme:
                                              used as is, round robin
    "unix:/run/smartspec.sock"                other gRPC targets: as is, like one address

A list is turned into gRPC's `ipv4:` (or `ipv6:`) multi-address target: no balancer of our own.
Use `dns:///NAME:PORT` for a name whose addresses change while the client runs.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from dataclasses import dataclass
from typing import Sequence, Union

from smartspec.clients.errors import InvalidArgumentError, UnavailableError
from smartspec.v1 import admin_pb2, generation_pb2

# The service each role's servers report in grpc.health.v1 (worker/server.py, controller/server.py).
GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
HEALTH_SERVICE = {"worker": GENERATION_SERVICE, "controller": ADMIN_SERVICE}

# Targets gRPC resolves itself; the first three can name several servers.
_SCHEME = re.compile(r"^(dns|ipv4|ipv6|unix|unix-abstract|vsock):")
_BALANCED_SCHEMES = ("dns", "ipv4", "ipv6")

AddressLike = Union[str, Sequence[str]]


def balancing_service_config(health_service: str) -> str:
    """The channel's service config: round robin over the servers whose health for `health_service`
    is SERVING (gRPC's client-side health checking, a grpc.health.v1 Watch stream per server)."""
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": health_service},
    })


def _split_host_port(entry: str, role: str) -> tuple[str, int]:
    host, sep, port = entry.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgumentError(f"{role}: {entry!r} is not HOST:PORT (several servers: HOST:PORT,HOST:PORT)")
    return host, int(port)


@dataclass(frozen=True)
class Servers:
    """One role's server address(es), parsed; `target()` gives the gRPC target, `options()` the
    channel options that go with it (none for one plain address)."""

    role: str                                   # "worker" or "controller": names errors, picks the health service
    text: str                                   # as given (a list joined by commas)
    hosts: tuple[tuple[str, int], ...] = ()     # several HOST:PORT entries, resolved when the channel opens
    balanced: bool = False                      # round robin with health checks

    @classmethod
    def parse(cls, address: AddressLike | None, role: str) -> "Servers | None":
        """None for no address; InvalidArgumentError for a malformed list (one address is not checked:
        gRPC gets it unchanged, as always)."""
        if address is None or (isinstance(address, str) and not address.strip()):
            return None
        if isinstance(address, str):
            address = address.strip()
            scheme = _SCHEME.match(address)
            if scheme:
                return cls(role, address, balanced=scheme.group(1) in _BALANCED_SCHEMES)
            entries = [part.strip() for part in address.split(",")]
        else:
            entries = [str(part).strip() for part in address]
        entries = [entry for entry in entries if entry]
        if not entries:
            return None
        if len(entries) == 1 and not _SCHEME.match(entries[0]):
            return cls(role, entries[0])
        for entry in entries:
            if _SCHEME.match(entry):
                raise InvalidArgumentError(
                    f"{role}: {entry!r}: a list of servers takes HOST:PORT entries; a target with a scheme "
                    "(dns:///NAME:PORT, ipv4:A:P,B:P) is given alone")
        return cls(role, ",".join(entries), tuple(_split_host_port(entry, role) for entry in entries), True)

    @property
    def health_service(self) -> str:
        return HEALTH_SERVICE[self.role]

    @property
    def first_host(self) -> str | None:
        """The first listed host name (what TLS checks the certificates of a list against)."""
        return self.hosts[0][0] if self.hosts else None

    def target(self) -> str:
        """The gRPC target. A list becomes `ipv4:A:P,B:P` (or `ipv6:[A]:P,...`), names resolved now."""
        if not self.hosts:
            return self.text
        resolved = [self._resolve(host, port) for host, port in self.hosts]
        if all(v4 for v4, _ in resolved):
            return "ipv4:" + ",".join(f"{ip}:{port}" for (v4, _), (_, port) in zip(resolved, self.hosts) for ip in v4)
        if all(v6 for _, v6 in resolved):
            return "ipv6:" + ",".join(f"[{ip}]:{port}" for (_, v6), (_, port) in zip(resolved, self.hosts) for ip in v6)
        raise InvalidArgumentError(f"{self.role}: {self.text!r} mixes IPv4-only and IPv6-only servers; "
                                   "list one family, or give a dns:///NAME:PORT target")

    def options(self) -> list[tuple[str, object]]:
        if not self.balanced:
            return []
        options: list[tuple[str, object]] = [
            ("grpc.service_config", balancing_service_config(self.health_service)),
            ("grpc.service_config_disable_resolution", 1),   # ours, not one from DNS TXT records
        ]
        if self.hosts:  # the :authority a list's calls carry: its first entry, as typed
            host, port = self.hosts[0]
            options.append(("grpc.default_authority", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))
        return options

    def _resolve(self, host: str, port: int) -> tuple[list[str], list[str]]:
        """(IPv4 addresses, IPv6 addresses) of one listed host, in the resolver's order."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return ([str(ip)], []) if ip.version == 4 else ([], [str(ip)])
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise UnavailableError(f"{self.role}: cannot resolve {host!r}: {exc}") from None
        v4 = list(dict.fromkeys(info[4][0] for info in infos if info[0] == socket.AF_INET))
        v6 = list(dict.fromkeys(info[4][0] for info in infos if info[0] == socket.AF_INET6))
        return v4, v6

"""Child processes for `smartspec up`: each in its own process group, logs to a file, stopped
with SIGTERM and, after a grace period, SIGKILL.

Own process groups mean a Ctrl-C in the terminal reaches only `smartspec up`, which then stops
the children in order (worker, controller, Redis) instead of all of them dying at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (the OS picks it; a tiny race remains until it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Raise OSError naming the option when one of `ports` (option -> port) cannot be bound on `host`."""
    for option, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise OSError(f"{option} {port} on {host} is not free ({exc.strerror}); "
                              f"pick another or 0 for any free port") from None


@dataclass
class Child:
    """One started child: its name, argv, log file and Popen handle."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen = field(repr=False)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_child(name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> Child:
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: see the module docstring
            env={**os.environ, **(env or {})},
        )
    return Child(name, list(argv), log_path, process)


def _signal_group(child: Child, sig: int) -> None:
    try:
        os.killpg(child.process.pid, sig)
    except ProcessLookupError:
        pass


def stop_child(child: Child, grace_s: float = 10.0) -> int:
    """SIGTERM the child's process group, SIGKILL it after `grace_s`; returns the exit status."""
    if child.alive():
        _signal_group(child, signal.SIGTERM)
        try:
            return child.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)
    else:
        _signal_group(child, signal.SIGKILL)  # grandchildren left behind by a dead child
    return child.process.wait()


def stop_all(children: Sequence[Child], grace_s: float = 10.0) -> None:
    """Stop children in reverse start order (clients of a service go before the service)."""
    for child in reversed(children):
        stop_child(child, grace_s)


def wait_port_open(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False

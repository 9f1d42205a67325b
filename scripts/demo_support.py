"""Shared plumbing for the demo scripts: free ports, child processes that print their address,
a private Redis prefix that is wiped afterwards. Not part of the library: demos only."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import redis

REDIS_URL = os.environ.get("SMARTSPEC_DEMO_REDIS", "redis://127.0.0.1:6379/0")
SMARTSPEC = [sys.executable, "-m", "smartspec.cli"]


class DemoFailure(RuntimeError):
    """A demo's claim did not hold; main() turns it into exit status 1 with the message."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailure(message)


def private_prefix(name: str) -> str:
    return f"demo:{name}:{uuid.uuid4().hex[:8]}:"


def wipe_prefix(prefix: str, url: str = REDIS_URL) -> int:
    """Delete every key the demo wrote (all under its private prefix)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


class Child:
    """A real `smartspec ...` subprocess whose stdout+stderr lines are collected by a thread, so
    the demo can wait for an address line without blocking on a full pipe."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.lines: queue.Queue[str] = queue.Queue()
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        bufsize=1, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        """Block until a printed line matches `pattern` (regex); fail if the child dies first."""
        deadline = time.monotonic() + timeout_s
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    raise DemoFailure(f"{self.name} exited with {self.process.returncode} before printing "
                                      f"/{pattern}/; see {self.log_path}")
                continue
            match = regex.search(line)
            if match:
                return match
        raise DemoFailure(f"{self.name} printed no /{pattern}/ within {timeout_s:.0f} s; see {self.log_path}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill9(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        """Signal this child (only this pid) and wait; SIGKILL if it overstays."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=2)
        self._log.close()
        return self.process.returncode


def run_cli(*args: str, timeout_s: float = 60.0) -> str:
    """Run the real `smartspec` CLI once; return its stdout, fail with its stderr."""
    done = subprocess.run([*SMARTSPEC, *args], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise DemoFailure(f"`smartspec {' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def main_wrapper(body) -> int:
    """Run a demo body; DemoFailure -> message on stderr and exit 1."""
    try:
        body()
    except DemoFailure as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return 0

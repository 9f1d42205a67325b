"""Configuration from flags and SMARTSPEC_* environment variables alike.

Every CLI flag `--some-option` can also be set as `SMARTSPEC_SOME_OPTION`; a flag given on the
command line wins over the environment, the environment wins over the built-in default.
"""

from __future__ import annotations

import os
from typing import Any, Callable


def env_name(flag: str) -> str:
    """`--max-tokens` -> `SMARTSPEC_MAX_TOKENS`."""
    return "SMARTSPEC_" + flag.lstrip("-").replace("-", "_").upper()


def env_default(flag: str, default: Any = None, cast: Callable[[str], Any] = str) -> Any:
    """The default for `flag`: its SMARTSPEC_* variable when set (cast), else `default`."""
    raw = os.environ.get(env_name(flag))
    if raw is None or raw == "":
        return default
    if cast is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return cast(raw)


def add_option(parser, flag: str, *, default: Any = None, type: Callable[[str], Any] = str,
               help: str = "", **kwargs: Any) -> None:
    """parser.add_argument with the SMARTSPEC_* variable as default, named in the help text."""
    value = env_default(flag, default, type)
    parser.add_argument(
        flag,
        default=value,
        type=type,
        help=f"{help} (env {env_name(flag)}; default: {default!r})",
        **kwargs,
    )


def add_flag(parser, flag: str, *, help: str = "") -> None:
    """A boolean --flag that SMARTSPEC_*=1 also turns on."""
    parser.add_argument(
        flag,
        action="store_true",
        default=env_default(flag, False, bool),
        help=f"{help} (env {env_name(flag)}=1)",
    )

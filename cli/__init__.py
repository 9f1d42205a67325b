"""The `smartspec` command: one entry point, one module per subcommand.

Each subcommand module exposes `configure(parser)` (adds its flags, with defaults from
SMARTSPEC_* environment variables via `smartspec.core.config.env_default`) and `run(args) -> int`.
Modules are imported only when their subcommand runs, so `smartspec generate` does not load torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "controller": ("smartspec.controller.cli", "run a stateless controller (gRPC) backed by Redis"),
    "worker": ("smartspec.worker.cli", "run an inference worker with speculative decoding"),
    "up": ("smartspec.cli.up", "start Redis, a controller and a worker locally; --demo runs a workload"),
    "generate": ("smartspec.clients.generate_cli", "stream a completion from a worker"),
    "policy": ("smartspec.clients.policy_cli", "list, get or set the controller's speculation policy"),
    "status": ("smartspec.clients.status_cli", "show connected workers, the active policy and figures"),
    "bench": ("smartspec.bench.cli", "open-loop load benchmark across rates and policies"),
    "simulate": ("smartspec.bench.simulate_cli", "discrete-event simulation with the real policy code"),
    "loadtest": ("smartspec.bench.loadtest_cli", "simulated worker streams against controllers: latency and steps/s"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, just that subcommand's module is imported and configured."""
    parser = argparse.ArgumentParser(
        prog="smartspec",
        description="Goodput-driven speculative decoding for LLM serving.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            module = importlib.import_module(module_name)
            module.configure(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen subcommand's module (fast start, no torch for client commands).
    # With no subcommand (`smartspec --help`) nothing is imported: only the list is shown.
    chosen = next((a for a in argv if a in SUBCOMMANDS), "")
    parser = build_parser(only=chosen)
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.error(f"subcommand {args.command!r} is not available")
    return int(run(args) or 0)

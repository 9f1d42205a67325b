"""`smartspec worker`: load a model and a proposer, serve Generation, follow a controller.

Every flag is also a SMARTSPEC_* environment variable (see smartspec.core.config).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from smartspec.core.config import add_option
from smartspec.core.security import add_security_options, security_from_args
from smartspec.core.tracing import TracingUnavailable, add_tracing_options, configure_from_args, shutdown as stop_tracing

DTYPES = ("float32", "bfloat16", "float16")
NO_CONTROLLER = "none"   # what `--controller` takes to plan in-process with --local-policy


def controller_address(text: str) -> str | None:
    """`--controller`: HOST:PORT, or None for `none` (no controller: plan with --local-policy)."""
    text = text.strip()
    return None if text.lower() == NO_CONTROLLER else text


def configure(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--host", default="0.0.0.0", help="address to bind")
    add_option(parser, "--port", default=50061, type=int, help="gRPC port (0 = any free port)")
    add_option(parser, "--worker-id", default="worker-0", help="unique id reported to the controller")
    add_option(parser, "--controller", default=NO_CONTROLLER, type=controller_address,
               help=f"controller HOST:PORT, or '{NO_CONTROLLER}' to plan locally with --local-policy")
    add_option(parser, "--controller-token", default="", help="bearer token for the controller")
    add_option(parser, "--controller-tls-ca", default="", help="PEM roots: reach the controller over TLS")
    add_option(parser, "--model", default="SmolLM2-135M-Instruct",
               help="target model: a packaged name, a .gguf file or a Hugging Face folder")
    add_option(parser, "--proposer", default="ngram", type=proposer_spec,
               help="how proposals are made: ngram (prompt lookup), suffix (suffix decoding: this and "
                    "recent requests' text), draft (a draft model), or a comma list of them with at least "
                    "one model-free (ngram,suffix,draft): each request and step uses the one expected to "
                    "pay most (with a draft model in the list, goodput plans (proposer, k) per request)")
    add_option(parser, "--draft", default="auto",
               help="draft model for --proposer draft (alone or in a list): 'auto', a kind built from the target "
                    "(bf16, int8, layers:N) or a model path with the target's tokenizer")
    add_option(parser, "--max-k", default=8, type=int, help="largest speculation length")
    add_option(parser, "--max-batch-size", default=32, type=int, help="requests decoding at once (KV slots)")
    add_option(parser, "--max-queue", default=256, type=int, help="waiting requests beyond the slots")
    add_option(parser, "--context-window", default=2048, type=int,
               help="tokens per request (prompt + completion), capped by the model's")
    add_option(parser, "--token-budget", default=2048, type=int,
               help="target query tokens per step (decode + proposals + prefill chunks)")
    add_option(parser, "--default-max-tokens", default=256, type=int, help="completion length when a request sets 0")
    add_option(parser, "--device", default="cpu", help="cpu, cuda or cuda:N")
    add_option(parser, "--dtype", default="float32", choices=DTYPES, help="target weights and KV cache dtype")
    add_option(parser, "--plan-deadline-ms", default=None, type=float,
               help="wait for the controller's plan at most this long (unset: max(5 ms, 25%% of the last step))")
    add_option(parser, "--fallback-k", default=0, type=int,
               help="k for requests the controller has not planned (0: a missed plan never costs extra compute)")
    add_option(parser, "--local-policy", default="goodput",
               help="policy with --controller none, a policy spec: NAME[:ARGS] "
                    "(e.g. fixed:3, goodput:max_k=6,min_gain=0.05)")
    add_option(parser, "--local-policy-param", default=None, action="append",
               help="extra KEY=VALUE parameter for --local-policy (repeatable)")
    add_option(parser, "--cost-profile-id", default="", help="share a fitted cost model with same-hardware workers")
    add_option(parser, "--profile-steps", default=3, type=int, help="timed repeats per startup profile point, median sent (0 = skip)")
    add_option(parser, "--metrics-port", default=0, type=int, help="Prometheus /metrics port (0 = off)")
    add_option(parser, "--grace-s", default=10.0, type=float, help="on SIGTERM, let running requests finish this long")
    add_security_options(parser)
    add_tracing_options(parser)


MODEL_FREE_PROPOSERS = ("ngram", "suffix")
PROPOSERS = MODEL_FREE_PROPOSERS + ("draft",)


def proposer_spec(text: str) -> str:
    """`--proposer`: one of ngram, suffix, draft, or a comma list of distinct ones chosen per request
    (at least one model-free: prompt lookup or suffix decoding)."""
    names = [name.strip() for name in text.split(",")]
    if len(names) == 1 and names[0] in PROPOSERS:
        return names[0]
    unknown = [name for name in names if name not in PROPOSERS]
    if len(names) < 2 or unknown or len(set(names)) != len(names) or not set(names) & set(MODEL_FREE_PROPOSERS):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected one of {', '.join(PROPOSERS)} or a list of distinct ones with at least one "
            f"model-free proposer ({', '.join(MODEL_FREE_PROPOSERS)}), e.g. ngram,suffix,draft")
    return ",".join(names)


def build_proposer(name: str, target: Any, *, draft: str, max_slots: int, max_tokens: int) -> Any:
    """The proposer for `name`; a draft is built from the target or loaded from a path."""
    from smartspec.worker.model import build_draft, draft_kinds, load_model
    from smartspec.worker.proposers import make_proposer
    from smartspec.worker.proposers.choice import ProposerChoice

    if "," in name:
        names = name.split(",")
        return ProposerChoice([build_proposer(member, target, draft=draft, max_slots=max_slots, max_tokens=max_tokens)
                               for member in names], names)
    if name in MODEL_FREE_PROPOSERS:
        return make_proposer(name)
    kind = draft.split(":")[0]
    if draft == "auto" or kind in draft_kinds():
        draft_model = build_draft(target, draft)
    else:
        draft_model = load_model(draft, device=target.module.device, dtype=target.module.dtype)
    return make_proposer("draft", loaded_model=draft_model, max_slots=max_slots, max_tokens=max_tokens)


def run(args: argparse.Namespace) -> int:
    import torch

    from smartspec.worker.engine import EngineConfig
    from smartspec.worker.model import load_model
    from smartspec.worker.local_policy import local_policy_choice
    from smartspec.worker.server import WorkerOptions, WorkerServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine_config = EngineConfig(
            max_batch_size=args.max_batch_size,
            max_context_tokens=args.context_window,
            max_queue=args.max_queue,
            token_budget=args.token_budget,
            max_k=args.max_k,
            fallback_k=args.fallback_k,
        )
        if args.controller is None:   # check the policy before spending seconds on the model
            local_policy_choice(args.local_policy, args.local_policy_param or ())
        configure_from_args(args, "smartspec-worker")
    except (ValueError, TracingUnavailable) as exc:
        print(f"smartspec worker: {exc}", file=sys.stderr)
        return 2
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    proposer = build_proposer(args.proposer, model, draft=args.draft, max_slots=args.max_batch_size,
                              max_tokens=min(args.context_window, model.config.max_position_embeddings))
    options = WorkerOptions(
        worker_id=args.worker_id,
        host=args.host,
        port=args.port,
        engine=engine_config,
        default_max_tokens=args.default_max_tokens,
        controller=args.controller,
        plan_deadline_ms=args.plan_deadline_ms,
        controller_auth_token=args.controller_token,
        controller_tls_ca=args.controller_tls_ca,
        local_policy=args.local_policy,
        local_policy_params=tuple(args.local_policy_param or ()),
        cost_profile_id=args.cost_profile_id,
        profile_steps=args.profile_steps,
        metrics_port=args.metrics_port,
        dtype=args.dtype,
        proposer_name=f"draft:{args.draft}" if args.proposer == "draft" else args.proposer,
    )
    server = WorkerServer(model, proposer, options, security=security_from_args(args))
    port = server.start()
    print(f"worker listening on {args.host}:{port}", flush=True)

    def shutdown(signum, frame) -> None:
        # stop() waits for running requests: not inside the signal handler.
        threading.Thread(target=server.stop, args=(args.grace_s,), daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    server.wait_for_termination()
    stop_tracing()   # flush the spans still batched
    return 0

"""`smartspec generate`: stream a completion from a worker to the terminal.

    smartspec generate --worker 127.0.0.1:50061 "def fibonacci(n):" --max-tokens 64
    smartspec generate --chat "Summarise the Zen of Python in one line" --json
    smartspec generate --worker 10.0.0.5:50061,10.0.0.6:50061 "def add(a, b):"   # round robin

Text is printed as it arrives; `--json` prints only the final result (text, finish reason, usage,
speculation statistics, timings) as one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from smartspec.clients.client_options import add_connection_options, client_from_args, reports_errors
from smartspec.core.config import add_flag, add_option, env_default, env_name
from smartspec.clients.types import GenerationResult


def configure(parser) -> None:
    parser.add_argument("prompt", help='prompt text, or "-" to read it from stdin')
    add_connection_options(parser, worker=True, timeout_s=600.0)
    add_flag(parser, "--chat", help="send the prompt as a user chat message (the model's chat template applies)")
    add_option(parser, "--system", default="", help="with --chat: a system message before the prompt")
    add_option(parser, "--max-tokens", default=128, type=int, help="completion tokens at most (0 = worker default)")
    add_option(parser, "--temperature", default=None, type=float, help="sampling temperature; unset or 0 = greedy")
    add_option(parser, "--top-p", default=None, type=float, help="nucleus sampling mass in (0, 1]")
    add_option(parser, "--top-k", default=None, type=int, help="sample among the k most likely tokens (0 = all)")
    add_option(parser, "--seed", default=None, type=int, help="seed for reproducible sampling")
    add_option(parser, "--request-id", default="", help="client-chosen request id (unique among running requests)")
    parser.add_argument(
        "--stop", action="append", default=env_default("--stop", None, lambda raw: raw.split("\n")),
        help=f"stop string (repeatable; env {env_name('--stop')}, newline-separated)",
    )
    add_flag(parser, "--json", help="print only the final result with its statistics as JSON")


def _request(args) -> tuple[str | list[dict[str, str]], dict]:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        stop=args.stop or (), seed=args.seed, request_id=args.request_id,
    )
    if not args.chat:
        return prompt, options
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    return messages + [{"role": "user", "content": prompt}], options


def result_summary(result: GenerationResult) -> str:
    """One line of figures after the streamed text."""
    spec = result.speculation
    return (
        f"[{result.finish_reason}; {result.usage.completion_tokens} tokens in {result.total_ms:.0f} ms, "
        f"first token {result.time_to_first_token_ms:.0f} ms; acceptance {spec.acceptance_rate:.2f}, "
        f"mean k {spec.mean_speculation_length:.2f}]"
    )


@reports_errors
def run(args) -> int:
    prompt, options = _request(args)
    with client_from_args(args, stream_timeout=args.timeout) as client:
        stream = client.chat(prompt, **options) if args.chat else client.generate(prompt, **options)
        for delta in stream:
            if not args.json:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        result = stream.result
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        print()
        print(result_summary(result), file=sys.stderr)
    return 0

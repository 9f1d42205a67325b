"""GenerateRequest (proto) -> GenerationRequest (domain), validating every field before queueing.

Each problem is an InvalidRequest naming the proto field, which the server turns into
INVALID_ARGUMENT: a client can tell exactly what to fix. That includes bytes that are not a
GenerateRequest at all: proto3 `string` fields must be UTF-8, and the generated deserializer raises
for invalid UTF-8 before any servicer code runs (gRPC then answers INTERNAL "Exception
deserializing request!"). `decode_generate_request` is the server's deserializer instead: it never
raises, and for undecodable bytes it returns the InvalidRequest naming the string field at fault
(`prompt`, `stop[1]`, `messages[0].content`), found by walking the wire format
(`smartspec.core.wire_check`, shared with the controller's services).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from smartspec.core.errors import FieldError
from smartspec.core.ids import id_problem
from smartspec.core.wire_check import deserializer
from smartspec.v1 import generation_pb2

from .sequence import GenerationRequest

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RequestLimits:
    context_window: int               # prompt + completion tokens per request
    default_max_tokens: int = 256     # used when max_tokens is 0 (capped by what the context leaves)
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_request_id_chars: int = 128
    max_temperature: float = 2.0


class InvalidRequest(FieldError):
    """A Generate request's field is wrong (maps to INVALID_ARGUMENT)."""


decode_generate_request = deserializer(generation_pb2.GenerateRequest, InvalidRequest)
"""The Generate method's request deserializer: the message, or (never raising) the InvalidRequest
that says which field made the bytes undecodable (see `smartspec.core.wire_check`)."""


def prompt_token_ids(request: generation_pb2.GenerateRequest, tokenizer: Any) -> tuple[str, list[int]]:
    """(field the prompt came from, its token ids): raw `prompt`, or `messages` through the chat template."""
    has_prompt = bool(request.prompt)
    has_messages = len(request.messages) > 0
    if has_prompt == has_messages:
        field = "prompt" if not has_messages else "messages"
        raise InvalidRequest(field, "set exactly one of prompt (non-empty text) or messages")
    if has_prompt:
        return "prompt", list(tokenizer.encode(request.prompt))
    chat = []
    for index, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{index}].role",
                                 f"must be one of {', '.join(CHAT_ROLES)}, got {message.role!r}")
        chat.append({"role": message.role, "content": message.content})
    try:
        encoded = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    except (ValueError, TypeError) as exc:   # no template, or one that rejects this conversation
        raise InvalidRequest("messages", f"the model's chat template cannot render them: {exc}") from exc
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return "messages", list(ids)


def to_domain(request: generation_pb2.GenerateRequest, tokenizer: Any, limits: RequestLimits) -> GenerationRequest:
    request_id = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
    if request.request_id:
        # The id travels in step reports to the controller and into its Redis keys: the same rule
        # as the controller's (core/ids.py), with a shorter limit.
        problem = id_problem(request.request_id, limits.max_request_id_chars)
        if problem is not None:
            raise InvalidRequest("request_id", problem)

    temperature = request.temperature if request.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or not 0.0 <= temperature <= limits.max_temperature:
        raise InvalidRequest("temperature", f"must be in [0, {limits.max_temperature:g}], got {temperature}")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidRequest("top_p", f"must be in (0, 1], got {top_p}")
    top_k = request.top_k if request.HasField("top_k") else 0

    if len(request.stop) > limits.max_stop_strings:
        raise InvalidRequest("stop", f"at most {limits.max_stop_strings} stop strings, got {len(request.stop)}")
    for index, stop in enumerate(request.stop):
        if not stop:
            raise InvalidRequest(f"stop[{index}]", "must not be empty")
        if len(stop) > limits.max_stop_chars:
            raise InvalidRequest(f"stop[{index}]", f"at most {limits.max_stop_chars} characters")

    if request.max_tokens > limits.context_window:
        raise InvalidRequest("max_tokens", f"must be in 1..{limits.context_window} (0 = default), "
                                           f"got {request.max_tokens}")
    field, prompt_ids = prompt_token_ids(request, tokenizer)
    room = limits.context_window - len(prompt_ids)
    if room < 1:
        raise InvalidRequest(field, f"{len(prompt_ids)} prompt tokens leave no room for a completion "
                                    f"in the {limits.context_window}-token context window")
    max_tokens = request.max_tokens or limits.default_max_tokens
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=tuple(prompt_ids),
        max_tokens=min(max_tokens, room),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        stop=tuple(request.stop),
        seed=request.seed if request.HasField("seed") else None,
        ignore_eos=request.ignore_eos,
    )

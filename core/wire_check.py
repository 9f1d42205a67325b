"""Bytes that are no message: which string field holds invalid UTF-8, read from the wire format.

proto3 `string` fields must be UTF-8 and the generated deserializer raises for invalid UTF-8 before
any servicer code runs, so gRPC answers INTERNAL "Exception deserializing request!" and nobody
learns which field was wrong. `deserializer(message_class, error_class)` makes a request
deserializer that never raises: the message, or an `error_class` (a `FieldError`) naming the string
field at fault as a caller writes it (`prompt`, `stop[1]`, `messages[0].content`), found by walking
the raw bytes with the message's descriptor (`invalid_utf8_field`). The servers register it in
place of `FromString` and answer the error with INVALID_ARGUMENT (`smartspec.core.errors.abort`).
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from smartspec.core.errors import FieldError

M = TypeVar("M", bound=Message)
E = TypeVar("E", bound=FieldError)

UTF8_MESSAGE = "is not valid UTF-8 (proto3 strings must be)"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError when truncated
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes):
    """(number, wire type, value) of each field in order: an int for varints, the payload bytes for
    length-delimited fields, None for fixed-width ones. Raises IndexError/ValueError on bad bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
            yield number, wire_type, value
        elif wire_type == 1 or wire_type == 5:
            pos += 8 if wire_type == 1 else 4
            if pos > len(data):
                raise ValueError("truncated field")
            yield number, wire_type, None
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            payload, pos = data[pos:pos + length], pos + length
            if pos > len(data):
                raise ValueError("truncated field")
            yield number, wire_type, payload
        else:  # groups (3, 4) or no wire type at all: not a message this walk can read
            raise ValueError(f"wire type {wire_type}")


def invalid_utf8_field(data: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The first string field (as a caller writes it: `messages[0].content`) whose bytes are not
    UTF-8, walking the protobuf wire format with the message's descriptor; None if none is.
    Raises IndexError or ValueError for bytes that are not the wire format at all."""
    seen: dict[str, int] = {}
    for number, wire_type, payload in _fields(data):
        if wire_type != 2:
            continue
        field = descriptor.fields_by_number.get(number)
        if field is None or field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
            continue
        name = prefix + field.name
        is_map = field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry
        if field.is_repeated and not is_map:
            index = seen.get(name, 0)
            seen[name] = index + 1
            name = f"{name}[{index}]"
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return name
        else:   # a map entry is a message {key = 1, value = 2}: named `trace_context.key` / `.value`
            inner = invalid_utf8_field(payload, field.message_type, name + ".")
            if inner is not None:
                return inner
    return None


def varint_at(data: bytes, path: Sequence[int]) -> int | None:
    """The varint at field numbers `path` (through singular sub-messages: (2, 1) is field 1 of the
    message in field 2), read from the raw bytes (the last occurrence wins, as in protobuf); None
    if absent or unreadable. For what a caller can still learn from bytes that fail to decode."""
    try:
        *outer, last = path
        for number in outer:
            found = None
            for field_number, wire_type, value in _fields(data):
                if field_number == number and wire_type == 2:
                    found = value
            if found is None:
                return None
            data = found
        result = None
        for field_number, wire_type, value in _fields(data):
            if field_number == last and wire_type == 0:
                result = value
        return result
    except (IndexError, ValueError):
        return None


def decode_error(data: bytes, descriptor: Descriptor, error_class: Callable[[str, str], E],
                 exc: Exception) -> E:
    """The error for bytes that failed to decode as `descriptor`'s message: the string field with
    invalid UTF-8 if the walk finds one, else `request` (not the message at all)."""
    try:
        field = invalid_utf8_field(data, descriptor)
    except (IndexError, ValueError):
        field = None
    if field is not None:
        return error_class(field, UTF8_MESSAGE)
    return error_class("request", f"is not a valid {descriptor.name} message ({exc})")


def deserializer(message_class: type[M], error_class: Callable[[str, str], E] = FieldError
                 ) -> Callable[[bytes], M | E]:
    """A gRPC request deserializer for `message_class` that never raises: the message, or the
    `error_class(field, message)` saying which field made the bytes undecodable."""
    descriptor = message_class.DESCRIPTOR
    from_string = message_class.FromString

    def decode(data: bytes) -> M | E:
        try:
            return from_string(data)
        except DecodeError as exc:
            return decode_error(data, descriptor, error_class, exc)

    decode.__qualname__ = f"deserializer({descriptor.name})"
    return decode

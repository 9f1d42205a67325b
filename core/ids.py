"""The one rule for ids that end up in Redis key names, metric labels and log lines.

Worker ids, cost profile ids and request ids become parts of Redis keys (`hist:{worker_id}`,
`fit:{cost_profile_id}`) and of log lines, so they are restricted to a plain charset: ASCII letters,
digits and `- _ . / @ + = ~`. No `:` (the key separator: the controller keeps state of its own under
names with a colon, which no id can then reach), no whitespace, newlines, NUL or other control
characters, no glob or hash-tag characters (`* ? [ ] { }`). The worker checks a Generate
`request_id` with the same rule (and a shorter limit), so an id a client may choose is always one
the controller accepts.
"""

from __future__ import annotations

import re

ID_CHARSET = "ASCII letters, digits and - _ . / @ + = ~"
MAX_ID_LENGTH = 256
_ID = re.compile(r"[A-Za-z0-9._/@+=~-]+")
_ALLOWED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._/@+=~-"


def id_problem(value: str, max_length: int = MAX_ID_LENGTH) -> str | None:
    """What is wrong with `value` as an id (None: nothing), in words for a FieldError."""
    if not value:
        return "must not be empty"
    if len(value) > max_length:
        return f"must be at most {max_length} characters, got {len(value)}"
    if _ID.fullmatch(value) is None:
        bad = next(ch for ch in value if _ID.fullmatch(ch) is None)
        return f"may only contain {ID_CHARSET}, got {bad!r}"
    return None


def all_valid(ids: list[str], max_length: int = MAX_ID_LENGTH) -> bool:
    """True when every id passes `id_problem`: the batch fast path (256 ids in ~8 us: one join;
    deleting the allowed bytes must leave exactly the separators, and no two separators meet)."""
    if not ids:
        return True
    joined = ",".join(ids)
    if not joined.isascii():
        return False
    data = joined.encode("ascii")
    if len(data.translate(None, _ALLOWED)) != len(ids) - 1:
        return False   # a character outside the charset (or a comma inside an id)
    if not data or b",," in data or data[0] == 44 or data[-1] == 44:   # 44: ','
        return False   # an empty id
    return len(data) <= max_length or max(map(len, ids)) <= max_length

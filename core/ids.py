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
# Any character outside the charset; `,` joins many ids into one string for a single search.
_BAD = re.compile(r"[^A-Za-z0-9._/@+=~,-]")


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
    """True when every id passes `id_problem` (one join and one search: the batch fast path)."""
    if not ids:
        return True
    lengths = list(map(len, ids))
    if min(lengths) == 0 or max(lengths) > max_length:
        return False
    joined = ",".join(ids)
    return _BAD.search(joined) is None and joined.count(",") == len(ids) - 1

"""Proposers (prompt lookup, suffix decoding, draft model) and lossless verification.

`make_proposer("ngram", max_ngram=4)`, `make_proposer("suffix", global_tokens=100_000)` or
`make_proposer("draft", loaded_model=..., max_slots=..., max_tokens=...)` builds a proposer by
registered name; unknown names and options are ValueErrors that name what was wrong, so a CLI flag
typo reads as a clear message.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from .base import Proposal, ProposalRequest, Proposer
from .sampling import GREEDY, SamplingParams, probs_from_logits, sample
from .verify import RowVerification, verify_packed

__all__ = [
    "GREEDY",
    "Proposal",
    "ProposalRequest",
    "Proposer",
    "RowVerification",
    "SamplingParams",
    "make_proposer",
    "probs_from_logits",
    "proposer_names",
    "register_proposer",
    "sample",
    "verify_packed",
]

_FACTORIES: dict[str, Callable[..., Proposer]] = {}


def register_proposer(name: str, factory: Callable[..., Proposer]) -> None:
    """Make `factory(**options)` available as make_proposer(name, **options)."""
    if name in _FACTORIES:
        raise ValueError(f"proposer {name!r} is already registered")
    _FACTORIES[name] = factory


def proposer_names() -> list[str]:
    return sorted(_FACTORIES)


def make_proposer(kind_name: str, **options: Any) -> Proposer:
    """Build the proposer registered as `kind_name` with keyword `options`."""
    factory = _FACTORIES.get(kind_name)
    if factory is None:
        raise ValueError(f"unknown proposer {kind_name!r} (known: {', '.join(proposer_names())})")
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"proposer {kind_name!r} has no option(s) {', '.join(unknown)} (options: {', '.join(accepted)})"
        )
    return factory(**options)


def _register_builtins() -> None:
    from .draft import DraftModelProposer
    from .ngram import NgramProposer
    from .suffix import SuffixProposer

    register_proposer("ngram", NgramProposer)
    register_proposer("suffix", SuffixProposer)
    register_proposer("draft", DraftModelProposer)


_register_builtins()

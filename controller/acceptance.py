"""Per-request acceptance-rate estimates from tested positions, shrunk toward a pooled prior.

Verification stops at the first rejection, so with k proposals and per-position acceptance a the
target judges accepted + 1 positions (or k if all were accepted). Each judged position is one
Bernoulli(a) trial; positions after a rejection were never tried. Hence

    a_hat = accepted / tested            (consistent)
    accepted / proposed                  (biased low: it counts untried positions as failures)

The planner uses a_hat as the chance that each further planned position yields a token, so a
position the proposer could not fill counts too: when the controller planned k for a request and
the proposer offered fewer (prompt lookup found no match, or a shorter one) and all of them were
accepted, the next position was tried and failed (`AcceptanceState.planned_k`). Without this, an
ngram proposer that finds a match in 4 steps out of 10 looks like a = 0.85 and the optimizer
expects ~4 tokens from k = 8 where ~2.4 come (measured on summarise prompts, SmolLM2).

A new request has no trials, so its estimate starts at the rate pooled over the worker's recent
requests (per proposer kind) and moves toward its own rate as evidence grows: the posterior mean
of a Beta(prior_rate * s, (1 - prior_rate) * s) prior with s = `prior_strength` pseudo-trials.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

DEFAULT_PRIOR_RATE = 0.5  # when nothing at all has been seen for a proposer kind
DEFAULT_PRIOR_STRENGTH = 8.0  # pseudo-trials: ~2 full steps at k = 4 before own history dominates
DEFAULT_PRIOR_DECAY = 0.995  # per pooled update: the pool remembers roughly the last 200 updates


class OutcomeError(ValueError):
    """A reported outcome is impossible; `field` is the RequestOutcome field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def positions_tested(proposed: int, accepted: int) -> int:
    """Positions the target judged: every accepted one, plus the rejection that stopped it (if any)."""
    return accepted + (1 if accepted < proposed else 0)


def check_outcome(proposed: int, accepted: int, tested: int) -> None:
    """Raise OutcomeError (naming the field) unless the numbers can come from one verification.

    tested is accepted + 1 when a rejection stopped the run, accepted when all were accepted, and
    may also be accepted < proposed when the worker stopped judging early without a rejection
    (an accepted end-of-sequence token, or the request's token limit).
    """
    if proposed < 0:
        raise OutcomeError("proposed_tokens", f"must be >= 0, got {proposed}")
    if not 0 <= accepted <= proposed:
        raise OutcomeError("accepted_tokens", f"must be in 0..proposed_tokens ({proposed}), got {accepted}")
    most = positions_tested(proposed, accepted)
    if not accepted <= tested <= most:
        raise OutcomeError(
            "tested_positions",
            f"must be accepted_tokens ({accepted}) or, after a rejection, accepted_tokens + 1 "
            f"(at most {most}), got {tested}",
        )


def estimate(own_accepted: float, own_tested: float, prior_accepted: float, prior_tested: float,
             prior_strength: float = DEFAULT_PRIOR_STRENGTH,
             default_rate: float = DEFAULT_PRIOR_RATE) -> float:
    """Beta-posterior mean of a request's acceptance rate.

    The prior's mean is the pooled rate prior_accepted / prior_tested (`default_rate` when the
    pool is empty) and its weight is `prior_strength` trials, regardless of how large the pool
    is: the pool says what requests are like on average, not what this one is.
    """
    if min(own_accepted, own_tested, prior_accepted, prior_tested, prior_strength) < 0:
        raise ValueError("counts and prior_strength must be >= 0")
    prior_rate = pooled_rate(prior_accepted, prior_tested, default_rate)
    weight = own_tested + prior_strength
    if weight <= 0:
        return prior_rate
    return (own_accepted + prior_rate * prior_strength) / weight


def pooled_rate(accepted: float, tested: float, default_rate: float = DEFAULT_PRIOR_RATE) -> float:
    return accepted / tested if tested > 0 else default_rate


@dataclass(frozen=True)
class PooledPrior:
    """Decayed acceptance counts over a worker's recent requests (one per proposer kind).

    Decaying by `decay` per update keeps the prior following the recent mix of requests rather
    than everything since start-up.
    """

    accepted: float = 0.0
    tested: float = 0.0

    def rate(self, default_rate: float = DEFAULT_PRIOR_RATE) -> float:
        return pooled_rate(self.accepted, self.tested, default_rate)

    def update(self, accepted: float, tested: float, decay: float = DEFAULT_PRIOR_DECAY) -> "PooledPrior":
        """Fold in one step's (or one request's) counts after decaying the old ones."""
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if accepted < 0 or tested < accepted:
            raise ValueError(f"need 0 <= accepted <= tested, got {accepted}, {tested}")
        return PooledPrior(decay * self.accepted + accepted, decay * self.tested + tested)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PooledPrior":
        return cls(float(data.get("accepted", 0.0)), float(data.get("tested", 0.0)))


@dataclass(frozen=True)
class AcceptanceState:
    """What the controller remembers about one request between steps."""

    accepted: int = 0  # accepted proposals so far
    tested: int = 0  # tested positions so far
    steps: int = 0  # steps reported for this request
    last_k: int = 0
    last_fully_accepted: bool = False
    steps_since_speculation: int = 0  # consecutive steps with k = 0
    planned_k: int = 0  # k the controller planned for this request's next step (0: unknown / none)

    def update(self, proposed: int, accepted: int, tested: int | None = None) -> "AcceptanceState":
        """The state after one more step in which `proposed` tokens were offered and `accepted` kept.

        If `planned_k` asked for more than the proposer offered and every offered token was
        accepted, the first unfilled position counts as one failed trial (see the module doc).
        """
        tested = positions_tested(proposed, accepted) if tested is None else tested
        check_outcome(proposed, accepted, tested)
        ran_dry = self.planned_k > proposed and accepted == proposed == tested
        return replace(
            self,
            accepted=self.accepted + accepted,
            tested=self.tested + tested + (1 if ran_dry else 0),
            planned_k=0,
            steps=self.steps + 1,
            last_k=proposed,
            last_fully_accepted=proposed > 0 and accepted == proposed,
            steps_since_speculation=0 if proposed > 0 else self.steps_since_speculation + 1,
        )

    def estimate(self, prior: PooledPrior = PooledPrior(),
                 prior_strength: float = DEFAULT_PRIOR_STRENGTH,
                 default_rate: float = DEFAULT_PRIOR_RATE) -> float:
        return estimate(self.accepted, self.tested, prior.accepted, prior.tested, prior_strength, default_rate)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AcceptanceState":
        return cls(
            accepted=int(data.get("accepted", 0)),
            tested=int(data.get("tested", 0)),
            steps=int(data.get("steps", 0)),
            last_k=int(data.get("last_k", 0)),
            last_fully_accepted=_as_bool(data.get("last_fully_accepted", False)),
            steps_since_speculation=int(data.get("steps_since_speculation", 0)),
            planned_k=int(data.get("planned_k", 0)),
        )


def _as_bool(value: Any) -> bool:
    """Redis hashes hand back strings: accept "1"/"0"/"true"/"false" as well as real bools."""
    if isinstance(value, (bytes, str)):
        text = value.decode() if isinstance(value, bytes) else value
        return text.strip().lower() in ("1", "true", "yes")
    return bool(value)

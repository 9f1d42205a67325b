"""Per-request estimates of how a proposer's tokens fare: acceptance rate and fill rate.

Verification stops at the first rejection, so with k proposals and per-position acceptance a the
target judges accepted + 1 positions (or k if all were accepted). Each judged position is one
Bernoulli(a) trial; positions after a rejection were never tried. Hence

    a_hat = accepted / tested            (consistent)
    accepted / proposed                  (biased low: it counts untried positions as failures)

A proposer may also offer fewer tokens than asked: prompt lookup (ngram) proposes nothing when the
context has no match. Such a position costs nothing (the target never runs it) and yields nothing,
so it is neither an acceptance failure nor a token to pay for. We keep it apart as the fill rate

    f_hat = proposed / requested         (proposal tokens offered per position asked for)

and the planner expects f * (a + ... + a^k) accepted tokens from k at a cost of f * k verified
tokens (see policies/optimizer.py). Folding dry positions into a (counting them as failures)
makes an ngram request that matches now and then look hopeless at every k, while a fixed k would
collect its matches for free; ignoring them makes it look like a draft model at every k.

A new request has no trials, so each estimate starts at the rate pooled over recent steps of every
request (per proposer kind) and moves toward its own rate as evidence grows: the posterior mean
of a Beta(prior_rate * s, (1 - prior_rate) * s) prior with s = `prior_strength` pseudo-trials.
(How these feed a plan, and when the pool is updated: core/decision.py.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

from smartspec.core.errors import FieldError

DEFAULT_PRIOR_RATE = 0.5  # when nothing at all has been seen for a proposer kind
DEFAULT_PRIOR_FILL = 1.0  # likewise for the fill rate: a draft model always fills what it is asked
DEFAULT_PRIOR_STRENGTH = 8.0  # pseudo-trials: ~2 full steps at k = 4 before own history dominates
DEFAULT_PRIOR_DECAY = 0.995  # per reported step: the pool remembers roughly the last 200 steps


class OutcomeError(FieldError):
    """A reported outcome is impossible; `field` is the RequestOutcome field at fault."""


def positions_tested(proposed, accepted):
    """Positions the target judged: every accepted one, plus the rejection that stopped it (if any).

    The one definition of a step's tested positions. Ints give an int; numpy arrays (a batch of
    rows, as the simulator keeps them) give the same rule element by element.
    """
    return accepted + (accepted < proposed)


def check_outcome(proposed: int, accepted: int, tested: int, requested: int | None = None) -> None:
    """Raise OutcomeError (naming the field) unless the numbers can come from one verification.

    tested is accepted + 1 when a rejection stopped the run, accepted when all were accepted, and
    may also be accepted < proposed when the worker stopped judging early without a rejection
    (an accepted end-of-sequence token, or the request's token limit). requested (when known) is
    at least proposed: a proposer may offer fewer tokens than asked, never more.
    """
    if proposed < 0:
        raise OutcomeError("proposed_tokens", f"must be >= 0, got {proposed}")
    if requested is not None and requested < proposed:
        raise OutcomeError("requested_tokens",
                           f"must be >= proposed_tokens ({proposed}) when set, got {requested}")
    if not 0 <= accepted <= proposed:
        raise OutcomeError("accepted_tokens", f"must be in 0..proposed_tokens ({proposed}), got {accepted}")
    most = positions_tested(proposed, accepted)
    if not accepted <= tested <= most:
        raise OutcomeError(
            "tested_positions",
            f"must be accepted_tokens ({accepted}) or, after a rejection, accepted_tokens + 1 "
            f"(at most {most}), got {tested}",
        )


def requested_or_proposed(requested: int, proposed: int) -> int:
    """The wire's requested_tokens, where 0 alongside proposals means "not reported" (older worker)."""
    return requested if requested > 0 else proposed


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
    """Decayed counts over a worker's recent requests (one per proposer kind).

    accepted / tested pools the acceptance rate, proposed / requested the fill rate. Decaying by
    `decay` per update keeps the prior following the recent mix of requests rather than
    everything since start-up. When to update is the decision pipeline's rule (core/decision.py,
    `pool_step`): once per reported step, with that step's evidence.
    """

    accepted: float = 0.0
    tested: float = 0.0
    proposed: float = 0.0
    requested: float = 0.0

    def rate(self, default_rate: float = DEFAULT_PRIOR_RATE) -> float:
        return pooled_rate(self.accepted, self.tested, default_rate)

    def fill(self, default_fill: float = DEFAULT_PRIOR_FILL) -> float:
        return pooled_rate(self.proposed, self.requested, default_fill)

    def update(self, accepted: float, tested: float, decay: float = DEFAULT_PRIOR_DECAY,
               proposed: float = 0.0, requested: float = 0.0) -> "PooledPrior":
        """Fold in one step's counts after decaying the old ones."""
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if accepted < 0 or tested < accepted:
            raise ValueError(f"need 0 <= accepted <= tested, got {accepted}, {tested}")
        if proposed < 0 or requested < proposed:
            raise ValueError(f"need 0 <= proposed <= requested, got {proposed}, {requested}")
        return PooledPrior(decay * self.accepted + accepted, decay * self.tested + tested,
                           decay * self.proposed + proposed, decay * self.requested + requested)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PooledPrior":
        return cls(*(float(data.get(name) or 0.0) for name in ("accepted", "tested", "proposed", "requested")))


@dataclass(frozen=True)
class AcceptanceState:
    """What the controller remembers about one request between steps."""

    accepted: int = 0  # accepted proposals so far
    tested: int = 0  # tested positions so far
    proposed: int = 0  # proposals offered so far
    requested: int = 0  # proposals asked of the proposer so far (>= proposed)
    steps: int = 0  # steps reported for this request
    last_k: int = 0
    last_fully_accepted: bool = False
    steps_since_speculation: int = 0  # consecutive steps with k = 0

    def update(self, proposed: int, accepted: int, tested: int | None = None,
               requested: int | None = None) -> "AcceptanceState":
        """The state after one more step in which `requested` proposals were asked for, `proposed`
        offered and `accepted` kept (requested None: as many as were offered)."""
        tested = positions_tested(proposed, accepted) if tested is None else tested
        requested = proposed if requested is None else requested
        check_outcome(proposed, accepted, tested, requested)
        return replace(
            self,
            accepted=self.accepted + accepted,
            tested=self.tested + tested,
            proposed=self.proposed + proposed,
            requested=self.requested + requested,
            steps=self.steps + 1,
            last_k=requested,
            last_fully_accepted=proposed > 0 and accepted == proposed,
            # A step asked for proposals counts as speculating even if the proposer ran dry: the
            # fill rate learned from it, so there is nothing for a probe to find out.
            steps_since_speculation=0 if requested > 0 else self.steps_since_speculation + 1,
        )

    def estimate(self, prior: PooledPrior = PooledPrior(),
                 prior_strength: float = DEFAULT_PRIOR_STRENGTH,
                 default_rate: float = DEFAULT_PRIOR_RATE) -> float:
        return estimate(self.accepted, self.tested, prior.accepted, prior.tested, prior_strength, default_rate)

    def fill_estimate(self, prior: PooledPrior = PooledPrior(),
                      prior_strength: float = DEFAULT_PRIOR_STRENGTH,
                      default_fill: float = DEFAULT_PRIOR_FILL) -> float:
        return estimate(self.proposed, self.requested, prior.proposed, prior.requested, prior_strength,
                        default_fill)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AcceptanceState":
        """Missing counters read as 0: a history stored before fill tracking existed has
        proposed = requested = 0 and simply starts its fill evidence now."""
        return cls(
            accepted=int(data.get("accepted", 0)),
            tested=int(data.get("tested", 0)),
            proposed=int(data.get("proposed", 0)),
            requested=int(data.get("requested", 0)),
            steps=int(data.get("steps", 0)),
            last_k=int(data.get("last_k", 0)),
            last_fully_accepted=_as_bool(data.get("last_fully_accepted", False)),
            steps_since_speculation=int(data.get("steps_since_speculation", 0)),
        )


def next_step_fill(fill_estimate: float, proposable: int | None) -> float:
    """The fill to plan the next step with. When the worker could look the proposal up ahead
    (prompt lookup reports `proposable_tokens`), the next step's fill is known: 1 where there is
    something to offer, 0 where asking would offer nothing. Otherwise: the request's average."""
    if proposable is None:
        return fill_estimate
    return 1.0 if proposable > 0 else 0.0


def cap_to_proposable(ks: Sequence[int], proposable: Sequence[int | None]) -> list[int]:
    """No request is asked for more than its proposer can offer (None: no known limit)."""
    return [k if p is None else min(k, p) for k, p in zip(ks, proposable)]


def _as_bool(value: Any) -> bool:
    """Redis hashes hand back strings: accept "1"/"0"/"true"/"false" as well as real bools."""
    if isinstance(value, (bytes, str)):
        text = value.decode() if isinstance(value, bytes) else value
        return text.strip().lower() in ("1", "true", "yes")
    return bool(value)

"""Never worse than no speculation, by measurement: the `goodput` policy's check on its own choices.

The policy speculates when its cost model predicts more tokens per second. A wrong model (a cost
it has no term for, a batch size it has rarely seen) can make it speculate where plain decoding is
faster. The worker measures every step, so it can check: per batch-size class (1, 2-3, 4-7, 8-15,
...), the decayed tokens made by decode steps that verified proposals, against what plain decode
steps (k = 0 for every row) of the same moment make in the same time. When speculative steps made
less than that by more than `margin` (0: at all), speculation is held off in that class until
they measure `resume_margin` above it (hysteresis: near a tie, noise must not flip it every few
steps). Held off, the plan's k is capped at 0, except one step in `probe_every` (stretched so that
probes cost at most `probe_budget` of step time, by the measured cost of a speculative step over a
plain one), which keeps measuring whether speculation has become worth it again.
When a class has speculated for so long that its plain measurement has decayed away, one plain
step is run to refresh it, so the comparison never rests on numbers from another phase of the run.

"Of the same moment": each speculative step is paired with the rate of the plain steps just before
it (`plain_reference_weight`: a moving average over the last few), not with a hundred steps of
them. A machine whose speed drifts (a shared CPU measured 0.145 and 0.19 plain tokens per ms a few
seconds apart at batch 32; a GPU under thermal or neighbour load) otherwise makes a fresh probe look
like a win when the machine just got faster, or a loss when it just got slower.

The two records forget at different speeds because they measure different things. A plain step's
rate depends on the batch and its context lengths, which drift slowly, so the plain record decays
by `decay` per step of the class. A speculative step's rate depends on the workload (what the
proposer guesses right), which can change from one burst to the next: after a burst of code edits
where speculation won, a burst of chat must not ride on that record for a hundred steps. So the
speculative record decays per speculative step, by how many rows it measured: a window of about
`speculative_memory_rows` row-steps (~8 steps at batch 32, never more than `decay` allows at
batch 1, where one step's row is a noisy sample). While a class is held off, that record keeps
forgetting at the same pace on its plain steps too, so the losing stretch that held it off fades
and the probes since decide: summaries and code edits open with new text (speculation loses) and
turn to copying within a few dozen steps; a record that only forgot per probe kept speculation off
for ~30 steps of a batch-12 burst after prompt lookup had started to pay.

Only steps that are all decode count (a prefill chunk makes a step slow for reasons k does not
change); a step asked for proposals that the proposer could not fill is neither kind, and neither is
a step where a draft model chosen per request proposed (PRICED_KINDS). A row
cancelled between steps is reported with the next step and counts one token it did not make:
rare enough to leave alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from smartspec.core.policies.goodput import PROBE_BUDGET, probe_interval_for
from smartspec.v1 import common_pb2

from .steps import StepFacts

log = logging.getLogger(__name__)

CHECKED_POLICY = "goodput"   # a fixed k, or any other policy, is the user's explicit choice: never capped
# Members of a per-request choice priced by their own timed calls (worker/proposers/choice.py): a
# step where one of them proposed is judged by that fit, not here. Its first proposal for a request
# feeds it the whole context, a step many times a plain one's that would hold off every proposer.
PRICED_KINDS = frozenset({common_pb2.PROPOSER_KIND_DRAFT, common_pb2.PROPOSER_KIND_EARLY_EXIT})


def plain_reference(previous: float, rate: float, weight: float) -> float:
    """The moving average of plain steps' tokens per ms that speculative steps are paired with (a
    first plain step sets it)."""
    return rate if previous <= 0 else (1.0 - weight) * previous + weight * rate


def batch_class(batch_size: int) -> int:
    """0 for one request, 1 for 2-3, 2 for 4-7, ...: steps of similar batch size share a class."""
    return max(0, int(math.log2(max(1, batch_size))))


@dataclass
class DecayedRate:
    """Tokens per ms over recent steps of one kind (sums decayed per step of the class)."""

    tokens: float = 0.0
    ms: float = 0.0
    steps: float = 0.0

    def decay(self, factor: float) -> None:
        self.tokens *= factor
        self.ms *= factor
        self.steps *= factor

    def add(self, tokens: float, ms: float) -> None:
        self.tokens += tokens
        self.ms += ms
        self.steps += 1.0

    def rate(self) -> float:
        return self.tokens / self.ms if self.ms > 0 else 0.0


@dataclass
class ClassRecord:
    speculative: DecayedRate = field(default_factory=DecayedRate)   # tokens / ms of speculative steps
    # the same steps' tokens against the tokens plain steps of that moment would have made in their
    # time (its "ms" holds those plain tokens): rate() > 1 where speculation paid
    relative: DecayedRate = field(default_factory=DecayedRate)
    plain: DecayedRate = field(default_factory=DecayedRate)
    plain_recent: float = 0.0      # tokens / ms of the last few plain steps (0: none yet)
    unpaired: int = 0              # speculative steps seen before any plain step to pair them with
    steps: int = 0                 # planned steps in this class (for probe timing)
    backed_off: bool = False


@dataclass(frozen=True)
class GuardSettings:
    margin: float = 0.0            # hold off once speculative steps measure below plain ones ...
    resume_margin: float = 0.03    # ... and resume only once they measure this much above: in the
                                   # band between, noise would flip it every few steps
    decay: float = 0.99            # plain record, per step of the class: ~100 steps of memory
    speculative_memory_rows: float = 256.0   # speculative record: ~this many row-steps of memory
    min_steps: float = 2.0         # decayed steps of each kind needed before judging
    probe_every: int = 16          # while held off, one step in this many may speculate ...
    probe_budget: float = PROBE_BUDGET   # ... or fewer, so that probes cost at most this share of step
                                         # time (the goodput policy's own probes keep the same budget)
    refresh_below: float = 2.0     # a plain record decayed below this many steps gets a plain step
                                   # (~1 step in 40 where every step would speculate)
    plain_reference_weight: float = 0.3   # a plain step's weight in the rate speculative steps are
                                          # paired with (~the last 3 plain steps)


class GoodputGuard:
    """Caps the k of `goodput` plans where measured speculative steps lost to plain steps."""

    def __init__(self, settings: GuardSettings = GuardSettings(), metrics=None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.classes: dict[int, ClassRecord] = {}
        self.held_steps = 0        # steps whose k the guard capped at 0
        # Whether the last plan was under the checked policy: the guard keeps measuring under any
        # policy (a swap back finds its records current), but only says "held off" where it holds.
        self.checking = True

    def cap_for(self, policy_name: str, batch_size: int, max_k: int) -> int:
        """The largest k the next step of this batch size may plan under `policy_name`."""
        checking = policy_name == CHECKED_POLICY
        if checking and not self.checking and self.metrics is not None:
            for cls, record in self.classes.items():   # what held while another policy planned
                self.metrics.set_backed_off(str(2**cls), record.backed_off)
        self.checking = checking
        return self.allowed_k(batch_size, max_k) if checking else max_k

    def allowed_k(self, batch_size: int, max_k: int) -> int:
        """The largest k the next step of this batch size may plan (under the checked policy)."""
        record = self.classes.setdefault(batch_class(batch_size), ClassRecord())
        record.steps += 1
        s = self.settings
        if record.backed_off and record.steps % self.probe_interval(record) != 0:
            self.held_steps += 1
            return 0
        speculated = max(record.speculative.steps, record.unpaired)
        if speculated >= s.min_steps and record.plain.steps < s.refresh_below:
            return 0               # refresh the plain measurement this class compares against
        return max_k

    def held_off(self, batch_size: int) -> bool:
        """Whether speculation is held off at this batch size: a step allowed to speculate there is
        one of the guard's probes."""
        record = self.classes.get(batch_class(batch_size))
        return record is not None and record.backed_off

    def observe(self, facts: StepFacts) -> None:
        """Fold a step in if it was all decode and either verified proposals or planned none."""
        rows = facts.requests
        if not rows or facts.total_ms <= 0 or any(r.prefill_tokens > 0 for r in rows):
            return
        if any(r.proposer_kind in PRICED_KINDS for r in rows):
            return
        speculative = any(r.proposed_tokens > 0 for r in rows)
        plain = all(r.requested_tokens == 0 for r in rows)
        if not (speculative or plain):
            return
        cls = batch_class(len(rows))
        record = self.classes.setdefault(cls, ClassRecord())
        record.plain.decay(self.settings.decay)
        if speculative or record.backed_off:
            factor = self.speculative_decay(len(rows))
            record.speculative.decay(factor)
            record.relative.decay(factor)
        tokens = float(sum(r.accepted_tokens + 1 for r in rows))   # each row's accepted + its own token
        if not speculative:
            record.plain.add(tokens, facts.total_ms)
            record.plain_recent = plain_reference(record.plain_recent, tokens / facts.total_ms,
                                                  self.settings.plain_reference_weight)
            record.unpaired = 0    # from here on every speculative step is paired
        elif record.plain_recent > 0:
            record.speculative.add(tokens, facts.total_ms)
            record.relative.add(tokens, facts.total_ms * record.plain_recent)
        else:
            record.unpaired += 1
        self._judge(cls, record)

    def probe_interval(self, record: ClassRecord) -> int:
        """Steps between probes while held off: probe_every, stretched so that probes cost at most
        `probe_budget` of step time on average, by the measured cost of a speculative step over a
        plain one (a draft model at batch 12 on the reference CPU: ~9x, so a probe every 16 steps
        would have cost +50%)."""
        s = self.settings
        spec, plain = record.speculative, record.plain
        if spec.steps <= 0 or plain.steps <= 0 or plain.ms <= 0:
            return s.probe_every
        extra = (spec.ms / spec.steps) / (plain.ms / plain.steps) - 1.0
        return probe_interval_for(extra, s.probe_every, s.probe_budget)

    def speculative_decay(self, rows: int) -> float:
        """Per speculative step: forget faster the more rows one step measured."""
        s = self.settings
        return min(s.decay, math.exp(-rows / s.speculative_memory_rows))

    def _judge(self, cls: int, record: ClassRecord) -> None:
        s = self.settings
        # Held off, the speculative record is the last few probes (it forgets while plain steps
        # run): one fresh probe is enough to judge on, or a decayed record could never resume.
        needed = 1.0 if record.backed_off else s.min_steps
        if record.relative.steps < needed or record.plain.steps < s.min_steps:
            return
        relative = record.relative.rate()   # speculative tokens per token plain steps made in that time
        if record.backed_off:
            losing = relative <= 1.0 + s.resume_margin
        else:
            losing = relative < 1.0 - s.margin
        if losing != record.backed_off:
            record.backed_off = losing
            low, high = 2**cls, 2 ** (cls + 1) - 1
            log.log(logging.WARNING if self.checking else logging.DEBUG,
                    "goodput guard: speculation %s at batch %d-%d: speculative steps made %.3fx the tokens "
                    "of plain steps of the moment (%.4f tok/ms; plain lately %.4f)",
                    ("held off" if losing else "resumed") if self.checking else
                    ("would be held off" if losing else "would resume"),
                    low, high, relative, record.speculative.rate(), record.plain_recent)
            if self.metrics is not None and self.checking:
                self.metrics.set_backed_off(str(2**cls), losing)
            if losing:
                self._distrust_older_records(cls)

    def _distrust_older_records(self, losing_cls: int) -> None:
        """Speculation just stopped paying in one class: the workload has likely changed. Every
        other class still speculating measured its record before now (a burst's tail, as its batch
        shrinks into a class last measured on earlier work, would trust it until it decays): it
        forgets that record and measures again, a few steps. Held-off classes keep theirs."""
        for cls, record in self.classes.items():
            if cls != losing_cls and not record.backed_off:
                record.speculative = DecayedRate()
                record.relative = DecayedRate()

    def backed_off_classes(self) -> list[int]:
        return sorted(cls for cls, record in self.classes.items() if record.backed_off)

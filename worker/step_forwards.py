"""The model work of one engine step: draft, verify every decoding row in ONE target forward, prefill.

- `propose`: one batched `Proposer.propose` for the rows with k > 0;
- `verify`: one target forward over every decoding row's [last token, proposals...] (right-padded,
  packed logits), then greedy or rejection verification of all rows in one pass;
- `prefill`: one forward over prompt chunks of similar length; a row whose prompt is now in draws
  its first token from the prediction at the prompt's last position.

Each appends the verified tokens through the `RequestLifecycle` (which may finish the request)
and returns the rows' `RequestFacts` for the step's report. Loop thread only.
"""

from __future__ import annotations

from typing import Any

import torch

from smartspec.worker.model.llama import LogitsRows
from smartspec.worker.proposers import Proposal, ProposalRequest, Proposer, RowVerification
from smartspec.worker.proposers.device_copy import to_device_without_sync
from smartspec.worker.proposers.verify import verify_packed

from .lifecycle import RequestLifecycle
from .running import RunningRequest
from .steps import RequestFacts


class StepForwards:
    def __init__(self, *, module: Any, cache: Any, proposer: Proposer, lifecycle: RequestLifecycle,
                 max_k: int) -> None:
        self._module = module            # smartspec.worker.model LlamaForCausal
        self._cache = cache              # its KVCache
        self._device = module.device
        self._proposer = proposer
        self._lifecycle = lifecycle
        self._max_k = max_k

    def propose(self, decoding: list[RunningRequest], ks: dict[str, int]) -> dict[str, Proposal]:
        """Every decoding row's proposals (empty where k = 0), checked against the k asked."""
        asks = [
            ProposalRequest(seq_id=s.request_id, token_ids=list(s.tokens), k=ks[s.request_id], sampling=s.sampling,
                            generator=s.generator)
            for s in decoding
            if ks[s.request_id] > 0
        ]
        answers = self._proposer.propose(asks) if asks else []
        proposals = {s.request_id: Proposal([]) for s in decoding}
        for ask, answer in zip(asks, answers):
            if len(answer.tokens) > ask.k:
                raise RuntimeError(f"proposer returned {len(answer.tokens)} tokens for k = {ask.k}")
            proposals[ask.seq_id] = answer
        return proposals

    def verify(self, decoding: list[RunningRequest], ks: dict[str, int],
               proposals: dict[str, Proposal]) -> list[RequestFacts]:
        rows = sorted(decoding, key=lambda s: s.slot)   # consecutive slots let the cache read a slice
        row_tokens = [[s.tokens[-1]] + proposals[s.request_id].tokens for s in rows]
        width = max(len(t) for t in row_tokens)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)                  # [B, S] right-padded
        for i, tokens in enumerate(row_tokens):
            input_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        logits = self._module.forward_step(
            self._cache,
            input_ids.to(self._device),
            slots=torch.tensor([s.slot for s in rows], dtype=torch.long),              # [B]
            start_positions=torch.tensor([s.cached for s in rows], dtype=torch.long),  # [B]
            query_lengths=torch.tensor([len(t) for t in row_tokens], dtype=torch.long),  # [B]
            logits_rows=LogitsRows.PACKED,   # only real tokens reach the lm_head: no row pays for the widest k
        )                                                                               # logits: [N, V]
        # Every row at once, straight from the packed logits: one host sync for the whole step.
        verdicts = verify_packed(
            logits,
            [proposals[s.request_id] for s in rows],
            [s.sampling for s in rows],
            [s.generator for s in rows],
        )
        facts = []
        for seq, verdict in zip(rows, verdicts):
            k, proposed = ks[seq.request_id], len(proposals[seq.request_id].tokens)
            # K/V now valid for the last token and the accepted proposals; the rest is rolled back.
            seq.cached += 1 + verdict.num_accepted
            seq.stats.observe(k=k, proposed=proposed, accepted=verdict.num_accepted)
            proposer_kind = self._proposer.member_kind(seq.request_id) if proposed > 0 else None
            if k > 0:
                self._proposer.observe_verification(seq.request_id, proposed, verdict.num_accepted,
                                                    verdict.tested_positions)
            finished = self._lifecycle.append(seq, verdict.tokens)
            facts.append(RequestFacts.decoded(
                seq.request_id, requested=k, proposed=proposed, accepted=verdict.num_accepted,
                tested=verdict.tested_positions, context_tokens=seq.context_tokens, finished=finished,
                proposer_kind=proposer_kind, **self._lookahead(seq, finished),
            ))
        return facts

    def prefill(self, work: list[tuple[RunningRequest, int]]) -> list[RequestFacts]:
        """One forward over prompt chunks of similar length (right-padded, one row each)."""
        width = max(chunk for _, chunk in work)
        input_ids = torch.zeros((len(work), width), dtype=torch.long)                   # [B, C] right-padded
        for row, (seq, chunk) in enumerate(work):
            prompt = seq.request.prompt_ids
            input_ids[row, :chunk] = torch.tensor(prompt[seq.cached : seq.cached + chunk], dtype=torch.long)
        logits = self._module.forward_step(
            self._cache,
            input_ids.to(self._device),
            slots=torch.tensor([seq.slot for seq, _ in work], dtype=torch.long),             # [B]
            start_positions=torch.tensor([seq.cached for seq, _ in work], dtype=torch.long),  # [B]
            query_lengths=torch.tensor([chunk for _, chunk in work], dtype=torch.long),       # [B]
            logits_rows=LogitsRows.LAST,
        )                                                                               # logits: [B, 1, V]
        for seq, chunk in work:
            seq.cached += chunk
        verdicts = self._first_tokens([seq for seq, _ in work], logits[:, 0])
        facts = []
        for row, (seq, chunk) in enumerate(work):
            finished = self._lifecycle.append(seq, verdicts[row].tokens) if row in verdicts else False
            facts.append(RequestFacts.prefilled(
                seq.request_id, chunk=chunk, context_tokens=seq.context_tokens, finished=finished,
                **self._lookahead(seq, finished),
            ))
        return facts

    def _first_tokens(self, rows: list[RunningRequest], last_logits: torch.Tensor) -> dict[int, RowVerification]:
        """The first token of every row whose prompt is now in (by row index), from the target's
        prediction at the prompt's last position (last_logits: [B, V]): one verify_packed call with
        n = 0 proposals each. Rows still prefilling draw nothing, so a seeded request's draws do not
        depend on how its prompt was chunked."""
        done = [row for row, seq in enumerate(rows) if not seq.prefilling]
        if not done:
            return {}
        if len(done) < len(rows):
            index = to_device_without_sync(torch.tensor(done, dtype=torch.long), last_logits.device)
            last_logits = last_logits.index_select(0, index)                            # [len(done), V]
        verdicts = verify_packed(
            last_logits,
            [Proposal([]) for _ in done],
            [rows[row].sampling for row in done],
            [rows[row].generator for row in done],
        )
        return dict(zip(done, verdicts))

    def _lookahead(self, seq: RunningRequest, finished: bool) -> dict[str, int | None]:
        """When it decodes next step: what the proposer says it can offer it and the class of that
        offer (None: cannot tell), as RequestFacts keywords."""
        if finished or seq.prefilling:
            return {"proposable": None, "proposal_class": None}
        proposable = self._proposer.lookahead(seq.request_id, seq.tokens, self._max_k)
        return {"proposable": proposable, "proposal_class": self._proposer.proposal_class(seq.request_id)}

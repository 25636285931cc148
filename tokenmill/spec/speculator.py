"""The engine's side of speculative decoding: propose before a step, learn after it.

Before each step `propose` gives every running sequence that decodes a draft (possibly empty)
in `seq.draft_token_ids`: up to the controller's k for it, never past max_tokens or the context.
The scheduler fits what it can into the step (drafts never preempt anyone), the runner
verifies, and the engine times the step (`record_step`, for the controller's cost model) and
hands over what each sequence got (`update`: verifications, plain decodes, finished sequences).
`NoSpeculation` is the same interface doing nothing, so that the engine's step has no branches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tokenmill.sequence import Sequence
from tokenmill.step_plan import ScheduledChunk, SequenceUpdate, StepResult
from tokenmill.spec.config import SpeculativeConfig
from tokenmill.spec.controller import SpecController
from tokenmill.spec.draft_model import DraftModel
from tokenmill.spec.ngram import propose_ngram


@dataclass
class SpecStats:
    """Since start: draft tokens verified, and how many the target kept."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0  # sequence-steps that verified at least one draft

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Drafts kept per verification (the step also emits one more token of its own)."""
        return self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int, max_num_batched_tokens: int,
                 draft: DraftModel | None = None):
        self.config = config
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.draft = draft
        self.controller = SpecController(config.num_speculative_tokens, config.adaptive,
                                         draft.cost if draft is not None else None)
        self.stats = SpecStats()
        self.draft_probs: dict[int, torch.Tensor] = {}  # this step's proposal distributions, by seq_id
        self.propose_seconds = 0.0  # what this step's proposing took

    def _cap(self, seq: Sequence) -> int:
        """Most drafts worth verifying: the step emits drafts + 1 tokens, within max_tokens and the context.
        A sequence held to a grammar does not draft (its mask is computed for one next token only)."""
        if seq.grammar is not None:
            return 0
        room = self.max_model_len - seq.num_tokens
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens)
        return max(0, min(self.config.num_speculative_tokens, room - 1))

    def propose(self, running: list[Sequence]) -> None:
        started = time.perf_counter()
        self.propose_seconds = 0.0
        self.draft_probs = {}
        for seq in running:
            seq.draft_token_ids = []
        decoding = [s for s in running if s.num_uncomputed_tokens == 1 and self._cap(s) > 0]
        if not decoding:
            return
        c = self.config
        if self.draft is None:
            proposals = {s.seq_id: propose_ngram(s.token_ids, self._cap(s), c.prompt_lookup_max, c.prompt_lookup_min)
                         for s in decoding}
            caps = {sid: len(p) for sid, p in proposals.items() if p}
        else:
            caps = {s.seq_id: self._cap(s) for s in decoding}
        step_tokens = min(sum(s.num_uncomputed_tokens for s in running), self.max_num_batched_tokens)
        ks = self.controller.choose(caps, step_tokens, len(decoding))
        by_id = {s.seq_id: s for s in decoding}
        if self.draft is None:
            for sid, proposal in proposals.items():
                if ks.get(sid):
                    by_id[sid].draft_token_ids = proposal[:ks[sid]]
                elif proposal:
                    self.controller.shadow(sid, proposal[0])  # checked against the token it gets instead
        elif ks:
            drafts, self.draft_probs = self.draft.propose({by_id[sid]: k for sid, k in ks.items()})
            for sid, tokens in drafts.items():
                by_id[sid].draft_token_ids = tokens
        self.propose_seconds = time.perf_counter() - started

    def record_step(self, chunks: list[ScheduledChunk], seconds: float, result: StepResult | None) -> None:
        """A step ran `chunks` in `seconds` and gave `result`."""
        if not chunks:
            return
        emitted = sum(result.counts)
        self.controller.target_cost.observe(sum(c.num_tokens for c in chunks), seconds)
        drafted = any(c.draft for c in chunks)
        steady = not drafted or self.draft is None or self.draft.steady  # a catch-up prefill is no typical step
        if steady and all(c.sample and c.num_known == 1 for c in chunks):  # a pure decode step: comparable rates
            self.controller.realized(len(chunks), drafted, emitted / (seconds + self.propose_seconds))

    def update(self, updates: list[SequenceUpdate]) -> None:
        """Learn from each verification (`proposed` drafts, `accepted` kept) and each plain decode;
        bring the draft cache of a sequence that moved back in line with its tokens; forget finished ones."""
        for u in updates:
            if u.proposed:
                self.stats.draft_tokens += u.proposed
                self.stats.accepted_tokens += u.accepted
                self.stats.verify_steps += 1
                self.controller.observe(u.seq.seq_id, u.proposed, u.accepted)
            else:
                self.controller.observe_token(u.seq.seq_id, u.tokens[0])
            if u.seq.is_finished:
                self.release(u.seq)
            elif self.draft is not None:
                self.draft.sync(u.seq)

    def release(self, seq: Sequence) -> None:
        """A sequence finished or was aborted."""
        self.controller.forget(seq.seq_id)
        if self.draft is not None:
            self.draft.release(seq)


class NoSpeculation:
    """What the engine holds when speculative decoding is off: proposes nothing, learns nothing."""

    draft_probs: dict[int, torch.Tensor] = {}
    stats = None

    def propose(self, running: list[Sequence]) -> None:
        pass

    def record_step(self, chunks: list[ScheduledChunk], seconds: float, result: StepResult | None) -> None:
        pass

    def update(self, updates: list[SequenceUpdate]) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        pass

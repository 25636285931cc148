"""A draft model: a smaller model with the target's vocabulary that proposes tokens autoregressively.

It has its own weights, its own runner and its own paged KV cache (a block pool of its own,
sized like the target's). For each sequence it remembers the tokens whose KV its cache holds;
before proposing, that list is cut back to the longest prefix the sequence still agrees with
(rejected drafts are discarded, their blocks given back) and the tokens since are fed in one
chunk (the whole prompt the first time), then one token per further draft. The engine's
builder makes its runner (engine/builder.py: `build_draft`), keeping only the `draft_layers`
when they are given: a truncated copy of the target (or of any model) needs no second file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from tokenmill.executor.runner import ModelRunner
from tokenmill.executor.sampler import target_probs
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.kv_cache_manager import KVCacheManager
from tokenmill.sequence import Sequence
from tokenmill.spec.controller import StepCost

CATCH_UP_TOKENS = 4  # per sequence: a propose that feeds more is a prefill, left out of the cost


@dataclass(eq=False)
class _DraftState:
    """One sequence in the draft cache (its blocks are the KV manager's, under the same seq_id)."""

    seq_id: int
    fed: list[int] = field(default_factory=list)  # tokens whose K/V the draft cache holds, in order

    @property
    def num_computed_tokens(self) -> int:
        return len(self.fed)


class DraftModel:
    """The draft's side of speculation, given a ready runner (the engine's builder loads the checkpoint,
    keeps `draft_layers` and makes the runner, as for the target) with a KV pool of `num_blocks` blocks."""

    def __init__(self, runner: ModelRunner, name: str, num_blocks: int, block_size: int):
        self.runner = runner
        self.name = name
        self.kv = KVCacheManager(BlockPool(num_blocks), block_size, enable_prefix_caching=False)
        self._states: dict[int, _DraftState] = {}
        # seconds per drafted token (catch-up feeds and every draft round included) by sequences drafting
        self.cost = StepCost(unmeasured=0.0)
        self.steady = True  # the last propose fed only what the last verification left: a typical draft step

    @torch.inference_mode()
    def propose(self, ks: dict[Sequence, int]) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
        """Draft ks[seq] tokens for each sequence; returns the tokens and, for sampling sequences, the
        distributions they were drawn from ([k, vocab], by seq_id). A sequence the draft cache has no
        room for gets no draft."""
        started = time.perf_counter()
        pending: dict[Sequence, list[int]] = {}  # tokens to feed next, per sequence still drafting
        for seq, k in ks.items():
            state = self.sync(seq)
            if state.num_computed_tokens == seq.num_tokens:  # the last token is fed: feed it again for logits
                self._cut(state, seq.num_tokens - 1)
            pending[seq] = seq.token_ids[state.num_computed_tokens:]
        catch_up = sum(len(tokens) for tokens in pending.values())
        drafts: dict[int, list[int]] = {seq.seq_id: [] for seq in ks}
        probs: dict[int, list[torch.Tensor]] = {seq.seq_id: [] for seq in ks if not seq.params.greedy}
        while pending:
            for seq in [s for s, tokens in pending.items() if not self._room(s, len(tokens))]:
                self.release(seq)  # no room: this sequence proposes nothing this step
                drafts[seq.seq_id] = []
                probs.pop(seq.seq_id, None)
                del pending[seq]
            if not pending:
                break
            seqs = list(pending)
            states = [self._states[s.seq_id] for s in seqs]
            hidden = self.runner.forward([(pending[s], st.num_computed_tokens, self.kv.block_table(st.seq_id))
                                          for s, st in zip(seqs, states)])
            ends = torch.tensor([end - 1 for end in accumulate(len(pending[s]) for s in seqs)], device=hidden.device)
            logits = self.runner.model.compute_logits(hidden[ends]).float()
            tokens = self._draw(logits, seqs, probs)
            for seq, state, token in zip(seqs, states, tokens):
                state.fed += pending[seq]
                drafts[seq.seq_id].append(token)
                if len(drafts[seq.seq_id]) < ks[seq]:
                    pending[seq] = [token]
                else:
                    del pending[seq]
        drafted = sum(len(d) for d in drafts.values())
        self.steady = catch_up <= CATCH_UP_TOKENS * len(ks)  # a prompt's (or a long pause's) first feed is not
        if drafted and self.steady:                           # the cost of drafting
            self.cost.observe(len(ks), (time.perf_counter() - started) / drafted)
        return drafts, {sid: torch.stack(rows) for sid, rows in probs.items() if rows}

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], probs: dict[int, list[torch.Tensor]]) -> list[int]:
        """The next draft token of each row: the argmax for greedy sequences, else a draw from the draft's
        distribution under the request's temperature and filters (kept for the rejection test)."""
        tokens = logits.argmax(-1)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:  # a seeded request's drafts come from its own generator: reproducible with the seed
            q = target_probs(logits[sampled], [seqs[i].params for i in sampled])
            tokens[sampled] = self.runner.sampler.race(q, [seqs[i].generator for i in sampled])
            for i, row in zip(sampled, q):
                probs[seqs[i].seq_id].append(row)
        return tokens.tolist()

    def _room(self, seq: Sequence, num_new: int) -> bool:
        state = self._states[seq.seq_id]
        return self.kv.grow(state.seq_id, state.num_computed_tokens, state.num_computed_tokens + num_new)

    def sync(self, seq: Sequence) -> _DraftState:
        """Cut the draft cache of `seq` back to the prefix it shares with the sequence's tokens."""
        state = self._states.get(seq.seq_id)
        if state is None:
            state = self._states[seq.seq_id] = _DraftState(seq.seq_id)
        common = 0
        for fed, token in zip(state.fed, seq.token_ids):
            if fed != token:
                break
            common += 1
        if common < state.num_computed_tokens:
            self._cut(state, common)
        return state

    def _cut(self, state: _DraftState, length: int) -> None:
        del state.fed[length:]
        self.kv.trim(state.seq_id, length)

    def release(self, seq: Sequence) -> None:
        """Free the draft cache of a sequence that finished, was aborted, or found no room."""
        state = self._states.pop(seq.seq_id, None)
        if state is not None:
            self.kv.free(state.seq_id)

    @property
    def num_used_blocks(self) -> int:
        return self.kv.pool.num_used_blocks

    def cached_tokens(self) -> dict[int, int]:
        """Tokens in the draft cache per seq_id."""
        return {sid: state.num_computed_tokens for sid, state in self._states.items()}


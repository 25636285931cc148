"""The scheduler: which sequences run this step, and how many tokens each computes.

Plain Python over plain data (never a tensor). Every step has a token budget
(max_num_batched_tokens) shared by decodes (1 token each) and prefill chunks; running
sequences are served first, in policy order, then waiting ones are admitted while budget,
seats (max_num_seqs) and KV blocks last; an admitted sequence starts after its longest
cached prefix (kv/kv_cache_manager.py owns the blocks). When a running sequence needs a
block and none is free, the policy's last running sequence is preempted: its blocks are
freed and it goes back to waiting, to be recomputed from its tokens later (so no output is
lost or changed). Only the waiting sequences the policy lets start now (`startable`) are
admitted. Under a preemptive policy (priority, aging, sjf), the best of them first takes the
seat and blocks of running ones it outranks, worst first, so it starts in this very step.
The other n - 1 sequences of an n > 1 request wait for the first one's prompt: they join
the step that computes its last token, share its blocks and sample from its logits, so the
prompt is computed once.
"""

from __future__ import annotations

from tokenmill.engine.policy import Policy
from tokenmill.kv.kv_cache_manager import KVCacheManager, PrefixHit
from tokenmill.sequence import Sequence, SequenceStatus
from tokenmill.step_plan import ScheduledChunk, SchedulerOutput, SequenceUpdate, StepResult


class Scheduler:
    def __init__(self, kv: KVCacheManager, policy: Policy, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: list[int] | None = None, max_model_len: int | None = None):
        self.kv = kv
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = list(eos_token_ids or ())
        self.max_model_len = max_model_len
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._forks: dict[int, list[Sequence]] = {}  # seq_id -> siblings waiting for its prompt

    def add(self, seq: Sequence, forks: list[Sequence] | None = None) -> None:
        """Queue `seq`; `forks` (same prompt) join it in the step that computes its last prompt token."""
        for s in (seq, *(forks or ())):
            self.policy.on_add(s)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        if forks:
            self._forks[seq.seq_id] = list(forks)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._forks.pop(seq.seq_id, None)  # an aborted request's unforked siblings are finished by the engine
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.FINISHED
        self.policy.on_finish(seq)

    def update_from_output(self, plan: SchedulerOutput, result: StepResult) -> list[SequenceUpdate]:
        """The bookkeeping after the step ran `plan.chunks` (the chunks that ran): computed tokens
        counted and full blocks cached; each sampled sequence's tokens appended up to the first stop
        token or length limit, which ends it; after a verification, the accepted drafts counted and
        the blocks of rejected ones given back. Returns what each sampled sequence got."""
        for chunk in plan.chunks:
            if not chunk.draft:  # a verified chunk's computed tokens are known once the sampler decided
                chunk.seq.num_computed_tokens += chunk.num_tokens
                self.kv.cache_full_blocks(chunk.seq)
        updates = []
        row = 0
        for chunk, count in zip(result.sampled, result.counts):
            seq = chunk.seq
            tokens = self._append(seq, result.samples.token_ids[row:row + count])
            if chunk.draft and not seq.is_finished:
                seq.num_computed_tokens += chunk.num_known + count - 1
                self.kv.trim(seq.seq_id, seq.num_computed_tokens)
                self.kv.cache_full_blocks(seq)
            updates.append(SequenceUpdate(seq, row, tokens, len(chunk.draft), count - 1 if chunk.draft else 0))
            row += count
        return updates

    def _append(self, seq: Sequence, tokens: list[int]) -> list[int]:
        """Append `tokens` up to the first that ends `seq` (then finished); return those appended."""
        params = seq.params
        for i, token in enumerate(tokens):
            seq.token_ids.append(token)
            if not params.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", None
            elif token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) \
                    or (self.max_model_len is not None and seq.num_tokens >= self.max_model_len):
                seq.finish_reason = "length"
            else:
                continue
            self.finish(seq)
            return tokens[:i + 1]
        return tokens

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        reserved = self._make_room_for_the_best_waiting(out) if self.policy.preemptive else 0
        budget, short_of_blocks = self._serve_running(out, self.max_num_batched_tokens - reserved)
        if not short_of_blocks:
            self._admit(out, budget + reserved)
        out.copies = self.kv.take_copies()
        self.policy.on_scheduled(out.chunks)
        return out

    def _make_room_for_the_best_waiting(self, out: SchedulerOutput) -> int:
        """Preempt running sequences the best waiting one outranks, worst first, until it fits;
        return the tokens of its first chunk, which the running ones must leave in the budget."""
        startable = self._startable()
        if not startable:
            return 0
        seq = self.policy.next_to_admit(startable)
        victims = [v for v in reversed(self.policy.preemption_order(self.running)) if self.policy.outranks(seq, v)]
        hit = self.kv.lookup(seq)  # preempting adds no cached blocks, so one lookup serves every round
        while True:
            first_chunk = self._first_chunk(seq, hit)
            if self._fits(seq, hit, first_chunk):
                return first_chunk
            if not victims:
                return 0
            victim = victims.pop(0)
            self._preempt(victim)
            self.running.remove(victim)
            out.preempted.append(victim)

    def _first_chunk(self, seq: Sequence, hit: PrefixHit) -> int:
        """The tokens `seq` would compute if admitted now on `hit`, leaving every running sequence one."""
        return max(1, min(seq.num_tokens - hit.num_tokens,
                          self.max_num_batched_tokens - len(self.running)))

    def _fits(self, seq: Sequence, hit: PrefixHit, first_chunk: int) -> bool:
        """A seat, and the blocks for `seq`'s first chunk after the running sequences' chunks this step."""
        if len(self.running) + 1 + len(self._forks.get(seq.seq_id, ())) > self.max_num_seqs:
            return False
        needed = self.kv.blocks_to_admit(hit, hit.num_tokens + first_chunk)
        budget = self.max_num_batched_tokens - first_chunk
        for r in self.policy.preemption_order(self.running):  # as _serve_running will serve them
            num = min(r.num_uncomputed_tokens, budget)
            needed += self.kv.blocks_to_grow(r.seq_id, r.num_computed_tokens, r.num_computed_tokens + num)
            budget -= num
        return needed <= self.kv.pool.num_free_blocks

    def _serve_running(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        """Serve running sequences in policy order, preempting from the tail when blocks run out;
        return the budget left and whether blocks ran out."""
        queue = self.policy.preemption_order(self.running)
        served: list[Sequence] = []
        short_of_blocks = False
        while queue and budget > 0:
            seq = queue.pop(0)
            num = min(seq.num_uncomputed_tokens, budget)
            draft = self._fit_draft(seq, budget)
            while not self.kv.grow(seq.seq_id, seq.num_computed_tokens, seq.num_computed_tokens + num):
                short_of_blocks = True
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                served += self._add_chunk(out, seq, num, self.max_num_seqs - len(served) - len(queue) - 1, draft)
                budget -= num + len(draft)
        # Sequences left in the queue (budget ran out) keep running; they just skip this step.
        self.running = served + queue
        return budget, short_of_blocks

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """Admit waiting sequences, each starting after its cached prefix, while budget, seats and blocks last."""
        startable = self._startable()
        while startable and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.policy.next_to_admit(startable)
            hit = self.kv.lookup(seq)
            num = min(seq.num_tokens - hit.num_tokens, budget)
            if not self.kv.allocate(seq, hit, hit.num_tokens + num):
                break
            seq.num_computed_tokens = hit.num_tokens
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = hit.num_tokens
            startable.remove(seq)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running += self._add_chunk(out, seq, num, self.max_num_seqs - len(self.running) - 1)
            budget -= num

    def _startable(self) -> list[Sequence]:
        """The waiting sequences the policy lets start this step."""
        return self.policy.startable(self.waiting, self.running)

    def _fit_draft(self, seq: Sequence, budget: int) -> list[int]:
        """The draft tokens proposed for a decoding `seq` that fit in the budget and the free blocks
        (taken out of the sequence: a proposal is for one step). Drafts never cause a preemption."""
        draft, seq.draft_token_ids = seq.draft_token_ids, []
        if seq.num_uncomputed_tokens != 1:
            return []
        draft = draft[:budget - 1]
        if draft and not self.kv.grow(seq.seq_id, seq.num_computed_tokens, seq.num_computed_tokens + 1 + len(draft)):
            return []
        return draft

    def _add_chunk(self, out: SchedulerOutput, seq: Sequence, num: int, free_seats: int,
                   draft: list[int] | None = None) -> list[Sequence]:
        """Schedule `num` tokens of `seq` (and its drafts); return it and the siblings forked onto its
        last prompt token."""
        chunk = ScheduledChunk(seq, seq.num_computed_tokens, num + len(draft or ()), self.kv.block_table(seq.seq_id),
                               list(draft or ()))
        out.chunks.append(chunk)
        joined = [seq]
        forks = self._forks.pop(seq.seq_id, []) if chunk.sample else []
        for child in forks:
            if len(joined) > free_seats:
                child.status = SequenceStatus.WAITING  # no seat: it prefills on its own later (from the prefix cache)
                self.waiting.append(child)
                continue
            self.kv.fork(seq.seq_id, child.seq_id)
            child.num_computed_tokens = chunk.start + num
            child.status = SequenceStatus.RUNNING
            out.chunks.append(ScheduledChunk(child, child.num_computed_tokens, 0, self.kv.block_table(child.seq_id)))
            joined.append(child)
        return joined

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

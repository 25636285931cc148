"""The scheduler: which sequences run this step, and how many tokens each computes.

Plain Python over plain data (never a tensor). Every step has a token budget
(max_num_batched_tokens) shared by decodes (1 token each) and prefill chunks; running
sequences are served first, in policy order, then waiting ones are admitted while budget,
seats (max_num_seqs) and KV blocks last. When a running sequence needs a block and none is
free, the policy's last running sequence is preempted: its blocks are freed and it goes
back to waiting, to be recomputed from its tokens later (so no output is lost or changed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.policy import Policy
from tokenmill.kv.block_pool import BlockPool
from tokenmill.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """Compute tokens seq.token_ids[start:start + num_tokens]; sample after them if `sample`."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool = field(init=False)  # fixed at scheduling time: the chunk reaches the last known token

    def __post_init__(self) -> None:
        self.sample = self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, block_pool: BlockPool, block_size: int, policy: Policy,
                 max_num_seqs: int, max_num_batched_tokens: int):
        self.block_pool = block_pool
        self.block_size = block_size
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free_blocks(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Serve running sequences in policy order; preemption victims come from the tail.
        queue = self.policy.preemption_order(self.running)
        served: list[Sequence] = []
        while queue and budget > 0:
            seq = queue.pop(0)
            num = min(seq.num_uncomputed_tokens, budget)
            while not self._grow(seq, seq.num_computed_tokens + num):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
                served.append(seq)
                budget -= num
        # Sequences left in the queue (budget ran out) keep running; they just skip this step.
        self.running = served + queue
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.policy.next_to_admit(self.waiting)
            num = min(seq.num_uncomputed_tokens, budget)
            if not self._grow(seq, seq.num_computed_tokens + num):
                break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
            budget -= num
        return out

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` enough blocks to hold `num_tokens` tokens; False if the pool is short."""
        needed = -(-num_tokens // self.block_size) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.block_pool.num_free_blocks:
            return False
        seq.block_table.extend(self.block_pool.allocate(needed))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._free_blocks(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def _free_blocks(self, seq: Sequence) -> None:
        self.block_pool.free(seq.block_table)
        seq.block_table = []

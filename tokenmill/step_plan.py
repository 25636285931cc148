"""One engine step's plan and what running it gave back: the contract between scheduler and runner.

The scheduler writes a `SchedulerOutput` (which sequences compute which tokens, in which KV
blocks); the runner reads it and returns a `StepResult`; the scheduler turns that into one
`SequenceUpdate` per sampled sequence, which the output processor reads. Each side imports this
module, none imports another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.sequence import Sequence


@dataclass
class ScheduledChunk:
    """Compute tokens seq.token_ids[start:start + num_known] then `draft`; sample after them if `sample`.

    num_tokens counts both (what the step computes); draft tokens, proposed by speculative
    decoding, are verified: the sampler keeps a prefix of them. A fork's chunk has no tokens:
    it comes right after its parent's last prompt chunk and samples from that chunk's last row.
    `block_table` is the sequence's KV blocks as the KV manager holds them for this step.
    """

    seq: Sequence
    start: int
    num_tokens: int
    block_table: list[int]
    draft: list[int] = field(default_factory=list)
    sample: bool = field(init=False)  # fixed at scheduling time: the chunk reaches the last known token

    def __post_init__(self) -> None:
        self.sample = self.start + self.num_known == self.seq.num_tokens

    @property
    def num_known(self) -> int:
        return self.num_tokens - len(self.draft)

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start:self.start + self.num_known] + self.draft


@dataclass(frozen=True)
class StepShape:
    """The sizes a step's cost depends on (what a step-cost model is fitted to)."""

    num_seqs: int = 0  # sequences computing tokens (a fork's empty chunk not counted)
    num_tokens: int = 0  # tokens computed, drafts included
    num_context_tokens: int = 0  # KV positions the chunks attend to, each chunk's whole context
    num_attention_pairs: float = 0.0  # (query, key) pairs of the multi-token chunks (causal)
    num_kv_blocks: int = 0  # distinct KV blocks the chunks read: a block of a shared prefix counts once

    @classmethod
    def of(cls, chunks: list[ScheduledChunk]) -> "StepShape":
        seqs = tokens = context = 0
        pairs = 0.0
        blocks: set[int] = set()
        for c in chunks:
            if not c.num_tokens:
                continue
            seqs += 1
            tokens += c.num_tokens
            context += c.start + c.num_tokens
            blocks.update(c.block_table)
            if c.num_tokens > 1:
                pairs += c.num_tokens * (c.start + (c.num_tokens + 1) / 2)
        return cls(seqs, tokens, context, pairs, len(blocks))


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # KV blocks to copy (source, destination) first

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def shape(self) -> StepShape:
        return StepShape.of(self.chunks)


@dataclass
class SamplerOutput:
    """One sampled token per row and, when any row asked, logprobs of the raw (unprocessed) logits."""

    token_ids: list[int]
    logprobs: list[float] | None  # the sampled token's logprob per row; None when no row asked
    ranks: list[int] | None  # rank of the sampled token per row, 1 = most likely
    top_logprobs: list[list[tuple[int, float]]] | None  # params.logprobs best (token, logprob) per row


@dataclass
class StepResult:
    sampled: list[ScheduledChunk]  # the chunks that sampled
    samples: SamplerOutput | None  # their emitted tokens, in order: counts[i] rows for sampled[i]
    counts: list[int]  # tokens each sampled chunk emits: 1, or accepted drafts + 1 after a verification
    # (sequence, logprobs of its next prompt tokens) for the sequences that asked for prompt logprobs
    prompt_logprobs: list[tuple[Sequence, SamplerOutput]] = field(default_factory=list)


@dataclass
class SequenceUpdate:
    """What a step gave one sampled sequence: the tokens appended (rows first_row.. of the samples)."""

    seq: Sequence
    first_row: int
    tokens: list[int]
    proposed: int  # draft tokens verified (0: a plain decode)
    accepted: int

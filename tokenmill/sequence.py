"""Sequence: one stream of tokens being generated (a request with n > 1 has n of them)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from tokenmill.outputs import Logprob
from tokenmill.sampling_params import SamplingParams

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n outputs
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    token_ids: list[int] = field(init=False)  # prompt + output
    cache_salt: str | None = None  # part of every prefix-cache key: only equal salts share cached blocks
    priority: int = 0  # lower runs first under the priority and aging policies
    tenant: str = ""  # whose request it is (the `user` field), for the fair policy and per-tenant estimates
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    draft_token_ids: list[int] = field(default_factory=list)  # speculative proposal for the next step only
    num_cached_tokens: int | None = None  # prompt tokens its first admission found in the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    # params.prompt_logprobs (on the first of n only): None for the first prompt token, then one dict per token
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    cumulative_logprob: float = 0.0
    num_preemptions: int = 0
    first_token_time: float | None = None
    text: str = ""  # detokenized output so far (stop strings cut off)
    grammar: object | None = None  # GrammarState, when the output is constrained (structured outputs)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt logprobs are still missing: the prompt runs through the model (no cached prefix has logits)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

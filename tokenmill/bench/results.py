"""What an offline measurement returns: throughput over a prompt set, or batch-1 decode speed.

Both record every run and report the median; `to_dict` is the JSON form `tokenmill bench
throughput` writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from tokenmill.errors import InvalidParameterError


@dataclass
class ThroughputResult:
    backend: str
    num_requests: int
    input_tokens: int
    output_tokens: int
    elapsed_s: float  # median over the runs
    runs_s: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def input_tokens_per_s(self) -> float:
        return self.input_tokens / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.elapsed_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(requests_per_s=self.requests_per_s, input_tokens_per_s=self.input_tokens_per_s,
                 output_tokens_per_s=self.output_tokens_per_s, total_tokens_per_s=self.total_tokens_per_s)
        return d


@dataclass
class DecodeResult:
    """Batch-1 decode speed: tokens after the first, over the time after the first (prefill excluded)."""

    backend: str
    prompt_tokens: int
    new_tokens: int
    decode_tokens_per_s: float  # median over the runs
    runs_tokens_per_s: list[float] = field(default_factory=list)
    ttft_s: float | None = None  # median time to the first token (prefill)

    def to_dict(self) -> dict:
        return asdict(self)


def repeat(fn: Callable[[], float], repeats: int) -> list[float]:
    """`fn()` run `repeats` times: the seconds (or rates) of each run."""
    if repeats < 1:
        raise InvalidParameterError("repeats", f"must be at least 1, got {repeats}")
    return [fn() for _ in range(repeats)]

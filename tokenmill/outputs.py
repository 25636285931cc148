"""What generate() hands back: one RequestOutput per prompt, vLLM-shaped."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token, with its rank in the model's distribution (1 = most likely)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's life, and what it cost; TTFT and E2E follow from them."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # Its share of each step it was in, split by tokens (tokenmill.metering.accounting):
    compute_time: float | None = None  # seconds of step wall time
    energy_joules: float | None = None  # None when metering is off
    energy_meter: str | None = None  # "rapl", "nvml", "rapl+nvml", "estimated(cpu-time)", ...
    energy_estimated: bool | None = None  # True when the meter is a power model, not a counter
    cost_usd: float | None = None  # None unless price_per_hour or energy_price is set
    idealized_time: float | None = None  # seconds at the roofline, no contention; None uncalibrated
    # Speculative decoding: draft tokens verified for it, and how many of them the target kept.
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One of the n sampled continuations of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    # One dict per generated token: token id -> Logprob (the sampled token plus the top-k).
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt and its n outputs so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: None for the first prompt token (nothing precedes it), then per
    # prompt token its Logprob and the top ones', token id -> Logprob, from the raw logits as for outputs
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def energy_per_output_token(self) -> float | None:
        """Joules per generated token (all n samples' tokens); None when metering is off or none yet."""
        tokens = sum(len(o.token_ids) for o in self.outputs)
        energy = self.metrics.energy_joules
        return None if energy is None or not tokens else energy / tokens

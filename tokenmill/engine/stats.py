"""EngineStats: what the engine's state looks like after its latest step, as plain values.

`LLMEngine.stats()` returns the snapshot taken at the end of the latest step (or request
change): a frozen object that the server's thread, /metrics and the benchmarks may read while
the engine thread goes on, instead of reaching into the scheduler, pool, policy or accountant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.policy import EstimatorStats
from tokenmill.kv.kv_cache_manager import PrefixCacheStats
from tokenmill.spec.speculator import SpecStats
from tokenmill.step_plan import StepShape


@dataclass(frozen=True)
class PolicyStats:
    """What a scheduling policy learned or counted (empty for the policies that keep nothing)."""

    name: str
    length_estimator: EstimatorStats | None = None  # sjf: how well it predicted output lengths
    tenant_tokens: dict[str, int] | None = None  # fair: tokens computed per tenant (tenant names: not public)


@dataclass(frozen=True)
class PhaseRoofline:
    fraction: float | None  # roofline time over step time, all steps of the phase so far
    last_fraction: float | None  # of the phase's latest step


@dataclass(frozen=True)
class EngineStats:
    num_requests: int = 0  # unfinished requests
    num_running: int = 0  # sequences in the running batch
    num_waiting: int = 0  # sequences waiting to start or resume
    max_num_seqs: int = 0
    num_preemptions: int = 0  # since start
    kv_total_blocks: int = 0  # the null block excluded
    kv_free_blocks: int = 0
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    spec: SpecStats | None = None  # None: speculative decoding is off
    policy: PolicyStats = field(default_factory=lambda: PolicyStats("fcfs"))
    energy_joules: float = 0.0  # all steps since start
    energy_meter: str | None = None  # None: no meter
    energy_estimated: bool | None = None  # a power model, not a counter
    roofline: dict[str, PhaseRoofline] = field(default_factory=dict)  # by phase; empty when not calibrated
    last_step: StepShape | None = None  # the latest step that computed tokens (None before the first)
    last_step_seconds: float | None = None  # its wall time, scheduling and output processing included

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use (0..1)."""
        return 1 - self.kv_free_blocks / self.kv_total_blocks if self.kv_total_blocks else 0.0

    @property
    def num_queued(self) -> int:
        """Waiting sequences beyond the free seats: those the next step will not admit."""
        return max(0, self.num_waiting - max(0, self.max_num_seqs - self.num_running))

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


def merge_stats(snapshots: list[EngineStats]) -> EngineStats:
    """Several replicas' snapshots as one engine's: counts and counters added. What does not add up
    (an estimator's errors, the roofline fractions, the latest step) is kept only for a single replica."""
    if len(snapshots) == 1:
        return snapshots[0]
    if not snapshots:
        return EngineStats()
    specs = [s.spec for s in snapshots if s.spec is not None]
    tenants: dict[str, int] = {}
    for s in snapshots:
        for tenant, count in (s.policy.tenant_tokens or {}).items():
            tenants[tenant] = tenants.get(tenant, 0) + count
    meters = {s.energy_meter for s in snapshots if s.energy_meter is not None}
    return EngineStats(
        **{name: sum(getattr(s, name) for s in snapshots) for name in _ADDED},
        prefix_cache=PrefixCacheStats(sum(s.prefix_cache.queries_tokens for s in snapshots),
                                      sum(s.prefix_cache.hit_tokens for s in snapshots)),
        spec=SpecStats(*(sum(getattr(s, f) for s in specs) for f in ("draft_tokens", "accepted_tokens",
                                                                      "verify_steps"))) if specs else None,
        policy=PolicyStats(snapshots[0].policy.name, None,
                           tenants if snapshots[0].policy.tenant_tokens is not None else None),
        energy_meter=meters.pop() if len(meters) == 1 else None,
        energy_estimated=any(bool(s.energy_estimated) for s in snapshots) if meters else None)


_ADDED = ("num_requests", "num_running", "num_waiting", "max_num_seqs", "num_preemptions", "kv_total_blocks",
          "kv_free_blocks", "energy_joules")

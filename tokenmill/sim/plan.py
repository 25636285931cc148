"""`tokenmill plan`: the cheapest set of replicas and engine settings that meets an SLO at a rate.

For each combination of the engine settings to try (max_num_seqs, max_num_batched_tokens,
scheduling policy), the fewest replicas that meet the SLO is found by doubling then bisecting
(more replicas never make latency worse at a fixed rate, up to noise), each candidate judged
by a simulation of the same workload. "Meets" means every request completed and the SLO
percentile (p90 by default) of each named latency is within its target. The cheapest plan is
the one with the fewest replicas; ties go to the better goodput.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from tokenmill.errors import InvalidParameterError
from tokenmill.sim.simulator import ReplicaSettings, SimRequest, Simulation

PERCENTILE_KEYS = {50: "median_ms", 90: "p90_ms", 99: "p99_ms"}


@dataclass
class Candidate:
    replicas: int
    settings: ReplicaSettings
    summary: dict

    def to_dict(self) -> dict:
        return {"replicas": self.replicas, "max_num_seqs": self.settings.max_num_seqs,
                "max_num_batched_tokens": self.settings.max_num_batched_tokens,
                "scheduling_policy": self.settings.policy.name, "summary": self.summary}


def meets(summary: dict, slos: dict[str, float], percentile: int, num_requests: int) -> bool:
    if summary["completed"] < num_requests:
        return False
    key = PERCENTILE_KEYS[percentile]
    return all(summary[name][key] is not None and summary[name][key] <= ms for name, ms in slos.items())


def search(cost, base: ReplicaSettings, workload: Callable[[], Iterable[SimRequest]], slos: dict[str, float],
           max_num_seqs: list[int], max_num_batched_tokens: list[int], policies: list[str],
           max_replicas: int = 1024, percentile: int = 90, routing_policy: str = "prefix",
           say: Callable[[str], None] = lambda msg: None) -> tuple[Candidate | None, list[Candidate]]:
    """The cheapest candidate that meets `slos` (None if none within max_replicas), and every one tried."""
    if percentile not in PERCENTILE_KEYS:
        raise InvalidParameterError("slo_percentile", f"must be one of {sorted(PERCENTILE_KEYS)}")
    if not slos:
        raise InvalidParameterError("slo", "give at least one SLO, e.g. ttft:500,tpot:50")
    num_requests = sum(1 for _ in workload())
    tried: list[Candidate] = []

    def judge(replicas: int, settings: ReplicaSettings) -> Candidate:
        summary = Simulation(cost, settings, replicas, routing_policy).run(workload(), slos)
        candidate = Candidate(replicas, settings, summary)
        tried.append(candidate)
        ok = meets(summary, slos, percentile, num_requests)
        say(f"{replicas:5d} replicas, max_num_seqs {settings.max_num_seqs}, budget {settings.max_num_batched_tokens}, "
            f"{settings.policy.name}: {'meets' if ok else 'misses'} the SLO")
        return candidate

    best: Candidate | None = None
    for seqs, budget, policy in itertools.product(max_num_seqs, max_num_batched_tokens, policies):
        settings = replace(base, max_num_seqs=seqs, max_num_batched_tokens=budget, policy=replace(base.policy, name=policy))
        found = _fewest_replicas(lambda n: judge(n, settings), slos, percentile, num_requests, max_replicas,
                                 best.replicas if best else None)
        if found is not None and (best is None or (found.replicas, -found.summary.get("goodput", 0.0))
                                  < (best.replicas, -best.summary.get("goodput", 0.0))):
            best = found
    return best, tried


def _fewest_replicas(judge, slos, percentile, num_requests, max_replicas, bound: int | None) -> Candidate | None:
    """Doubling then bisection on the replica count; stops early past `bound` (a cheaper plan is known)."""
    limit = min(max_replicas, bound) if bound is not None else max_replicas
    low, high, good = 0, 1, None
    while high <= limit:
        candidate = judge(high)
        if meets(candidate.summary, slos, percentile, num_requests):
            good = candidate
            break
        low, high = high, high * 2
    if good is None:
        if high // 2 < limit < high:  # the last doubling jumped past the limit: try the limit itself
            candidate = judge(limit)
            if meets(candidate.summary, slos, percentile, num_requests):
                good, high = candidate, limit
        if good is None:
            return None
    while high - low > 1:
        mid = (low + high) // 2
        candidate = judge(mid)
        if meets(candidate.summary, slos, percentile, num_requests):
            good, high = candidate, mid
        else:
            low = mid
    return good

"""Scheduling policies: the order in which waiting sequences are admitted and running ones preempted.

A policy gives every sequence a sort key: the smallest key is admitted first and served first,
the largest is preempted first when KV blocks run out. A preemptive policy also lets the best
waiting sequence take the place of running ones whose keys it beats, when seats or blocks are
short (the scheduler asks `outranks`). A policy may also hold a waiting sequence back while
seats and budget are free (`startable`). The scheduler tells the policy what happens to
sequences (`on_add`, `on_scheduled`, `on_finish`), so policies that learn or count can do so.

- fcfs: arrival order.
- priority: the request's `priority` (lower first), then arrival; preemptive.
- aging: priority that improves with waiting: at time t a request's effective priority is
  `priority - (t - arrival) / aging_seconds`. Every request ages at the same rate, so the
  order is the fixed key `priority * aging_seconds + arrival`, and a request of priority p
  can be overtaken only by requests of priority q < p that arrive less than
  `(p - q) * aging_seconds` after it: its wait is bounded by the work that arrives before
  then, whatever comes later. Preemptive, like priority.
- sjf: shortest predicted remaining work first, where the work, in output-token units, is the
  output tokens the LengthEstimator expects minus those already generated, plus
  `prompt_token_weight` per prompt token never computed (prefill is work too: on the CPU
  where this was measured a prompt token cost about half a batched output token, and sjf by
  output length alone ranked 1,000-token summaries with chat turns). The key is
  `arrival + reliability * seconds_per_token * remaining_work`: a request is overtaken only by
  requests arriving less than `seconds_per_token * (its remaining work)` seconds after it (no
  starvation), and as the estimator's reliability falls to 0 (it predicts no better than a
  constant) the key falls back to arrival order, i.e. FCFS.
  A long prefill (at least `long_prefill_tokens` prompt tokens still to compute) does not
  start while a decoding sequence the key ranks ahead of it is running: computed in the same
  step, it would stall that sequence for seconds (on the CPU where this was measured a
  1,000-token prefill cost as much as about 70 decode steps of a batch of 8), which is SRPT's rule
  that lower-ranked work does not slow higher-ranked work, applied to the compute each step
  shares. It waits at most until every sequence that arrived before its key's time has
  finished (later arrivals rank behind it). Only sequences still prefilling can be
  preempted by a better-ranked waiting one (it takes their seat and blocks, and their
  computed blocks stay in the prefix cache, so their key does not count them as work again);
  a decoding sequence is never preempted by sjf: its wait would land on the longest
  requests, the tail. Below reliability 0.5 no prefill is held back (the ranking is too rough
  to wait for).
- fair: weighted fair share of computed tokens across tenants (the `user` field), as the
  virtual token counter of Sheng et al. ("Fairness in Serving Large Language Models", 2024):
  the tenant with the fewest tokens served per unit of weight goes first, and a tenant that
  comes back after idling starts at the least counter of the active tenants, so idling earns
  no credit to burst with later. Not preemptive: shares converge as sequences finish and
  free their seats.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

from tokenmill.config import PolicyConfig
from tokenmill.sequence import Sequence

class Policy:
    name = "base"
    preemptive = False  # may the best waiting sequence preempt running ones it outranks

    def key(self, seq: Sequence) -> tuple:
        raise NotImplementedError

    def next_to_admit(self, waiting: list[Sequence]) -> Sequence:
        return min(waiting, key=self.key)

    def preemption_order(self, running: list[Sequence]) -> list[Sequence]:
        """Running sequences, first to be served first, first to be preempted last."""
        return sorted(running, key=self.key)

    def outranks(self, seq: Sequence, other: Sequence) -> bool:
        return self.key(seq) < self.key(other)

    def startable(self, waiting: list[Sequence], running: list[Sequence]) -> list[Sequence]:
        """The waiting sequences that may be admitted this step, seats, budget and blocks permitting."""
        return list(waiting)

    # ---- what happens to sequences (no-ops unless a policy learns or counts) ------------------
    def on_add(self, seq: Sequence) -> None:
        """A new sequence entered the system (not a preempted one coming back)."""

    def on_scheduled(self, chunks) -> None:
        """The step's chunks (ScheduledChunk) are about to run."""

    def on_finish(self, seq: Sequence) -> None:
        """A sequence left the system: finished (seq.finish_reason says how) or aborted."""

    def stats(self) -> dict:
        """What the policy learned or counted, as plain copies (PolicyStats' fields besides the name)."""
        return {}


class FCFSPolicy(Policy):
    """First come, first served: earliest arrival first; the newest running sequence is preempted."""

    name = "fcfs"

    def key(self, seq: Sequence) -> tuple:
        return (seq.arrival_time, seq.seq_id)


class PriorityPolicy(Policy):
    """Lower `priority` first, then arrival; a waiting request preempts running lower-priority ones."""

    name = "priority"
    preemptive = True

    def key(self, seq: Sequence) -> tuple:
        return (seq.priority, seq.arrival_time, seq.seq_id)


class AgingPolicy(Policy):
    """Priority that improves by one level every `aging_seconds` of waiting (see the module docstring)."""

    name = "aging"
    preemptive = True

    def __init__(self, aging_seconds: float = 10.0):
        self.aging_seconds = aging_seconds

    def key(self, seq: Sequence) -> tuple:
        return (seq.priority * self.aging_seconds + seq.arrival_time, seq.seq_id)


# ---- shortest job first ---------------------------------------------------------------------


@dataclass
class _Mean:
    """A running mean that becomes an exponential moving average after 1/floor observations,
    so it follows a workload that drifts."""

    count: int = 0
    value: float = 0.0

    def add(self, x: float, floor: float = 0.02) -> None:
        self.count += 1
        self.value += (x - self.value) * max(1.0 / self.count, floor)


@dataclass
class EstimatorStats:
    """How well the estimator predicted the requests that finished so far (in output tokens)."""

    observations: int = 0
    mae: float = 0.0  # mean absolute error of the predictions made at arrival
    rmse: float = 0.0
    baseline_mae: float = 0.0  # of predicting max_tokens, as a scheduler that knows nothing else would
    constant_mae: float = 0.0  # of predicting the running mean of all outputs
    reliability: float = 1.0  # 1 - mae / constant_mae, clamped to [0, 1]: 0 is no better than a constant


class _Hierarchy:
    """Running means of one quantity per tenant and prompt-length bucket, per tenant, and overall.

    A prediction shrinks each level toward the one above it by `prior_weight` pseudo-observations,
    so a bucket with few samples leans on its tenant's mean, the tenant's on everyone's, and
    everyone's on the prior the caller gives.
    """

    def __init__(self, prior_weight: float):
        self.prior_weight = prior_weight
        self._means: dict[tuple, _Mean] = defaultdict(_Mean)
        self.error = _Mean()  # absolute error in tokens of this hierarchy's predictions

    @staticmethod
    def _levels(seq: Sequence) -> list[tuple]:
        bucket = max(0, seq.num_prompt_tokens - 1).bit_length()  # powers of two
        return [("all",), ("tenant", seq.tenant), ("bucket", seq.tenant, bucket)]

    def predict(self, seq: Sequence, prior: float) -> float:
        estimate, k = prior, self.prior_weight
        for level in self._levels(seq):
            mean = self._means.get(level)
            if mean is not None and mean.count:
                estimate = (mean.count * mean.value + k * estimate) / (mean.count + k)
        return estimate

    def add(self, seq: Sequence, value: float) -> None:
        for level in self._levels(seq):
            self._means[level].add(value)


class LengthEstimator:
    """Predicts a request's output length from its tenant, prompt length and max_tokens, online.

    Before anything has finished a request is predicted to use its whole max_tokens, the only
    thing known. Finished requests then teach two hierarchies (see _Hierarchy): one of output
    lengths in tokens (right when a tenant's answers have a typical length whatever limit it
    sets) and one of the fraction of max_tokens used (right when outputs scale with the limit,
    e.g. clients that ignore EOS). Of those two and max_tokens itself (right when most requests
    run to their limit, where the means, pulled down by the few that stop early, undershoot),
    the one with the smallest running error predicts. Predictions never exceed max_tokens.
    """

    def __init__(self, prior_weight: float = 4.0, min_observations: int = 8):
        self.min_observations = min_observations  # before this many, reliability stays 1 (trust max_tokens)
        self._tokens = _Hierarchy(prior_weight)
        self._fraction = _Hierarchy(prior_weight)
        self._overall = _Mean()
        self._abs_error = _Mean()
        self._sq_error = _Mean()
        self._baseline_error = _Mean()  # of predicting max_tokens: also that candidate's running error
        self._constant_error = _Mean()
        self.stats = EstimatorStats()

    def _candidates(self, seq: Sequence, limit: int) -> list[tuple[_Mean, float]]:
        """(running error, prediction) of each way to predict; ties go to the first."""
        return [(self._tokens.error, min(self._tokens.predict(seq, float(limit)), float(limit))),
                (self._fraction.error, limit * min(self._fraction.predict(seq, 1.0), 1.0)),
                (self._baseline_error, float(limit))]

    def predict(self, seq: Sequence, limit: int) -> float:
        """Expected output tokens of `seq`, at most `limit` (its max_tokens, or what the context leaves)."""
        return min(self._candidates(seq, limit), key=lambda c: c[0].value)[1]

    def observe(self, seq: Sequence, predicted: float, limit: int) -> None:
        """A finished sequence's real output length; `predicted` is what `predict` said at its arrival."""
        actual = seq.num_output_tokens
        for error, prediction in self._candidates(seq, limit):
            error.add(abs(prediction - actual))
        self._tokens.add(seq, actual)
        self._fraction.add(seq, actual / max(limit, 1))
        self._constant_error.add(abs((self._overall.value if self._overall.count else limit) - actual))
        self._overall.add(actual)
        self._abs_error.add(abs(predicted - actual))
        self._sq_error.add((predicted - actual) ** 2)
        s = self.stats
        s.observations += 1
        s.mae, s.rmse = self._abs_error.value, math.sqrt(self._sq_error.value)
        s.baseline_mae, s.constant_mae = self._baseline_error.value, self._constant_error.value
        if s.observations >= self.min_observations:
            if s.constant_mae > 0:
                s.reliability = min(1.0, max(0.0, 1.0 - s.mae / s.constant_mae))
            else:  # every output so far had one length: only a wrong prediction is evidence against us
                s.reliability = 1.0 if s.mae == 0 else 0.0


class ShortestJobFirstPolicy(Policy):
    """Shortest predicted remaining work first, aged by arrival (see the module docstring)."""

    name = "sjf"
    preemptive = True  # a short request may take the seat of a prefilling one that arrived not much earlier
    hold_back_min_reliability = 0.5  # below it the ranking is too rough to keep a prefill waiting for

    def __init__(self, max_model_len: int, seconds_per_token: float = 0.1, prompt_token_weight: float = 0.5,
                 long_prefill_tokens: int = 512, estimator: LengthEstimator | None = None):
        self.max_model_len = max_model_len
        self.seconds_per_token = seconds_per_token
        self.prompt_token_weight = prompt_token_weight
        self.long_prefill_tokens = long_prefill_tokens
        self.estimator = estimator or LengthEstimator()
        self._predicted: dict[int, float] = {}  # seq_id -> the prediction made at arrival, for the error stats
        self._computed: dict[int, int] = {}  # seq_id -> most tokens it ever had computed (preemption resets its count)

    def _limit(self, seq: Sequence) -> int:
        room = self.max_model_len - seq.num_prompt_tokens
        return room if seq.params.max_tokens is None else min(seq.params.max_tokens, room)

    def predicted_remaining(self, seq: Sequence) -> float:
        return max(1.0, self.estimator.predict(seq, self._limit(seq)) - seq.num_output_tokens)

    def remaining_work(self, seq: Sequence) -> float:
        """Predicted output tokens still to generate, plus the weighted prompt tokens never computed yet.

        A preempted sequence's computed blocks stay in the prefix cache (unless it is off or
        they are evicted), so recomputing them is not counted: charging its prompt again would
        send it behind every newcomer it had already beaten, and the long requests preempted
        that way made sjf's p99 worse than fcfs's."""
        return self.predicted_remaining(seq) + self.prompt_token_weight * self._prefill_left(seq)

    def _prefill_left(self, seq: Sequence) -> int:
        computed = max(seq.num_computed_tokens, self._computed.get(seq.seq_id, 0))
        return max(0, seq.num_prompt_tokens - computed)

    def key(self, seq: Sequence) -> tuple:
        delay = self.estimator.stats.reliability * self.seconds_per_token * self.remaining_work(seq)
        return (seq.arrival_time + delay, seq.seq_id)

    def outranks(self, seq: Sequence, other: Sequence) -> bool:
        """Only a sequence still prefilling gives up its seat (see the module docstring)."""
        return other.num_output_tokens == 0 and super().outranks(seq, other)

    def startable(self, waiting: list[Sequence], running: list[Sequence]) -> list[Sequence]:
        """All but the long prefills ranked behind a decoding sequence (see the module docstring)."""
        decoding = [self.key(r) for r in running if r.num_output_tokens > 0]
        if not decoding or self.estimator.stats.reliability < self.hold_back_min_reliability:
            return list(waiting)
        best = min(decoding)  # one key per running sequence, not one per (waiting, running) pair
        return [s for s in waiting if self._prefill_left(s) < self.long_prefill_tokens or self.key(s) < best]

    def on_add(self, seq: Sequence) -> None:
        self._predicted[seq.seq_id] = self.estimator.predict(seq, self._limit(seq))

    def on_scheduled(self, chunks) -> None:
        for chunk in chunks:
            computed = chunk.start + chunk.num_known
            if computed > self._computed.get(chunk.seq.seq_id, 0):
                self._computed[chunk.seq.seq_id] = computed

    def on_finish(self, seq: Sequence) -> None:
        self._computed.pop(seq.seq_id, None)
        predicted = self._predicted.pop(seq.seq_id, None)
        if predicted is not None and seq.finish_reason in ("stop", "length"):
            self.estimator.observe(seq, predicted, self._limit(seq))

    def stats(self) -> dict:
        return {"length_estimator": replace(self.estimator.stats)}


# ---- weighted fair share --------------------------------------------------------------------


class FairSharePolicy(Policy):
    """Weighted fair share of computed tokens across tenants (see the module docstring)."""

    name = "fair"

    def __init__(self, tenant_weights: dict[str, float] | None = None):
        self.weights = dict(tenant_weights or {})
        self.served: dict[str, float] = defaultdict(float)  # tenant -> computed tokens / weight
        self.tokens: Counter = Counter()  # tenant -> computed tokens (prompt and output), for reports
        self._active: Counter = Counter()  # tenant -> its sequences in the system

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def key(self, seq: Sequence) -> tuple:
        return (self.served[seq.tenant], seq.arrival_time, seq.seq_id)

    def on_add(self, seq: Sequence) -> None:
        tenant = seq.tenant
        if not self._active[tenant]:
            active = [self.served[t] for t, n in self._active.items() if n]
            if active:
                self.served[tenant] = max(self.served[tenant], min(active))
        self._active[tenant] += 1

    def on_scheduled(self, chunks) -> None:
        for chunk in chunks:
            tenant = chunk.seq.tenant
            self.tokens[tenant] += chunk.num_tokens
            self.served[tenant] += chunk.num_tokens / self.weight(tenant)

    def on_finish(self, seq: Sequence) -> None:
        self._active[seq.tenant] -= 1

    def stats(self) -> dict:
        return {"tenant_tokens": dict(self.tokens)}


# ---- construction ---------------------------------------------------------------------------


def make_policy(config: PolicyConfig, max_model_len: int) -> Policy:
    if config.name == "fcfs":
        return FCFSPolicy()
    if config.name == "priority":
        return PriorityPolicy()
    if config.name == "aging":
        return AgingPolicy(config.aging_seconds)
    if config.name == "sjf":
        return ShortestJobFirstPolicy(max_model_len, config.sjf_seconds_per_token, config.sjf_prompt_token_weight,
                                      config.sjf_long_prefill_tokens)
    if config.name == "fair":
        return FairSharePolicy(config.tenant_weights)
    raise AssertionError(config.name)  # PolicyConfig admits only the names above

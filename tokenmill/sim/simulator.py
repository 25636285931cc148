"""A serving simulation that runs tokenmill's own scheduler on a virtual clock.

Each replica holds a real `Scheduler`, `Policy`, `KVCacheManager` and `BlockPool`; the only
thing missing is the model. A step is planned by `Scheduler.schedule()`, costs what the cost
model says, and ends with `Scheduler.update_from_output()` fed one placeholder token per
sampling sequence, so admissions, chunked prefill, prefix-cache hits and preemptions are the
engine's own. New requests go to a replica through the engine's `Router`, and wait for a
client slot first when the workload caps concurrency (as `tokenmill bench serve` does).

The records are those of `bench serve`: TTFT from the moment a request is sent to the end of
the step that sampled its first token, ITL the gaps between its steps, E2E to its last.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from tokenmill.bench.metrics import RequestRecord, latency_stats, summarize
from tokenmill.engine.policy import Policy, PolicyConfig, make_policy
from tokenmill.engine.router import Router
from tokenmill.engine.scheduler import Scheduler
from tokenmill.errors import InvalidParameterError
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.kv_cache_manager import KVCacheManager
from tokenmill.sampling_params import SamplingParams
from tokenmill.sequence import Sequence
from tokenmill.step_plan import SamplerOutput, ScheduledChunk, SchedulerOutput, SequenceUpdate, StepResult

PLACEHOLDER_TOKEN = 0  # what every simulated step samples (outputs end by length, never by a stop token)
ITL_KEPT = 20_000_000  # gaps kept exactly; past that, every other one, then every fourth, ...
MIN_DECODE_RUN = 2  # plain decode steps worth applying in one go


@dataclass
class SimRequest:
    arrival: float  # seconds from the start
    prompt_ids: list[int]
    output_len: int
    tenant: str = ""
    priority: int = 0


@dataclass
class ReplicaSettings:
    """One replica's engine knobs (the engine's option names)."""

    num_blocks: int  # KV blocks, the null block included
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: what the KV cache holds
    enable_prefix_caching: bool = True
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        capacity = (self.num_blocks - 1) * self.block_size
        if self.max_model_len is None:
            self.max_model_len = capacity
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < (2 if name == "num_blocks" else 1):
                raise InvalidParameterError(name, f"too small: {getattr(self, name)}")
        if self.max_model_len > capacity:
            raise InvalidParameterError("max_model_len", f"{self.max_model_len} tokens do not fit in the KV cache "
                                                         f"({capacity} tokens)")


@dataclass
class StepEvent:
    """One simulated step, for tracing: when it ran and what the scheduler decided."""

    replica: int
    start: float
    end: float
    admitted: list[str]  # request ids whose sequence started (or resumed) in this step
    preempted: list[str]
    num_tokens: int


class Replica:
    def __init__(self, index: int, settings: ReplicaSettings, first_blocks: dict[int, int] | None = None):
        self.index = index
        self.kv = KVCacheManager(BlockPool(settings.num_blocks, first_blocks), settings.block_size,
                                 settings.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, make_policy(settings.policy, settings.max_model_len), settings.max_num_seqs,
                                   settings.max_num_batched_tokens, [], settings.max_model_len)
        self.plan: SchedulerOutput | None = None  # the step in flight
        self.run: DecodeRun | None = None  # or the run of plain decode steps in flight
        self.version = 0  # of the end event in the queue (a run cut short queues a new one)
        self.busy_seconds = 0.0
        self.num_steps = 0

    @property
    def load(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    @property
    def busy(self) -> bool:
        return self.plan is not None or self.run is not None


@dataclass
class DecodeRun:
    """Steps in which the same running sequences each decode one token and nothing else can change:
    nothing waits, no sequence finishes before the last, and the free blocks cover their growth.
    Applied in one go when it ends, or cut at the step an arrival for this replica joins."""

    start: float
    ends: np.ndarray  # end time of each step
    planned: bool = False  # the policy already told of its steps (see Simulation._plan_run)

    def cut(self, at: float) -> bool:
        """Keep the steps up to the one running at `at` (an arrival waits for the next step boundary)."""
        keep = int(np.searchsorted(self.ends, at, side="left")) + 1
        if keep >= len(self.ends):
            return False
        self.ends = self.ends[:keep]
        return True


@dataclass
class _Tracked:
    record: RequestRecord
    sent: float
    last_token: float | None = None


class Simulation:
    """Run a workload on `num_replicas` replicas; `run` returns what `bench serve` would report."""

    def __init__(self, cost, settings: ReplicaSettings, num_replicas: int = 1, routing_policy: str = "prefix",
                 max_concurrency: int | None = None, trace: bool = False, fast_forward: bool = True):
        if num_replicas < 1:
            raise InvalidParameterError("replicas", f"must be at least 1, got {num_replicas}")
        if max_concurrency is not None and max_concurrency < 1:
            raise InvalidParameterError("max_concurrency", f"must be at least 1, got {max_concurrency}")
        self.cost = cost
        self.settings = settings
        self._first_blocks: dict[int, int] = {}  # first-block hash -> replicas caching it, for the router
        self.replicas = [Replica(i, settings, self._first_blocks) for i in range(num_replicas)]
        self.router = Router(routing_policy, settings.block_size)
        self.max_concurrency = max_concurrency
        self.fast_forward = fast_forward  # apply runs of plain decode steps in one go (same result, faster)
        self.num_decode_runs = 0
        self.steps: list[StepEvent] | None = [] if trace else None
        self._ends: list[tuple[float, int, int, int]] = []  # (end time, order, replica, version) of the steps in flight
        self._order = itertools.count()
        self._tracked: dict[str, _Tracked] = {}
        self._itl = array("d")
        self._itl_stride = 1
        self._itl_seen = 0
        self._params: dict[int, SamplingParams] = {}

    def run(self, requests: Iterable[SimRequest], slos: dict[str, float] | None = None) -> dict:
        # The run keeps millions of cache entries alive, which the cyclic collector would walk again
        # and again (a third of the time at 50,000 requests); the simulation makes no reference
        # cycles, so reference counting frees everything without it.
        if not self.replicas:
            raise RuntimeError("a Simulation runs once; make a new one")
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run(requests, slos)
        finally:
            # A simulation runs once: its replicas go now, by reference counting, before the collector
            # is back and would walk their millions of objects once more (a few seconds at a million).
            self.replicas = []
            if collecting:
                gc.enable()

    def _run(self, requests: Iterable[SimRequest], slos: dict[str, float] | None) -> dict:
        arrivals = iter(requests)
        records: list[RequestRecord] = []
        queue: deque[tuple[str, SimRequest]] = deque()  # arrived, waiting for a client slot
        in_flight = 0
        now = 0.0
        ids = (f"req-{i}" for i in itertools.count())
        upcoming = next(arrivals, None)
        touched: set[int] = set()  # replicas whose state changed: only they may start a step now
        while upcoming is not None or queue or self._ends:
            # everything that happens at the next instant, then the steps that start then
            now = min(upcoming.arrival if upcoming is not None else math.inf, self._ends[0][0] if self._ends else math.inf)
            while self._ends and self._ends[0][0] <= now:
                _, _, index, version = heapq.heappop(self._ends)
                if version == self.replicas[index].version:  # not a run's end since cut short
                    in_flight -= self._end_step(self.replicas[index], now, records)
                    touched.add(index)
            while upcoming is not None and upcoming.arrival <= now:
                queue.append((next(ids), upcoming))
                upcoming = next(arrivals, None)
                if upcoming is not None and upcoming.arrival < now:
                    raise InvalidParameterError("workload", "requests must come in arrival order")
            while queue and (self.max_concurrency is None or in_flight < self.max_concurrency):
                request_id, request = queue.popleft()
                touched.add(self._send(request_id, request, now))
                in_flight += 1
            for index in sorted(touched):
                replica = self.replicas[index]
                if not replica.busy:
                    self._start_step(replica, now)
            touched.clear()
            if not self._ends and (queue or any(r.load for r in self.replicas)) and upcoming is None:
                raise RuntimeError("the simulation stalled: requests wait and no replica can start them")
        return self._report(records, now, slos)

    # ---- the replicas ---------------------------------------------------------------------
    def _send(self, request_id: str, request: SimRequest, now: float) -> int:
        """Route the request and queue it there; return the replica's index."""
        if not 0 < len(request.prompt_ids) < self.settings.max_model_len:
            raise InvalidParameterError("workload", f"a prompt of {len(request.prompt_ids)} tokens does not fit "
                                                    f"max_model_len {self.settings.max_model_len}")
        params = self._params.get(request.output_len)
        if params is None:  # one per output length: the scheduler only reads a sequence's params
            params = self._params[request.output_len] = SamplingParams(max_tokens=request.output_len, ignore_eos=True)
        seq = Sequence(request_id, 0, request.prompt_ids, params, now, tenant=request.tenant,
                       priority=request.priority)
        replica = self.replicas[self.router.route(self.replicas, request.prompt_ids, first_blocks=self._first_blocks)]
        if replica.run is not None:
            if replica.run.cut(now):
                self._queue_end(replica, float(replica.run.ends[-1]))
            self._plan_run(replica)
        replica.scheduler.add(seq)
        record = RequestRecord(len(request.prompt_ids), request.output_len, start=now, tenant=request.tenant or None)
        self._tracked[request_id] = _Tracked(record, now)
        return replica.index

    def _start_step(self, replica: Replica, now: float) -> None:
        if not replica.scheduler.has_unfinished():
            return
        steps = self._decode_run_length(replica) if self.fast_forward else 0
        if steps:
            running = replica.scheduler.running
            computed = sum(seq.num_computed_tokens for seq in running)
            blocks = _run_blocks(replica, steps) if self.cost.reads_blocks else None
            durations = self.cost.decode_run_seconds(len(running), computed, steps, blocks)
            replica.run = DecodeRun(now, now + np.cumsum(durations))
            self.num_decode_runs += 1
            self._queue_end(replica, float(replica.run.ends[-1]))
            return
        waiting = {id(s) for s in replica.scheduler.waiting} if self.steps is not None else set()
        plan = replica.scheduler.schedule()
        if not plan.chunks:  # waiting sequences that cannot start until something else changes
            return
        seconds = self.cost.step_seconds(plan.chunks)
        replica.plan = plan
        replica.busy_seconds += seconds
        replica.num_steps += 1
        self._queue_end(replica, now + seconds)
        if self.steps is not None:
            admitted = [c.seq.request_id for c in plan.chunks if id(c.seq) in waiting]
            self.steps.append(StepEvent(replica.index, now, now + seconds, admitted,
                                        [s.request_id for s in plan.preempted], plan.num_tokens))

    def _queue_end(self, replica: Replica, at: float) -> None:
        replica.version += 1
        heapq.heappush(self._ends, (at, next(self._order), replica.index, replica.version))

    def _decode_run_length(self, replica: Replica) -> int:
        """How many plain decode steps can be applied in one go (0: schedule this step normally).

        Up to the step in which the first running sequence finishes (its tokens go through the
        scheduler's bookkeeping, which ends sequences). Needs nothing waiting, every running
        sequence decoding, the whole batch within the token budget, and free blocks for the
        growth of every step."""
        sched = replica.scheduler
        running = sched.running
        if sched.waiting or not running or len(running) > sched.max_num_batched_tokens:
            return 0
        steps = min(_steps_to_finish(seq, sched.max_model_len) for seq in running)
        if steps < MIN_DECODE_RUN or any(seq.num_uncomputed_tokens != 1 or seq.draft_token_ids for seq in running):
            return 0
        kv = replica.kv
        needed = sum(kv.blocks_to_grow(seq.seq_id, seq.num_computed_tokens, seq.num_computed_tokens + steps)
                     for seq in running)
        return steps if needed <= kv.pool.num_free_blocks else 0

    def _plan_run(self, replica: Replica) -> None:
        """What each of the run's steps would have done when it was scheduled: the policy told of its
        chunks, the batch left in the last step's order. Done when the run ends, or at once when an
        arrival cuts it, since adding a request reads the policy's counts (fair's shares)."""
        run = replica.run
        if run.planned:
            return
        run.planned = True
        sched, kv = replica.scheduler, replica.kv
        steps = len(run.ends)
        running = list(sched.running)
        counts = type(sched.policy).on_scheduled is not Policy.on_scheduled  # fcfs, priority, aging count nothing
        if counts and steps > 1:
            sched.policy.on_scheduled([ScheduledChunk(seq, seq.num_computed_tokens, steps - 1, kv.block_table(seq.seq_id))
                                       for seq in running])
        sched.running = sched.policy.preemption_order(running)  # as the last step's _serve_running leaves it
        if counts:
            sched.policy.on_scheduled([ScheduledChunk(seq, seq.num_computed_tokens + steps - 1, 1,
                                                      kv.block_table(seq.seq_id)) for seq in running])

    def _apply_run(self, replica: Replica) -> list[SequenceUpdate]:
        """The run's steps, as the scheduler would have made them: each sequence's blocks grown and
        its tokens appended and cached. The last step goes through the scheduler's own bookkeeping
        (which ends the sequences that reach their length); its updates are returned."""
        self._plan_run(replica)
        run, replica.run = replica.run, None
        kv, sched = replica.kv, replica.scheduler
        steps = len(run.ends)
        running = sched.running
        for seq in running:
            kv.grow(seq.seq_id, seq.num_computed_tokens, seq.num_computed_tokens + steps)
            seq.num_computed_tokens += steps - 1
            seq.token_ids.extend([PLACEHOLDER_TOKEN] * (steps - 1))
        for seq in running:  # after every sequence grew, as the steps' own bookkeeping would
            kv.cache_full_blocks(seq)
        ends = run.ends.tolist()
        if steps > 1:  # a run cut short may keep only its last step
            gaps = [b - a for a, b in zip(ends[:-2], ends[1:-1])]  # between the steps before the last
            firsts = []
            for seq in running:
                tracked = self._tracked[seq.request_id]
                tracked.record.output_tokens += steps - 1
                if tracked.last_token is None:  # its prefill's last chunk was this one token
                    tracked.record.ttft = ends[0] - tracked.sent
                else:
                    firsts.append(ends[0] - tracked.last_token)  # it may have sat out the step before the run
                tracked.last_token = ends[-2]
            self._keep_itls(firsts + gaps * len(running))
        replica.busy_seconds += ends[-1] - run.start
        replica.num_steps += steps
        if self.steps is not None:
            self.steps += [StepEvent(replica.index, a, b, [], [], len(running))
                           for a, b in zip([run.start, *ends[:-1]], ends)]
        last = [ScheduledChunk(seq, seq.num_computed_tokens, 1, kv.block_table(seq.seq_id)) for seq in running]
        return self._update(sched, SchedulerOutput(last))

    def _end_step(self, replica: Replica, now: float, records: list[RequestRecord]) -> int:
        """Apply the step (or run of steps) that just ended; return how many requests it finished."""
        if replica.run is not None:
            updates = self._apply_run(replica)
        else:
            plan, replica.plan = replica.plan, None
            updates = self._update(replica.scheduler, plan)
        finished = 0
        for update in updates:
            seq = update.seq
            tracked = self._tracked[seq.request_id]
            record = tracked.record
            if tracked.last_token is None:
                record.ttft = now - tracked.sent
            else:
                self._keep_itl(now - tracked.last_token)
            tracked.last_token = now
            record.output_tokens += len(update.tokens)
            if seq.is_finished:
                record.success, record.e2e = True, now - tracked.sent
                records.append(record)
                del self._tracked[seq.request_id]
                finished += 1
        return finished

    @staticmethod
    def _update(scheduler: Scheduler, plan: SchedulerOutput) -> list[SequenceUpdate]:
        """The scheduler's bookkeeping after `plan` ran, each sampling sequence given the placeholder token."""
        sampled = [c for c in plan.chunks if c.sample]
        samples = SamplerOutput([PLACEHOLDER_TOKEN] * len(sampled), None, None, None)
        return scheduler.update_from_output(plan, StepResult(sampled, samples, [1] * len(sampled)))

    def _keep_itl(self, gap: float) -> None:
        self._itl_seen += 1
        if self._itl_seen % self._itl_stride:
            return
        self._itl.append(gap)
        self._thin_itls()

    def _keep_itls(self, gaps: list[float]) -> None:
        first = (-self._itl_seen) % self._itl_stride  # the first of these whose running count is a multiple
        self._itl_seen += len(gaps)
        self._itl.extend(gaps[first::self._itl_stride])
        self._thin_itls()

    def _thin_itls(self) -> None:
        while len(self._itl) >= ITL_KEPT:
            self._itl = self._itl[::2]
            self._itl_stride *= 2

    # ---- the report -----------------------------------------------------------------------
    def _report(self, records: list[RequestRecord], duration: float, slos: dict[str, float] | None) -> dict:
        summary = summarize(records, duration, slos)
        summary["itl"] = latency_stats(self._itl)
        kv = [r.kv.stats for r in self.replicas]
        queried = sum(s.queries_tokens for s in kv)
        busy = [r.busy_seconds for r in self.replicas]
        joules = sum(self.cost.busy_watts * b + self.cost.idle_watts * max(0.0, duration - b) for b in busy)
        tokens = summary["total_input_tokens"] + summary["total_output_tokens"]
        summary.update({
            "num_replicas": len(self.replicas),
            "num_steps": sum(r.num_steps for r in self.replicas),
            "num_preemptions": sum(r.scheduler.num_preemptions for r in self.replicas),
            "prefix_hit_rate": sum(s.hit_tokens for s in kv) / queried if queried else 0.0,
            "replica_busy_share": [b / duration if duration else 0.0 for b in busy],
            "energy_joules": joules,
            "joules_per_output_token": joules / summary["total_output_tokens"] if summary["total_output_tokens"] else None,
            "joules_per_token": joules / tokens if tokens else None,
            "cost_model": {"source": self.cost.source, "label": self.cost.label},
        })
        return summary


def _run_blocks(replica: Replica, steps: int) -> np.ndarray:
    """The distinct KV blocks each step of a decode run reads: the running sequences' blocks now
    (a shared prefix once), plus the private blocks each one grows into."""
    kv = replica.kv
    tables = [kv.block_table(seq.seq_id) for seq in replica.scheduler.running]
    computed = np.array([seq.num_computed_tokens for seq in replica.scheduler.running])[:, None]
    held = np.array([len(t) for t in tables])[:, None]
    needed = -(-(computed + np.arange(1, steps + 1)) // kv.block_size)  # blocks of each sequence at step i
    return len(set().union(*tables)) + np.maximum(0, needed - held).sum(axis=0)


def _steps_to_finish(seq: Sequence, max_model_len: int) -> int:
    """Steps until `seq` samples the token that ends it by length (the simulated outputs never stop early)."""
    return min(seq.params.max_tokens - seq.num_output_tokens, max_model_len - seq.num_tokens)


def price_per_million(summary: dict, price_per_hour: float | None, energy_price: float | None = None) -> float | None:
    """USD per million output tokens: the replicas' machine time at `price_per_hour` each (plus the
    energy at `energy_price` per kWh), over the run's output tokens."""
    tokens = summary["total_output_tokens"]
    if not tokens or (price_per_hour is None and energy_price is None):
        return None
    dollars = (price_per_hour or 0.0) * summary["num_replicas"] * summary["duration_s"] / 3600
    dollars += (energy_price or 0.0) * summary["energy_joules"] / 3.6e6
    return dollars / tokens * 1e6

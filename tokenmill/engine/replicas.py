"""Data-parallel replicas on Ray: N engines, each in its own Ray actor process, behind one router.

`ReplicatedEngine` offers what the server takes of an AsyncLLMEngine (add_request -> a
RequestStream, abort, end_all, shutdown, in-flight and queue counts, liveness), so the OpenAI
server runs unchanged in front of it. Each replica (`EngineReplica`) is an AsyncLLMEngine in a
Ray actor with its own threads; its outputs leave as one batch per wake-up on a single Ray
stream, not one object per token, and a thread of the front ("tokenmill-replicas", with its own
event loop) hands them to the requests' streams.

Routing reads each replica's load (its requests in flight, counted here exactly) and its cache
as this front predicts it (`PrefixMirror`): the prompt blocks it routed there, dropped oldest
first beyond the replica's pool. Python's hash of a prompt block differs between processes,
so a replica's own hashes cannot be compared here; SGLang's cache-aware router keeps the same
kind of approximate tree.

A replica that dies is seen at once (its output stream breaks): it leaves routing, its
requests in flight end with ReplicaLostError, and Ray restarts its actor (building the engine
again); when it answers again it rejoins with an empty cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tokenmill.engine.async_engine import AsyncLLMEngine, RequestStream, ServerShutdownError, UnavailableError
from tokenmill.engine.router import Router
from tokenmill.engine.stats import EngineStats, merge_stats
from tokenmill.errors import InvalidParameterError
from tokenmill.kv.kv_cache_manager import prefix_hashes
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger("tokenmill")

STATS_INTERVAL = 0.5  # seconds between polls of the replicas' stats snapshots
CALL_TIMEOUT = 10.0  # a replica that does not answer a control call within this is taken as down
RAY_MISSING = "data-parallel replicas run on Ray, which is not installed: pip install 'tokenmill[ray]'"


class ReplicaLostError(UnavailableError):
    """The replica serving the request died; the request was ended (the server answers 503)."""


@dataclass
class ReplicaInfo:
    """What the front needs of the model a replica serves: its tokenizer, limits and defaults."""

    model_name: str
    tokenizer: Any
    max_model_len: int
    speculative: bool
    generation_defaults: dict
    block_size: int
    kv_total_blocks: int
    pid: int
    node: str


@dataclass
class ReplicaView:
    """The engine attributes the server reads (LLMEngine's names), for replicas that live elsewhere."""

    model_name: str
    tokenizer: Any
    max_model_len: int
    speculative: bool
    generation_defaults: dict
    stats: Callable[[], EngineStats]


class EngineReplica:
    """One replica, run as a Ray actor: an AsyncLLMEngine whose outputs leave in batches."""

    def __init__(self, model, engine_kwargs: dict, max_queue: int | None):
        from tokenmill.engine.engine import LLMEngine

        self.engine = AsyncLLMEngine(lambda: LLMEngine(model, **engine_kwargs), max_queue=max_queue)
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._forwarding: dict[str, asyncio.Task] = {}

    async def info(self) -> ReplicaInfo:
        import ray

        e = self.engine.engine
        return ReplicaInfo(e.model_name, e.tokenizer, e.max_model_len, e.speculative, e.generation_defaults,
                           e.config.cache.block_size, e.stats().kv_total_blocks, os.getpid(),
                           ray.util.get_node_ip_address())

    async def add(self, request_id: str, prompt, params: SamplingParams, prompt_text: str | None, priority: int,
                  tenant: str | None) -> Exception | None:
        """None once the engine took the request, or the error that refused it (returned, not raised,
        so that the front gets it as it was)."""
        try:
            stream = await self.engine.add_request(request_id, prompt, params, prompt_text, priority, tenant)
        except Exception as e:
            return e
        self._forwarding[request_id] = asyncio.ensure_future(self._forward(request_id, stream))
        return None

    async def _forward(self, request_id: str, stream: RequestStream) -> None:
        try:
            async for output in stream:
                self._outbox.put_nowait((request_id, output))
        except Exception as e:
            self._outbox.put_nowait((request_id, e))
        finally:
            self._forwarding.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        task = self._forwarding.pop(request_id, None)
        if task is not None:
            task.cancel()  # leaving the stream's iteration aborts the request in the engine

    async def outputs(self):
        """Every request's outputs, as (request_id, RequestOutput or error) pairs, in batches."""
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            yield batch

    async def stats(self) -> EngineStats:
        return self.engine.engine.stats()


class PrefixMirror:
    """The chain hashes of the prompt blocks routed to one replica, most recent last, at most
    `capacity` (its pool's blocks): the front's estimate of what the replica has cached."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._hashes: OrderedDict[int, None] = OrderedDict()

    def holds_block(self, block_hash: int) -> bool:
        return block_hash in self._hashes

    def add(self, hashes: list[int]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self.capacity:
            self._hashes.popitem(last=False)

    def clear(self) -> None:
        self._hashes.clear()


@dataclass(eq=False)
class ReplicaHandle:
    """The front's side of one replica: its actor, whether it is up, and its requests in flight."""

    index: int
    actor: Any
    kv: PrefixMirror
    up: bool = True
    in_flight: dict[str, RequestStream] = field(default_factory=dict)
    stats: EngineStats | None = None
    routed: int = 0  # requests routed here since start
    restarts: int = 0  # times it came back after dying
    pid: int | None = None
    node: str = ""  # the address of the machine it runs on

    @property
    def load(self) -> int:
        return len(self.in_flight)


class ReplicatedEngine:
    """N EngineReplica actors on Ray behind a Router; the server's engine when --data-parallel-size > 1.

    Starts a local Ray instance unless `ray_address` names a cluster, and returns once every
    replica has built its engine (raising what building raised)."""

    def __init__(self, model, engine_kwargs: dict, replicas: int, threads_per_replica: int | None = None,
                 ray_address: str | None = None, routing_policy: str = "prefix", max_queue: int | None = None,
                 observer: Callable[[str, RequestOutput | str], None] | None = None):
        try:
            import ray
        except ImportError:
            raise InvalidParameterError("data_parallel_size", RAY_MISSING) from None
        for name, value in (("data_parallel_size", replicas), ("threads_per_replica", threads_per_replica)):
            if value is not None and value < 1:
                raise InvalidParameterError(name, f"must be at least 1, got {value}")
        threads = threads_per_replica or max(1, (os.cpu_count() or 1) // replicas)
        self.router = Router(routing_policy)  # checks the policy's name before anything starts
        self.max_queue = max_queue
        self.observer = observer or (lambda kind, item: None)
        self._ray = ray
        self._own_ray = not ray.is_initialized()  # connected here: disconnected (a local instance: stopped) at shutdown
        if not ray.is_initialized():
            # A local instance advertises enough CPUs for the replicas asked for: oversubscribing is the user's call.
            ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING,
                     **({} if ray_address else {"num_cpus": max(os.cpu_count() or 1, replicas * threads)}))
        threads_env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        gpus = 1 if engine_kwargs.get("device", "cuda" if torch.cuda.is_available() else "cpu") == "cuda" else 0
        actor_class = ray.remote(EngineReplica).options(  # Ray gives each replica a GPU of its own
            num_cpus=threads, num_gpus=gpus, max_restarts=-1, max_task_retries=0, runtime_env={"env_vars": threads_env})
        actors = [actor_class.remote(model, engine_kwargs, max_queue) for _ in range(replicas)]
        try:
            infos = ray.get([a.info.remote() for a in actors])
        except Exception as e:  # the first replica's build error, as a single engine would raise it
            for a in actors:
                ray.kill(a)
            raise _cause(e) from None
        info = infos[0]
        self.block_size = info.block_size
        self.router.block_size = info.block_size
        self.replicas = [ReplicaHandle(i, a, PrefixMirror(inf.kv_total_blocks), pid=inf.pid, node=inf.node)
                         for i, (a, inf) in enumerate(zip(actors, infos))]
        self.threads_per_replica = threads
        self._tokenizer = info.tokenizer
        self.engine = ReplicaView(info.model_name, info.tokenizer, info.max_model_len, info.speculative,
                                  info.generation_defaults, self.stats)
        self._stopped = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tokenmill-replicas", daemon=True)
        self._thread.start()
        log.info("tokenmill: %d replicas of %s on Ray, %d threads each, routing %s", replicas, info.model_name,
                 threads, routing_policy)

    # ---- called from the caller's event loop, or any thread -------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          prompt_text: str | None = None, priority: int = 0,
                          tenant: str | None = None) -> RequestStream:
        """Route the request and hand it to its replica; return its stream once that engine accepted it
        (raising the engine's error for a rejected one, as AsyncLLMEngine does)."""
        stream = RequestStream(self, request_id, asyncio.get_running_loop())
        added = asyncio.run_coroutine_threadsafe(
            self._add(request_id, prompt, params, prompt_text, priority, tenant, stream), self._loop)
        try:
            await asyncio.wrap_future(added)
        except BaseException:
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        if not self._stopped:
            self._loop.call_soon_threadsafe(self._abort, request_id)

    def end_all(self) -> None:
        """End every request in flight with ServerShutdownError."""
        self._loop.call_soon_threadsafe(self._end_all)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
        self._thread.join(timeout=10)
        for r in self.replicas:
            self._ray.kill(r.actor, no_restart=True)
        if self._own_ray:
            self._ray.shutdown()

    @property
    def num_in_flight(self) -> int:
        return sum(r.load for r in self.replicas)

    @property
    def num_queued(self) -> int:
        """Requests waiting beyond the free seats, over the replicas that are up (as of the last poll)."""
        return sum(r.stats.num_queued for r in self.replicas if r.up and r.stats is not None)

    @property
    def num_up(self) -> int:
        return sum(r.up for r in self.replicas)

    @property
    def alive(self) -> bool:
        """Whether some replica is up to take requests."""
        return self._thread.is_alive() and not self._stopped and self.num_up > 0

    def stats(self) -> EngineStats:
        """All replicas' latest snapshots merged (those of a replica down: its last one)."""
        return merge_stats([r.stats for r in self.replicas if r.stats is not None])

    def replica_stats(self) -> list[tuple[ReplicaHandle, EngineStats | None]]:
        return [(r, r.stats) for r in self.replicas]

    async def refresh_stats(self) -> None:
        """Read every replica's snapshot now (a /metrics scrape does, so that it shows the present)."""
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._read_stats(), self._loop))

    # ---- the replicas' thread ------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        for r in self.replicas:
            self._loop.create_task(self._pump(r))
        self._loop.create_task(self._poll_stats())
        self._loop.run_forever()

    async def _add(self, request_id, prompt, params, prompt_text, priority, tenant, stream) -> None:
        ids, hashes = [], []  # only prefix routing reads the prompt's tokens and block hashes
        if self.router.policy == "prefix":
            ids = prompt if isinstance(prompt, list) else self._tokenizer.encode(prompt) if self._tokenizer else []
            hashes = list(prefix_hashes(ids, self.block_size))
        failed: set[int] = set()  # replicas whose actor did not answer: they never took the request
        while True:
            up = [r for r in self.replicas if r.up and r.index not in failed]
            if not up:
                raise UnavailableError(f"no engine replica is up ({len(self.replicas) - self.num_up} of "
                                       f"{len(self.replicas)} restarting); retry shortly")
            replica = up[self.router.route(up, ids)]
            replica.in_flight[request_id] = stream  # before the call: its first outputs may come before the answer
            replica.kv.add(hashes)  # before the call too: requests routed meanwhile see where this prefix goes
            try:
                error = await replica.actor.add.remote(request_id, prompt, params, prompt_text, priority, tenant)
                break
            except self._ray.exceptions.RayActorError:  # dead or dying: its pump takes it out of routing
                replica.in_flight.pop(request_id, None)
                failed.add(replica.index)
        if error is not None:
            replica.in_flight.pop(request_id, None)
            raise error
        replica.routed += 1

    def _abort(self, request_id: str) -> None:
        for r in self.replicas:
            if r.in_flight.pop(request_id, None) is not None:
                if r.up:
                    r.actor.abort.remote(request_id)
                self.observer("abort", request_id)

    def _end_all(self) -> None:
        for r in self.replicas:
            for request_id, stream in list(r.in_flight.items()):
                r.actor.abort.remote(request_id)
                stream.put(ServerShutdownError())
                self.observer("abort", request_id)
            r.in_flight.clear()

    async def _pump(self, replica: ReplicaHandle) -> None:
        """Hand the replica's outputs to their streams; when it dies, end its requests and wait for it."""
        while True:
            await self._until_up(replica)
            try:
                async for ref in replica.actor.outputs.options(num_returns="streaming").remote():
                    self._deliver(replica, await ref)
            except Exception as e:
                self._lost(replica, e)

    def _deliver(self, replica: ReplicaHandle, batch: list[tuple[str, RequestOutput | Exception]]) -> None:
        for request_id, item in batch:
            stream = replica.in_flight.get(request_id)
            if stream is None:  # aborted here while its outputs were on their way
                continue
            if isinstance(item, Exception):
                replica.in_flight.pop(request_id)
                self.observer("error", request_id)
            elif item.finished:
                replica.in_flight.pop(request_id)
                self.observer("finished", item)
            stream.put(item)

    def _lost(self, replica: ReplicaHandle, error: Exception) -> None:
        """Take a replica that died out of routing and end its requests in flight."""
        if not replica.up:
            return
        replica.up = False
        replica.kv.clear()
        lost = list(replica.in_flight.items())
        replica.in_flight.clear()
        log.error("tokenmill: replica %d died (%s); ending its %d requests in flight, Ray restarts it",
                  replica.index, type(_cause(error)).__name__, len(lost))
        for request_id, stream in lost:
            replica.actor.abort.remote(request_id)  # in case it lives after all (a dropped connection)
            stream.put(ReplicaLostError(f"the engine replica serving this request ({replica.index}) died; "
                                        "the request was ended: retry it"))
            self.observer("error", request_id)

    async def _until_up(self, replica: ReplicaHandle) -> None:
        """Wait until a replica that died answers again (Ray restarted it), then let it take requests."""
        while not replica.up:
            try:
                info = await asyncio.wait_for(replica.actor.info.remote(), CALL_TIMEOUT)
            except Exception:
                await asyncio.sleep(0.2)
                continue
            if (info.pid, info.node) != (replica.pid, replica.node):
                replica.restarts += 1
                replica.pid, replica.node = info.pid, info.node
            replica.up = True
            log.info("tokenmill: replica %d is back (restarts: %d)", replica.index, replica.restarts)

    async def _stop(self) -> None:
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=5)
        self._loop.stop()

    async def _poll_stats(self) -> None:
        while True:
            await self._read_stats()
            await asyncio.sleep(STATS_INTERVAL)

    async def _read_stats(self) -> None:
        async def read(r: ReplicaHandle) -> None:
            try:
                r.stats = await asyncio.wait_for(r.actor.stats.remote(), CALL_TIMEOUT)
            except Exception:  # its pump sees a death; a slow answer keeps the last snapshot
                pass

        await asyncio.gather(*(read(r) for r in self.replicas if r.up))


def _cause(error: BaseException) -> BaseException:
    """The error a replica raised, out of Ray's wrapper."""
    return getattr(error, "cause", None) or error

"""Rank 0's side of tensor parallelism: start the worker processes (ranks 1..N-1) and end them.

Rank 0, the engine's own process, serves the rendezvous store on a free loopback port and starts
one local process per worker rank (`python -m tokenmill.engine.tp_worker SPEC`: the parent's main
module is not re-imported and nothing is pickled to start it). Once every worker has connected
to the store, all ranks join the process groups (executor/parallel.py); a worker that dies before
that fails the start at once. Each rank then loads the checkpoint itself, keeping its share, and
they meet at a barrier (`ready`). Ending broadcasts the end of plans and waits for the processes;
a worker whose rank 0 died fails its next wait (the connection closed) and exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from tokenmill.config import EngineConfig
from tokenmill.errors import InvalidParameterError, TensorParallelError
from tokenmill.executor.parallel import TensorParallel, join, serve_store

CONNECTED = "connected"  # the store's count of the workers that reached it
DYING_SECONDS = 0.5  # how long an error waits for a worker that may be ending to be gone
STOP_SECONDS = 30  # how long a worker may take to end after the end of plans before it is killed


@dataclass
class WorkerSpec:
    """What a worker needs to build the runner rank 0 builds (JSON, on its command line)."""

    rank: int
    world: int
    port: int  # rank 0's store
    source: str | None  # the model, as LLMEngine takes it (None: the embedded default)
    dtype: str
    device: str  # cpu, or this rank's GPU
    quantization: str | None
    group_size: int
    kv_cache_dtype: str
    num_blocks: int
    block_size: int
    max_model_len: int


class TensorParallelWorkers:
    """The worker processes of one engine; ended by `shutdown` or, at the latest, when the engine goes."""

    def __init__(self, procs: list[subprocess.Popen], tp: TensorParallel):
        self.procs = procs  # rank r is procs[r - 1]
        self.tp = tp
        tp.peers = partial(describe, procs)  # errors then say which worker died
        self._end = weakref.finalize(self, _end, procs, tp)

    def ready(self) -> None:
        """Wait until every rank has loaded its share."""
        self.tp.barrier()

    def shutdown(self) -> None:
        self._end()

    def kill(self) -> None:
        """End the workers at once (a start that failed: they may be anywhere in loading)."""
        self._end.detach()
        _end(self.procs, self.tp, graceful=False)


def start_workers(config: EngineConfig, device: torch.device, num_blocks: int,
                  max_model_len: int) -> tuple[TensorParallel, TensorParallelWorkers]:
    """Start ranks 1..N-1 of `config` and join the groups as rank 0: this process's TensorParallel and the workers."""
    opts = config.model
    world = opts.tensor_parallel_size
    if opts.source is not None and not isinstance(opts.source, (str, os.PathLike)):
        raise InvalidParameterError("tensor_parallel_size", "each rank loads the model itself: give it as a path "
                                                            "or hub id, not a loaded checkpoint")
    store = serve_store(world)
    specs = [WorkerSpec(rank, world, store.port, None if opts.source is None else os.fspath(opts.source),
                        str(opts.dtype).removeprefix("torch."), f"cuda:{rank}" if device.type == "cuda" else "cpu",
                        config.quantization.method, config.quantization.group_size, config.cache.kv_cache_dtype,
                        num_blocks, config.cache.block_size, max_model_len)
             for rank in range(1, world)]
    # The workers import this very tokenmill, wherever this process found it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                       os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-m", "tokenmill.engine.tp_worker", json.dumps(asdict(spec))], env=env)
             for spec in specs]
    try:
        while store.add(CONNECTED, 0) < world - 1:
            if any(p.poll() is not None for p in procs):
                raise TensorParallelError(f"a tensor-parallel worker ended before it joined ({describe(procs)}); "
                                          "its error is above")
            time.sleep(0.05)
        tp = join(store, 0, world, device)
    except BaseException:
        _end(procs, TensorParallel(), graceful=False)
        raise
    return tp, TensorParallelWorkers(procs, tp)


def describe(procs: list[subprocess.Popen]) -> str:
    """What became of each worker, e.g. "worker rank 1 exited with code -9" (a broken connection is often
    seen before its process is gone: each gets a moment to end)."""
    for p in procs:
        try:
            p.wait(timeout=DYING_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    return ", ".join(f"worker rank {rank} " + ("running" if p.poll() is None else f"exited with code {p.returncode}")
                     for rank, p in enumerate(procs, 1))


def _end(procs: list[subprocess.Popen], tp: TensorParallel, graceful: bool = True) -> None:
    """Tell the workers to end (if they can all still hear it) and wait for them; kill what does not end."""
    if graceful and tp.failed is None and all(p.poll() is None for p in procs):
        try:
            tp.send(None)
        except TensorParallelError:
            graceful = False
    else:
        graceful = False
    for p in procs:
        if not graceful:
            p.kill()
        try:
            p.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    tp.close()

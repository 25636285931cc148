"""Tensor parallelism's plumbing: the ranks' process groups, the collectives the layers call, the plan broadcast.

Every rank of a tensor-parallel engine runs the same forward on its share of the weights
(docs/architecture.md, "Tensor parallelism"). Two process groups join the ranks, over loopback
through a store that rank 0 serves:

- the compute group (gloo on CPU, NCCL on CUDA) carries the layers' all-reduces and the logits'
  all-gather. It has a timeout, so a rank that stops answering fails the step instead of hanging
  it; a rank that dies closes its connections, and gloo fails the others' next collective at once;
- the plan group (gloo, on CPU tensors even beside NCCL) carries rank 0's broadcast of each call's
  plan, and the start-up barrier. A worker waits on it for as long as the engine idles, so its
  timeout is practically none.

After one failure every later collective raises the same TensorParallelError: the ranks are out
of step for good.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from tokenmill.errors import TensorParallelError

HOST = "127.0.0.1"
COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # the longest a rank waits for the others inside a step (and at start)
IDLE_TIMEOUT = timedelta(days=365)  # a worker waits this long for rank 0's next plan


@dataclass(eq=False)
class TensorParallel:
    """This process's place among the ranks: rank, world size and the two groups. The default, world
    size 1, is a model on its own: the collectives return their input."""

    rank: int = 0
    world: int = 1
    plans: Any = None  # the plan group; the compute group is the default one
    peers: Callable[[], str] | None = None  # rank 0: what became of the worker processes, for errors
    failed: TensorParallelError | None = None

    @property
    def driver(self) -> bool:
        """Rank 0 of several: it schedules, broadcasts each plan and samples."""
        return self.world > 1 and self.rank == 0

    def share(self, size: int) -> slice:
        """This rank's part of `size` things (rows, heads), which the world size divides."""
        part = size // self.world
        return slice(self.rank * part, (self.rank + 1) * part)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x, in place: the row-parallel layers' partial outputs."""
        if self.world > 1:
            self._run("all-reduce", dist.all_reduce, x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x side by side along the last axis, in rank order: the vocabulary parts of logits."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._run("all-gather", dist.all_gather, parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def send(self, plan: Any) -> None:
        """Rank 0: broadcast a plan (plain lists and numbers; None ends the workers)."""
        self._run("plan broadcast", dist.broadcast_object_list, [plan], src=0, group=self.plans)

    def receive(self) -> Any:
        """A worker: wait for rank 0's next plan."""
        box = [None]
        self._run("plan broadcast", dist.broadcast_object_list, box, src=0, group=self.plans)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank got here (each has loaded its share)."""
        self._run("start-up barrier", dist.barrier, group=self.plans)

    def close(self) -> None:
        """Leave the groups (a model on its own has none); any later collective raises."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        self.failed = self.failed or TensorParallelError("the tensor-parallel ranks were shut down")

    def _run(self, what: str, op: Callable, *args, **kwargs) -> None:
        if self.failed is not None:
            raise self.failed
        try:
            op(*args, **kwargs)
        except RuntimeError as e:  # gloo and NCCL errors (a peer gone, a timeout) are RuntimeErrors
            peers = f"; {self.peers()}" if self.peers is not None else ""
            self.failed = TensorParallelError(f"tensor-parallel {what} failed on rank {self.rank}{peers}: {e}")
            raise self.failed from e


def serve_store(world: int) -> dist.TCPStore:
    """Rank 0: the rendezvous store, on a free loopback port (`.port`), before any worker starts."""
    return dist.TCPStore(HOST, 0, world, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)


def store_at(port: int, world: int) -> dist.TCPStore:
    """A worker: rank 0's store."""
    return dist.TCPStore(HOST, port, world, is_master=False, timeout=COLLECTIVE_TIMEOUT)


def join(store: dist.TCPStore, rank: int, world: int, device: torch.device) -> TensorParallel:
    """Make this process rank `rank` of `world` (every rank calls it; it returns once all have). One
    tensor-parallel engine per process: the compute group is the process's default group."""
    if dist.is_initialized():
        raise TensorParallelError("this process already holds a tensor-parallel engine; shut it down "
                                  "(LLMEngine.shutdown) before starting another")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    return TensorParallel(rank, world, dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT))

"""Which replica a new request goes to: by prefix-cache affinity balanced against load.

A replica that already holds a prompt's leading blocks skips their prefill, so "prefix" sends
a request where the longest block-aligned prefix of its prompt is cached (the same chain hashes
the KV manager registers), unless the replicas' loads (waiting + running sequences) have drifted
apart by more than `balance_threshold`, when the least loaded takes it (as SGLang's cache-aware
router does); ties go to the less loaded, then the lower index. "round_robin" and
"least_loaded" ignore the caches.
"""

from __future__ import annotations

import itertools
from typing import Container, Protocol, Sequence

from tokenmill.errors import InvalidParameterError
from tokenmill.kv.kv_cache_manager import KVCacheManager, prefix_hashes

ROUTING_POLICIES = ("prefix", "round_robin", "least_loaded")


class Routable(Protocol):
    """What the router reads of a replica."""

    kv: KVCacheManager

    @property
    def load(self) -> int:
        """Its waiting and running sequences."""


class Router:
    def __init__(self, policy: str = "prefix", block_size: int = 16, balance_threshold: int = 32):
        if policy not in ROUTING_POLICIES:
            raise InvalidParameterError("routing_policy", f"unknown routing policy {policy!r}; use "
                                                          f"{', '.join(ROUTING_POLICIES)}")
        self.policy = policy
        self.block_size = block_size
        self.balance_threshold = balance_threshold
        self._turn = itertools.count()

    def route(self, replicas: Sequence[Routable], token_ids: list[int], cache_salt: str | None = None,
              first_blocks: Container[int] | None = None) -> int:
        """The index of the replica that should serve a prompt of `token_ids`. `first_blocks`, if given,
        holds the hash of every prompt's first block that some replica caches: a prompt whose first
        block is not in it finds no replica holding its prefix, without asking each."""
        if self.policy == "round_robin":
            return next(self._turn) % len(replicas)
        loads = [r.load for r in replicas]
        candidates = range(len(replicas))
        if self.policy == "prefix" and max(loads) - min(loads) <= self.balance_threshold:
            # Block by block, keep the replicas that hold the prefix so far: most prompts stop at the first.
            first = first_blocks
            for block_hash in prefix_hashes(token_ids, self.block_size, cache_salt):
                if first is not None and block_hash not in first:
                    break
                first = None
                holding = [i for i in candidates if replicas[i].kv.holds_block(block_hash)]
                if not holding:
                    break
                candidates = holding
        return min(candidates, key=loads.__getitem__)  # candidates ascend, so a tie goes to the lower index

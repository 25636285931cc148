"""The paged KV cache's bookkeeping: reference-counted block ids and the cached full blocks.

Block 0 is the null block: it is never handed out, its KV stays zero, and padded
attention reads point at it so that they read finite values.

A block whose tokens are all computed can be registered as a `CachedBlock` (its prefix's
identity) under a hash. When no sequence references it any more it is not wiped: it waits
in a least-recently-used list, still findable, and is evicted only when an allocation finds
no never-cached block left. So "free" counts both kinds: both can be handed out now.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


class OutOfBlocksError(RuntimeError):
    """Raised only when a caller asks for more blocks than are free (the scheduler checks first)."""


@dataclass(eq=False, slots=True)
class CachedBlock:
    """What a cached block holds: `token_ids` right after the prefix `parent` (None: the first block).

    Identity, not the hash, is what a lookup trusts: a block matches only if its parent is the
    very entry the lookup matched one block earlier and its tokens and extra key are equal, so
    two prefixes whose hashes collide can never be mistaken for each other.
    """

    block_hash: int
    token_ids: tuple[int, ...]
    parent: CachedBlock | None
    extra_key: object
    block: int

    def matches(self, parent: CachedBlock | None, token_ids: tuple[int, ...], extra_key: object) -> bool:
        return self.parent is parent and self.token_ids == token_ids and self.extra_key == extra_key


class BlockPool:
    def __init__(self, num_blocks: int, first_blocks: dict[int, int] | None = None):
        """`first_blocks`, shared by several pools (the simulator's replicas), counts the pools that
        cache each prompt's first block (by hash), so that a router learns in one lookup that none
        holds a prompt's prefix."""
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self._first_blocks = first_blocks
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))  # unreferenced, holding nothing cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, oldest first
        self._by_hash: dict[int, CachedBlock] = {}
        self.cached_hashes = self._by_hash.keys()  # a live view, for membership tests
        self._entries: list[CachedBlock | None] = [None] * num_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: never-cached ones plus cached ones nobody uses."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        """The free blocks that still hold a cached prefix."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence, counted from the reference counts."""
        return sum(1 for refs in self._refs if refs)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, count: int) -> list[int]:
        """`count` blocks with no cached content, one reference each; evicts the oldest cached ones if needed."""
        if count > self.num_free_blocks:
            raise OutOfBlocksError(f"asked for {count} blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._uncache(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more reference to each block (a cache hit, a fork); a free cached block stops being evictable."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]  # KeyError: only a cached block can be taken back from the free ones
            self._refs[block] += 1

    def free(self, blocks) -> None:
        """Drop one reference from each block; unreferenced cached blocks join the newest end of the LRU list."""
        for block in blocks:
            if self._refs[block] <= 0:
                raise RuntimeError(f"block {block} freed twice or never allocated")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._entries[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ---- cached blocks ----------------------------------------------------------------------
    def lookup(self, block_hash: int) -> CachedBlock | None:
        return self._by_hash.get(block_hash)

    def is_cached(self, block: int) -> bool:
        return self._entries[block] is not None

    def cache(self, block: int, block_hash: int, token_ids: tuple[int, ...], parent: CachedBlock | None,
              extra_key: object) -> CachedBlock:
        """Register a full, computed block; return the entry that now stands for this prefix.

        An equal entry already registered (another sequence computed the same prefix) is
        returned and `block` stays uncached. A block whose parent is no longer cached is not
        registered: no lookup could reach it. Otherwise the hash is taken over, from a
        colliding or unreachable older entry if there is one.
        """
        existing = self._by_hash.get(block_hash)
        if existing is not None and existing.matches(parent, token_ids, extra_key):
            return existing
        entry = CachedBlock(block_hash, token_ids, parent, extra_key, block)
        if parent is not None and self._by_hash.get(parent.block_hash) is not parent:
            return entry
        if existing is not None:
            self._uncache(existing.block)
        self._by_hash[block_hash] = entry
        self._entries[block] = entry
        if parent is None and self._first_blocks is not None:
            self._first_blocks[block_hash] = self._first_blocks.get(block_hash, 0) + 1
        return entry

    def reset_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is in use."""
        if self.num_used_blocks:
            return False
        if self._first_blocks is not None:
            for entry in self._by_hash.values():
                if entry.parent is None:
                    self._forget(entry.block_hash)
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._by_hash.clear()
        self._entries = [None] * self.num_blocks
        return True

    def _uncache(self, block: int) -> None:
        entry = self._entries[block]
        self._entries[block] = None
        if self._by_hash.get(entry.block_hash) is entry:
            del self._by_hash[entry.block_hash]
            if entry.parent is None and self._first_blocks is not None:
                self._forget(entry.block_hash)
        if block in self._evictable:
            del self._evictable[block]
            self._free.append(block)

    def _forget(self, block_hash: int) -> None:
        """One pool fewer caches the first block `block_hash` (in the shared `first_blocks`)."""
        count = self._first_blocks[block_hash] - 1
        if count:
            self._first_blocks[block_hash] = count
        else:
            del self._first_blocks[block_hash]

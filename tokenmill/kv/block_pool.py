"""The paged KV cache's bookkeeping: a fixed set of block ids handed out and taken back.

Block 0 is the null block: it is never handed out, its KV stays zero, and padded
attention reads point at it so that they read finite values.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """Raised only when a caller asks for more blocks than are free (the scheduler checks first)."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._in_use: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(f"asked for {count} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        self._in_use.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            if block not in self._in_use:
                raise RuntimeError(f"block {block} freed twice or never allocated")
            self._in_use.remove(block)
            self._free.append(block)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_usable_blocks

"""Each sequence's KV blocks: prefix-cache lookups, growth with copy-on-write, forks, frees.

Prefix caching: a full block of computed tokens is registered under a hash chained from its
parent block's hash, so a later sequence with the same leading tokens takes those blocks
instead of recomputing them. The scheduler decides who runs; this module decides which
blocks they run in.

Writes never land in a block another sequence can read: before a sequence writes its next
token's KV, the block receiving it is replaced by a private copy if it is shared (a fork's
partly filled prompt block) or registered in the cache (a fully cached prompt whose last
token is recomputed for the first sample's logits). Rewriting a cached block in place would
be wrong even with the same token: a recomputed K/V need not be bit-identical (another batch
shape), and other sequences may read that block in the same step. The copies are queued for
the runner, which makes them before the step's forward pass; a copy costs one block of K/V
per layer, where backing off a whole block would recompute up to block_size tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from tokenmill.kv.block_pool import BlockPool, CachedBlock
from tokenmill.sequence import Sequence


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...], extra_key: object) -> int:
    """The chain hash of a full block (collisions only cost a miss: lookups verify the tokens)."""
    return hash((parent_hash, token_ids, extra_key))


def prefix_hashes(token_ids: list[int], block_size: int, extra_key: object = None) -> Iterator[int]:
    """The chain hashes of the full blocks of `token_ids`, as the KV manager registers them (lazily)."""
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, tuple(token_ids[start:start + block_size]), extra_key)
        yield parent


@dataclass
class PrefixCacheStats:
    """Prefix-cache counters since the engine started, in prompt tokens (monotonic, for metrics)."""

    queries_tokens: int = 0  # tokens of every admitted sequence (a preempted one again on recompute)
    hit_tokens: int = 0  # of those, the tokens found in the cache and not recomputed

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queries_tokens if self.queries_tokens else 0.0


@dataclass
class PrefixHit:
    """The cached leading blocks of a sequence, and how many of its tokens they let it skip."""

    blocks: list[CachedBlock] = field(default_factory=list)
    num_tokens: int = 0


class KVCacheManager:
    """Owns every sequence's block table and chain hashes, by seq_id. The scheduler owns the counts
    (a sequence's computed tokens) and passes them in; this class never writes a Sequence."""

    def __init__(self, pool: BlockPool, block_size: int, enable_prefix_caching: bool = True):
        self.pool = pool
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._tables: dict[int, list[int]] = {}  # seq_id -> its blocks, in token order
        self._hashes: dict[int, list[int]] = {}  # seq_id -> chain hashes of its full blocks (tokens only grow)
        self._tokens: dict[int, list[tuple[int, ...]]] = {}  # seq_id -> the tokens of those blocks
        self._chains: dict[int, list[CachedBlock]] = {}  # seq_id -> entries of its leading full blocks
        self._copies: list[tuple[int, int]] = []  # (source, destination) blocks for the next step

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's blocks (empty when it holds none); the runner reads it, only this class writes it."""
        return self._tables.get(seq_id, [])

    def lookup(self, seq: Sequence) -> PrefixHit:
        """The longest cached prefix of full blocks; changes nothing.

        At most num_tokens - 1 tokens are skipped, so the last one is computed and gives the
        logits of the first sample. When every block is cached, that token's block is the
        last hit, which `allocate` replaces by a private copy before it is written.
        """
        if not self.enable_prefix_caching or seq.needs_prompt_logits:  # prompt logprobs need every position's logits
            return PrefixHit()
        bs = self.block_size
        hit = PrefixHit()
        parent = None
        hashes = self._chain_hashes(seq, seq.num_tokens // bs)
        for block_hash, tokens in zip(hashes, self._tokens.get(seq.seq_id, ())):
            entry = self.pool.lookup(block_hash)
            if entry is None or not entry.matches(parent, tokens, seq.cache_salt):
                break
            hit.blocks.append(entry)
            parent = entry
        hit.num_tokens = min(len(hit.blocks) * bs, seq.num_tokens - 1)
        return hit

    def holds_block(self, block_hash: int) -> bool:
        """Whether a block of this chain hash (`prefix_hashes`) is cached here; changes nothing. For a
        router's estimate: unlike `lookup`, the tokens are not checked."""
        return self.enable_prefix_caching and block_hash in self.pool.cached_hashes

    def blocks_to_admit(self, hit: PrefixHit, num_tokens: int) -> int:
        """Free blocks `allocate(seq, hit, num_tokens)` would take (cached hits nobody holds included)."""
        hit_blocks = [e.block for e in hit.blocks]
        reclaimed = sum(1 for b in hit_blocks if self.pool.ref_count(b) == 0)  # taken out of the free ones
        recompute_cached = hit.num_tokens < len(hit_blocks) * self.block_size
        return reclaimed + self._blocks_needed(len(hit_blocks), recompute_cached, num_tokens)

    def blocks_to_grow(self, seq_id: int, num_computed: int, num_tokens: int) -> int:
        """Free blocks `grow(seq_id, num_computed, num_tokens)` would take."""
        table = self.block_table(seq_id)
        return self._blocks_needed(len(table), self._copy_needed(table, num_computed), num_tokens)

    def allocate(self, seq: Sequence, hit: PrefixHit, num_tokens: int) -> bool:
        """Admit `seq` on its cached prefix (it has computed hit.num_tokens) with room for `num_tokens`
        tokens; False (no change) if short."""
        if self.blocks_to_admit(hit, num_tokens) > self.pool.num_free_blocks:
            return False
        hit_blocks = [e.block for e in hit.blocks]
        self.pool.share(hit_blocks)
        self._tables[seq.seq_id] = hit_blocks
        self._chains[seq.seq_id] = list(hit.blocks)
        if self.enable_prefix_caching:
            self.stats.queries_tokens += seq.num_tokens
            self.stats.hit_tokens += hit.num_tokens
        return self.grow(seq.seq_id, hit.num_tokens, num_tokens)

    def grow(self, seq_id: int, num_computed: int, num_tokens: int) -> bool:
        """Blocks for `num_tokens` tokens, the next one written (after `num_computed`) made private;
        False (no change) if short."""
        table = self._tables.setdefault(seq_id, [])
        first = num_computed // self.block_size  # the block the next token's KV goes to
        copy = self._copy_needed(table, num_computed)
        if self._blocks_needed(len(table), copy, num_tokens) > self.pool.num_free_blocks:
            return False
        if copy:
            (private,) = self.pool.allocate(1)
            self._copies.append((table[first], private))
            self.pool.free([table[first]])
            table[first] = private
        table.extend(self.pool.allocate(max(0, -(-num_tokens // self.block_size) - len(table))))
        return True

    def trim(self, seq_id: int, num_computed: int) -> None:
        """Give back the blocks past the computed tokens: after a verification they held only
        rejected draft tokens, so nothing stale stays reachable through the block table."""
        table = self.block_table(seq_id)
        keep = -(-num_computed // self.block_size)
        if len(table) > keep:
            self.pool.free(reversed(table[keep:]))
            del table[keep:]

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of its parent (the same prompt); copy-on-write keeps them apart."""
        table = self.block_table(parent_id)
        self.pool.share(table)
        self._tables[child_id] = list(table)
        self._hashes[child_id] = list(self._hashes.get(parent_id, []))
        self._tokens[child_id] = list(self._tokens.get(parent_id, []))
        self._chains[child_id] = list(self._chains.get(parent_id, []))

    def free(self, seq_id: int) -> None:
        """Give the sequence's blocks back; its full blocks stay cached until evicted."""
        # Last block first: the LRU list then evicts a prefix from its end, keeping its head reachable.
        self.pool.free(reversed(self._tables.pop(seq_id, [])))
        self._hashes.pop(seq_id, None)
        self._tokens.pop(seq_id, None)
        self._chains.pop(seq_id, None)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that the last step filled with computed tokens (prompt or generated)."""
        if not self.enable_prefix_caching:
            return
        chain = self._chains.setdefault(seq.seq_id, [])
        full = seq.num_computed_tokens // self.block_size
        if full <= len(chain):  # most decode steps fill no block
            return
        hashes = self._chain_hashes(seq, full)
        tokens = self._tokens[seq.seq_id]
        table = self.block_table(seq.seq_id)
        cache, salt = self.pool.cache, seq.cache_salt
        for i in range(len(chain), full):
            chain.append(cache(table[i], hashes[i], tokens[i], chain[-1] if chain else None, salt))

    def take_copies(self) -> list[tuple[int, int]]:
        """The block copies queued since the last call, for the runner to make before the next forward."""
        copies, self._copies = self._copies, []
        return copies

    def _copy_needed(self, table: list[int], num_computed: int) -> bool:
        """Whether the block the next token's KV goes to is shared or cached, so must be copied first."""
        first = num_computed // self.block_size
        return first < len(table) and (self.pool.ref_count(table[first]) > 1 or self.pool.is_cached(table[first]))

    def _blocks_needed(self, num_blocks: int, copy: bool, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_blocks) + copy

    def _chain_hashes(self, seq: Sequence, count: int) -> list[int]:
        """The chain hashes of the first `count` full blocks, computed once per sequence (their
        tokens kept beside them in `_tokens`)."""
        hashes = self._hashes.setdefault(seq.seq_id, [])
        if len(hashes) < count:
            tokens = self._tokens.setdefault(seq.seq_id, [])
            bs, ids, salt = self.block_size, seq.token_ids, seq.cache_salt
            parent = hashes[-1] if hashes else None
            for start in range(len(hashes) * bs, count * bs, bs):
                block = tuple(ids[start:start + bs])
                parent = hash_block(parent, block, salt)
                hashes.append(parent)
                tokens.append(block)
        return hashes

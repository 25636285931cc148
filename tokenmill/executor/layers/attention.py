"""Attention over the paged KV cache, for one flat batch of prefill chunks and decodes.

The cache of each layer (kv_cache.py) holds [num_slots, 2, kv_heads, head_dim] (K then V);
slot `block * block_size + offset` holds one token. Each step writes the new tokens' K/V to their
slots, then reads every sequence's context back through its block table. Decodes (one query
each) and short spans after a cached context (up to SHORT_SPAN queries: the k + 1 tokens a
speculative verification computes, a draft model's catch-up) are attended in a few padded SDPA
calls, one per group of similar context lengths (a gather of the padded context is most of a
decode step's attention cost, so padding a short context to the longest one would waste it);
a span's queries are padded to the group's longest span and masked causally. Each longer
prefill chunk gets its own call with a causal mask shifted by the tokens already cached. Query heads that share a KV head
are folded into the query-length axis, so grouped-query attention needs no K/V copies.
With an 8-bit cache a first prefill chunk also reads its K/V back from the cache, so every
token attends to the same quantized K/V whichever step computes it.

Where tokenmill's CPU kernels run (float32 model and cache), every query row, of a decode or of a
prefill chunk alike, is instead attended row by row by `row_attention`, straight from the cache
blocks (no gather, no padding, and about twice as fast as SDPA with a shifted causal mask): each
query row sees its own context only, so its result depends neither on its neighbours nor on how
its prompt was cut into chunks, and every step can run all layers in one fused call
(`RowBatch.whole`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.executor.kernels import lowbit
from tokenmill.executor.layers.kv_cache import KVCache


@dataclass
class DecodeGroup:
    """B sequences with Q queries each at most (1 for decodes), attended in one padded call."""

    rows: torch.Tensor | None  # [B, Q] rows of the flat batch; a short span's padding repeats its last row;
    # None: every row of the batch is one decode, in order
    slots: torch.Tensor  # [B, L] cache slots of each sequence's context, padded with null slots
    mask: torch.Tensor | None  # [B, 1, Q * group, L] True where attended; None if nothing is masked
    valid: torch.Tensor | None  # [B, Q] the real (not padding) queries; None: all are real


@dataclass
class PrefillChunk:
    start: int  # first row of the chunk in the flat batch
    end: int
    slots: torch.Tensor | None  # [L] cache slots of the context; None: the context is just the new tokens
    mask: torch.Tensor  # [Q * group, L] True where attended (causal, shifted by cached tokens)


@dataclass
class RowBatch:
    """Query rows attended one by one from the cache: decodes, and each row of a span."""

    rows: torch.Tensor  # [R] rows of the flat batch
    tables: torch.Tensor  # [R, blocks] int64: each row's block table, padded with the null block
    lens: torch.Tensor  # [R] int64: each row's context length, itself included
    whole: bool  # the rows are the whole batch, in order


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decodes: list[DecodeGroup]
    prefills: list[PrefillChunk]
    row_batch: RowBatch | None = None  # set instead of `decodes` where row attention runs
    block_size: int = 16
    sliding_window: int | None = None


# A decode group's shortest context is at least this fraction of its longest.
DECODE_GROUP_MIN_FILL = 0.7
# Spans of at most this many tokens after a cached context are attended like decodes.
SHORT_SPAN = 16


def build_metadata(
    block_tables: list[list[int]],
    starts: list[int],
    lengths: list[int],
    block_size: int,
    group: int,
    sliding_window: int | None,
    device: torch.device,
    row_attention: bool = False,
) -> AttentionMetadata:
    """Index tensors for one step: sequence i computes positions starts[i] .. starts[i]+lengths[i]-1.
    With `row_attention`, every query row of every span (decodes and prefill chunks alike) goes into one
    RowBatch, instead of padded decode groups and SDPA prefill calls."""
    slot_mapping: list[int] = []
    decode_rows: list[int] = []  # first row of each span attended by rows: a decode, a short span, or with
    # row_attention any span
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []  # its context length, new tokens included
    decode_queries: list[int] = []  # its new tokens
    prefills: list[PrefillChunk] = []
    row = 0
    for table, start, length in zip(block_tables, starts, lengths):
        end = start + length
        slot_mapping.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        if row_attention or length == 1 or (start > 0 and length <= SHORT_SPAN):
            decode_rows.append(row)
            decode_tables.append(table)
            decode_lens.append(end)
            decode_queries.append(length)
        else:
            slots = None if start == 0 else _slots(torch.tensor(table, dtype=torch.long), end, block_size).to(device)
            mask = _causal_mask(start, end, sliding_window).repeat_interleave(group, dim=0).to(device)
            prefills.append(PrefillChunk(row, row + length, slots, mask))
        row += length
    slot_t = torch.tensor(slot_mapping, dtype=torch.long, device=device)
    if row_attention:
        batch = _row_batch(decode_rows, decode_tables, decode_lens, decode_queries, row, device) if decode_rows else None
        return AttentionMetadata(slot_t, [], prefills, batch, block_size, sliding_window)
    decodes = []
    order = sorted(range(len(decode_rows)), key=lambda i: -decode_lens[i])
    while order:
        longest = decode_lens[order[0]]
        take = [i for i in order if decode_lens[i] >= DECODE_GROUP_MIN_FILL * longest]
        order = order[len(take):]
        take.sort()  # rows in batch order, so a group that is the whole batch needs no row index
        decodes.append(_decode_group([decode_rows[i] for i in take], [decode_tables[i] for i in take],
                                     [decode_lens[i] for i in take], [decode_queries[i] for i in take],
                                     block_size, group, sliding_window, device))
    if len(decodes) == 1 and not prefills and decodes[0].valid is None and decodes[0].rows.shape[1] == 1:
        decodes[0].rows = None  # the group is the whole batch of decodes, in order
    return AttentionMetadata(slot_t, decodes, prefills, None, block_size, sliding_window)


def _row_batch(first_rows, tables, lens, queries, total_rows, device) -> RowBatch:
    """Every query row of the spans: span i's rows first_rows[i] .. + queries[i] - 1 see its context up
    to themselves."""
    counts = torch.tensor(queries)
    first = torch.tensor(first_rows).repeat_interleave(counts)
    offset = torch.arange(int(counts.sum())) - (counts.cumsum(0) - counts).repeat_interleave(counts)
    rows = first + offset
    row_lens = (torch.tensor(lens) - counts).repeat_interleave(counts) + offset + 1
    width = max(len(t) for t in tables)
    padded = torch.zeros(len(tables), width, dtype=torch.long)  # 0 = the null block
    for i, t in enumerate(tables):
        padded[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    whole = len(rows) == total_rows and bool((rows == torch.arange(total_rows)).all())
    return RowBatch(rows.to(device), padded.repeat_interleave(counts, dim=0).to(device), row_lens.to(device), whole)


def _slots(table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(length)
    return table[pos // block_size] * block_size + pos % block_size


def _causal_mask(start: int, end: int, window: int | None) -> torch.Tensor:
    """[end - start, end] bool: query at position q sees keys k <= q (and q - k < window)."""
    q = torch.arange(start, end)[:, None]
    k = torch.arange(end)[None, :]
    mask = k <= q
    if window is not None:
        mask &= q - k < window
    return mask


def _decode_group(rows, tables, lens, queries, block_size, group, window, device) -> DecodeGroup:
    max_len, max_q = max(lens), max(queries)
    max_blocks = -(-max_len // block_size)
    table = torch.zeros(len(tables), max_blocks, dtype=torch.long)  # 0 = null block
    for i, t in enumerate(tables):
        table[i, : len(t[:max_blocks])] = torch.tensor(t[:max_blocks], dtype=torch.long)
    pos = torch.arange(max_len)
    slots = table[:, pos // block_size] * block_size + pos % block_size
    lens_t, queries_t = torch.tensor(lens), torch.tensor(queries)
    j = torch.arange(max_q)
    # Query j of a span sits at position lens - queries + j; padding queries repeat the last one.
    q_pos = lens_t[:, None] - queries_t[:, None] + torch.minimum(j[None, :], queries_t[:, None] - 1)  # [B, Q]
    attended = pos[None, None, :] <= q_pos[:, :, None]  # [B, Q, L]: causal, and never past the context
    if window is not None:
        attended &= pos[None, None, :] > q_pos[:, :, None] - window
    seen = attended.any(dim=1)  # [B, L]: slots some query reads; the others point at the null block
    slots = torch.where(seen, slots, torch.zeros_like(slots))
    rows_t = torch.tensor(rows)[:, None] + torch.minimum(j[None, :], queries_t[:, None] - 1)
    if bool(attended.all()):
        mask = None
    else:  # decodes: one row for all G heads (broadcast); spans: each query's row repeated for its G heads
        mask = (attended[:, None] if max_q == 1 else attended.repeat_interleave(group, dim=1)[:, None]).to(device)
    valid = None if max_q == 1 or bool((queries_t == max_q).all()) else (j[None, :] < queries_t[:, None]).to(device)
    return DecodeGroup(rows_t.to(device), slots.to(device), mask, valid)


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    kv: torch.Tensor,  # [T, 2, kv_heads, head_dim]: the new tokens' K and V
    cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write the new K/V into the cache and attend; returns [T, heads * head_dim]."""
    cache.write(meta.slot_mapping, kv)
    tokens, heads, head_dim = q.shape
    kv_heads = kv.shape[2]
    group = heads // kv_heads
    rb = meta.row_batch
    if rb is not None and rb.whole:
        return _row_attention(q, cache, rb, meta, scale)
    if len(meta.decodes) == 1 and meta.decodes[0].rows is None:  # all decodes, one group: nothing to scatter
        return _decode_attention(q, cache, meta.decodes[0], kv_heads, group, scale).reshape(tokens, heads * head_dim)
    out = torch.empty(tokens, heads * head_dim, dtype=q.dtype, device=q.device)
    if rb is not None:
        out[rb.rows] = _row_attention(q[rb.rows], cache, rb, meta, scale)
    for d in meta.decodes:
        o = _decode_attention(q[d.rows], cache, d, kv_heads, group, scale)  # [B, Q, heads * hd]
        if d.valid is None:
            out[d.rows.reshape(-1)] = o.reshape(-1, heads * head_dim)
        else:
            out[d.rows[d.valid]] = o[d.valid]
    for p in meta.prefills:
        n = p.end - p.start
        # [Q, kvh, G, hd] -> [1, kvh, Q * G, hd]: query heads of one KV head become extra query rows
        # (4-D, so that SDPA takes its fused CPU kernel rather than the unfused math path).
        qp = q[p.start:p.end].view(n, kv_heads, group, head_dim).permute(1, 0, 2, 3).reshape(1, kv_heads, n * group, head_dim)
        if p.slots is not None:
            ctx = cache.read(p.slots)  # [L, 2, kvh, hd]
        else:
            ctx = cache.read(meta.slot_mapping[p.start:p.end]) if cache.quantized else kv[p.start:p.end]
        o = F.scaled_dot_product_attention(qp, ctx[None, :, 0].transpose(1, 2), ctx[None, :, 1].transpose(1, 2),
                                           attn_mask=p.mask, scale=scale)  # [1, kvh, Q*G, hd]
        out[p.start:p.end] = o.view(kv_heads, n, group, head_dim).permute(1, 0, 2, 3).reshape(n, heads * head_dim)
    return out


def _row_attention(q, cache: KVCache, rb: RowBatch, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    return lowbit().row_attention(q, cache.data, rb.tables, rb.lens, meta.block_size, meta.sliding_window or 0, scale)


def _decode_attention(q, cache, d: DecodeGroup, kv_heads: int, group: int, scale: float) -> torch.Tensor:
    """Q queries per sequence ([B, Q, heads, hd], or [B, heads, hd] for the whole-batch decode), all
    sequences in one padded SDPA call; returns [B, Q, heads * hd] ([B, kvh, G, hd] for the latter)."""
    batch, length = d.slots.shape
    ctx = cache.read(d.slots.view(-1)).view(batch, length, *cache.data.shape[1:])  # [B, L, 2, kvh, hd]
    k, v = ctx[:, :, 0].transpose(1, 2), ctx[:, :, 1].transpose(1, 2)
    if q.dim() == 3:  # one decode per sequence: the G query heads of a KV head are its query rows
        return F.scaled_dot_product_attention(q.view(-1, kv_heads, group, q.shape[-1]), k, v, attn_mask=d.mask,
                                              scale=scale)
    _, queries, heads, head_dim = q.shape
    # [B, Q, kvh, G, hd] -> [B, kvh, Q * G, hd]: query j's heads of KV head h are rows j*G .. j*G+G-1
    qd = q.view(batch, queries, kv_heads, group, head_dim).permute(0, 2, 1, 3, 4).reshape(
        batch, kv_heads, queries * group, head_dim)
    o = F.scaled_dot_product_attention(qd, k, v, attn_mask=d.mask, scale=scale)
    return o.view(batch, kv_heads, queries, group, head_dim).permute(0, 2, 1, 3, 4).reshape(
        batch, queries, heads * head_dim)

"""Prefix caching and shared-prompt sampling: the pool and hash chain alone, then whole engines.

The engines use blocks of 16 tokens (the unit tests, 4). A request's num_cached_tokens is the
number of leading tokens it skipped: its cached full blocks, but at most prompt_len - 1 (the
last prompt token is always computed, for the first sample's logits). So for a prompt seen
before in full, num_cached_tokens = min(prompt_len // 16 * 16, prompt_len - 1).
"""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.entrypoints.cli import build_parser, engine_kwargs
from tokenmill.kv import kv_cache_manager
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.kv_cache_manager import KVCacheManager
from tokenmill.sequence import Sequence

from test_scheduler import fake_step, make_scheduler, make_seq

BS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


# ---- the pool and the hash chain, without a model ------------------------------------------


def seq_of(tokens: list[int], salt: str | None = None) -> Sequence:
    return Sequence("r", 0, list(tokens), SamplingParams(), 0.0, cache_salt=salt)


def computed(kv: KVCacheManager, tokens: list[int], salt: str | None = None) -> Sequence:
    """A sequence admitted, its tokens all computed and its full blocks registered, still holding them."""
    seq = seq_of(tokens, salt)
    hit = kv.lookup(seq)
    assert kv.allocate(seq, hit, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    kv.cache_full_blocks(seq)
    return seq


def assert_accounted(pool: BlockPool) -> None:
    """Every usable block is exactly one of: never-cached free, evictable (cached, free), referenced."""
    free, evictable = set(pool._free), set(pool._evictable)
    used = {b for b in range(1, pool.num_blocks) if pool.ref_count(b)}
    assert not (free & evictable) and not (free & used) and not (evictable & used)
    assert free | evictable | used == set(range(1, pool.num_blocks))
    assert len(free) == len(pool._free) and pool.ref_count(0) == 0
    assert all(pool.is_cached(b) for b in evictable) and not any(pool.is_cached(b) for b in free)


def test_pool_keeps_freed_cached_blocks_and_evicts_least_recently_used_first():
    pool = BlockPool(1 + 4)
    kv = KVCacheManager(pool, 4)
    a = computed(kv, [1, 2, 3, 4, 5, 6, 7, 8])  # two full blocks, both registered
    head, tail = kv.block_table(a.seq_id)
    kv.free(a.seq_id)
    assert pool.num_free_blocks == 4 and pool.num_evictable_blocks == 2 and pool.num_used_blocks == 0
    assert_accounted(pool)
    fresh = pool.allocate(2)  # never-cached blocks go first: the cache survives
    assert not {head, tail} & set(fresh) and pool.num_evictable_blocks == 2
    (evicted,) = pool.allocate(1)  # then the oldest: a's last block (freed first), not its head
    assert evicted == tail
    assert [e.block for e in kv.lookup(seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9])).blocks] == [head]
    pool.free(fresh + [evicted])
    with pytest.raises(RuntimeError, match="twice"):
        pool.free([evicted])
    assert_accounted(pool)


def test_hits_need_equal_tokens_parent_and_salt():
    kv = KVCacheManager(BlockPool(1 + 16), 4)
    a = computed(kv, list(range(10)))  # blocks [0..3], [4..7]; 2 tokens left over
    kv.free(a.seq_id)
    assert kv.lookup(seq_of(list(range(10)))).num_tokens == 8
    assert kv.lookup(seq_of(list(range(8)))).num_tokens == 7  # all cached: back off one token
    assert kv.lookup(seq_of(list(range(8)) + [99])).num_tokens == 8
    assert kv.lookup(seq_of([0, 1, 2, 9] + list(range(4, 10)))).num_tokens == 0  # first block differs
    assert kv.lookup(seq_of([9, 9, 9, 9] + list(range(4, 10)))).num_tokens == 0  # same second block, other parent
    assert kv.lookup(seq_of(list(range(10)), salt="tenant-b")).num_tokens == 0
    salted = computed(kv, list(range(10)), salt="tenant-b")
    kv.free(salted.seq_id)
    assert kv.lookup(seq_of(list(range(10)), salt="tenant-b")).num_tokens == 8


def test_a_colliding_parent_hash_is_a_miss_not_wrong_kv(monkeypatch):
    """Hashes that ignore the parent and the token order: [1,2,3,4] and [4,3,2,1] collide, and a
    block's hash does not depend on what precedes it. Only the verification keeps prefixes apart."""
    monkeypatch.setattr(kv_cache_manager, "hash_block", lambda parent, tokens, extra: hash(tuple(sorted(tokens))))
    kv = KVCacheManager(BlockPool(1 + 16), 4)
    x, y, z, w = [1, 2, 3, 4], [5, 6, 7, 8], [4, 3, 2, 1], [9, 9, 9, 9]
    kv.free(computed(kv, x + y + [0]).seq_id)
    kv.free(computed(kv, z + w + [0]).seq_id)  # takes the hash of x's block over
    hit = kv.lookup(seq_of(z + y + [0]))
    # z's block is right; y's cached block follows x, not z: its KV would be wrong, so it misses.
    assert hit.num_tokens == 4
    assert kv.lookup(seq_of(x + y + [0])).num_tokens == 0  # x's block lost its hash: a plain miss
    assert_accounted(kv.pool)


def test_fork_shares_blocks_and_copies_the_partial_one_on_write():
    kv = KVCacheManager(BlockPool(1 + 16), 4)
    parent = computed(kv, list(range(6)))  # one full block, one holding 2 tokens
    children = [seq_of(list(range(6))) for _ in range(2)]
    for child in children:
        kv.fork(parent.seq_id, child.seq_id)
        child.num_computed_tokens = 6
    full, partial = kv.block_table(parent.seq_id)
    assert kv.pool.ref_count(full) == kv.pool.ref_count(partial) == 3
    for seq in [parent] + children:
        assert kv.grow(seq.seq_id, seq.num_computed_tokens, 7)
    assert [kv.block_table(s.seq_id)[0] for s in [parent] + children] == [full] * 3  # full blocks stay shared
    lasts = [kv.block_table(s.seq_id)[1] for s in [parent] + children]
    assert len(set(lasts)) == 3 and lasts[2] == partial  # the last writer keeps the original
    assert kv.take_copies() == [(partial, lasts[0]), (partial, lasts[1])]
    for seq in [parent] + children:
        kv.free(seq.seq_id)
    assert kv.pool.num_used_blocks == 0
    assert_accounted(kv.pool)


def test_fully_cached_prompt_recomputes_its_last_token_in_a_private_copy():
    kv = KVCacheManager(BlockPool(1 + 16), 4)
    first = computed(kv, list(range(8)))
    again = seq_of(list(range(8)))
    hit = kv.lookup(again)
    assert hit.num_tokens == 7 and len(hit.blocks) == 2
    assert kv.allocate(again, hit, 8)
    assert kv.block_table(again.seq_id)[0] == kv.block_table(first.seq_id)[0]
    assert kv.block_table(again.seq_id)[1] != kv.block_table(first.seq_id)[1]  # never write into a cached block
    assert kv.take_copies() == [(kv.block_table(first.seq_id)[1], kv.block_table(again.seq_id)[1])]
    kv.free(first.seq_id)
    kv.free(again.seq_id)
    assert_accounted(kv.pool)


def test_reset_is_refused_while_blocks_are_in_use():
    kv = KVCacheManager(BlockPool(1 + 8), 4)
    a = computed(kv, list(range(9)))
    assert not kv.pool.reset_cache()
    assert kv.lookup(seq_of(list(range(9)))).num_tokens == 8
    kv.free(a.seq_id)
    assert kv.pool.reset_cache()
    assert kv.pool.num_evictable_blocks == 0 and kv.lookup(seq_of(list(range(9)))).num_tokens == 0
    assert_accounted(kv.pool)


def test_preempted_sequence_recomputes_from_its_cached_blocks():
    # 7 blocks of 4 tokens; each sequence ends at 22 tokens (6 blocks), so `new` is preempted.
    sched = make_scheduler(1 + 7, 4, max_num_seqs=4, max_num_batched_tokens=100)
    old, new = make_seq(8, 14, 0.0), make_seq(8, 14, 1.0)
    old.prompt_token_ids = list(range(100, 108))  # nothing shared with `new`
    old.token_ids = list(old.prompt_token_ids)
    sched.add(old)
    sched.add(new)
    finished: list[Sequence] = []
    while not fake_step(sched, finished).preempted:
        pass
    assert new.num_preemptions == 1
    restart = None
    while sched.has_unfinished():
        for chunk in fake_step(sched, finished).chunks:
            if chunk.seq is new and restart is None:
                restart = chunk
    # `old` grew into `new`'s freed blocks last block first (the least recently used): the head was left.
    assert restart.start == 4
    assert {s.num_output_tokens for s in finished} == {14}
    assert_accounted(sched.kv.pool)


# ---- whole engines --------------------------------------------------------------------------


def tiny_llm(tiny_models, caching: bool = True, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", "16MiB")
    return LLM(str(tiny_models["llama"]), dtype="float32", block_size=BS, enable_prefix_caching=caching, **kwargs)


def token_ids(outs) -> list[list[int]]:
    return [[o.token_ids for o in out.outputs] for out in outs]


def kv_bytes(llm: LLM) -> int:
    return llm.engine.model_config.kv_bytes_per_token(torch.float32)


@pytest.mark.parametrize("quantization", ["auto", "int4"])
def test_shared_system_prompt_greedy_same_with_and_without_cache(tiny_models, quantization):
    rng = random.Random(0)
    system = [rng.randrange(3, 256) for _ in range(300)]
    prompts = [system + [rng.randrange(3, 256) for _ in range(rng.randint(5, 40))] for _ in range(32)]
    on = tiny_llm(tiny_models, quantization=quantization)
    off = tiny_llm(tiny_models, caching=False, quantization=quantization)
    outs = on.generate(prompts, GREEDY, use_tqdm=False)
    assert token_ids(outs) == token_ids(off.generate(prompts, GREEDY, use_tqdm=False))
    # The first step admits what its 2048-token budget holds, all misses; later ones reuse the
    # system prompt's 18 full blocks (288 tokens).
    cached = [o.num_cached_tokens for o in outs]
    assert set(cached) == {0, 288} and cached.count(288) >= 24
    stats = on.engine.stats().prefix_cache
    assert stats.hit_tokens == sum(cached) and stats.queries_tokens == sum(map(len, prompts))
    assert stats.hit_rate == pytest.approx(sum(cached) / sum(map(len, prompts)))
    assert on.engine.runner.num_computed_tokens == off.engine.runner.num_computed_tokens - sum(cached)
    assert off.engine.stats().prefix_cache.queries_tokens == 0


def test_conversation_replayed_turn_by_turn_reuses_earlier_replies(tiny_models):
    rng = random.Random(1)
    params = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
    on, off = tiny_llm(tiny_models), tiny_llm(tiny_models, caching=False)
    prompt = [rng.randrange(3, 256) for _ in range(37)]
    previous = None
    for turn in range(5):
        out = on.generate([prompt], params, use_tqdm=False)[0]
        assert token_ids([out]) == token_ids(off.generate([prompt], params, use_tqdm=False))
        if previous is not None:
            # Every full block of the previous turn's computed tokens: its prompt and its reply but
            # the reply's last token, which was sampled and never run through the model.
            assert out.num_cached_tokens == (previous - 1) // BS * BS
        reply = out.outputs[0].token_ids
        previous = len(prompt) + len(reply)
        prompt = prompt + reply + [rng.randrange(3, 256) for _ in range(rng.randint(3, 20))]


@pytest.mark.parametrize("prompt_len, cached", [(32, 31), (33, 32), (37, 32)])
def test_identical_prompt_computes_only_what_is_not_cached(tiny_models, prompt_len, cached):
    """32 tokens: both blocks cached, the last token is recomputed into a copy of the last block;
    33: two full blocks cached, one token left; 37: two full blocks cached, 5 tokens left."""
    llm = tiny_llm(tiny_models)
    runner = llm.engine.runner
    prompt = list(range(10, 10 + prompt_len))
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    before, copies = runner.num_computed_tokens, runner.num_copied_blocks
    second = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens == cached
    assert runner.num_computed_tokens - before == (prompt_len - cached) + (GREEDY.max_tokens - 1)
    assert runner.num_copied_blocks - copies == (1 if prompt_len % BS == 0 else 0)
    assert token_ids([second]) == token_ids([first])


def test_n4_seeded_sampling_computes_the_prompt_once(tiny_models):
    prompt = list(range(40, 77))  # 37 tokens: 2 full blocks and a partial one the 4 samples share
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    on, off = tiny_llm(tiny_models), tiny_llm(tiny_models, caching=False)
    expected = token_ids(off.generate([prompt], params, use_tqdm=False))
    assert len({tuple(t) for t in expected[0]}) == 4
    # Sample i of a seeded n-request draws from seed + i: the same as separate requests.
    alone = [token_ids(off.generate([prompt], SamplingParams(temperature=1.0, seed=7 + i, max_tokens=10,
                                                              ignore_eos=True), use_tqdm=False))[0][0]
             for i in range(4)]
    assert expected[0] == alone
    runner = on.engine.runner
    for cached in (0, 32):  # a cold cache, then the prompt's 2 full blocks from the first run
        before, copies = runner.num_computed_tokens, runner.num_copied_blocks
        out = on.generate([prompt], params, use_tqdm=False)[0]
        assert token_ids([out]) == expected and out.num_cached_tokens == cached
        # The prompt (less its cached part) once, then 9 decodes per sample.
        assert runner.num_computed_tokens - before == 37 - cached + 4 * 9
        assert runner.num_copied_blocks - copies == 3  # the partial block: 3 copies, the last writer keeps it


def test_n_larger_than_max_num_seqs_still_completes(tiny_models):
    """Forks that find no seat prefill on their own later, reusing the prompt's cached blocks."""
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    prompt = list(range(50, 90))
    expected = token_ids(tiny_llm(tiny_models, caching=False).generate([prompt], params, use_tqdm=False))
    llm = tiny_llm(tiny_models, max_num_seqs=2)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert token_ids([out]) == expected
    assert llm.engine.stats().prefix_cache.hit_tokens == 32  # the seatless third sample's lookup


def test_eviction_under_pressure_serves_a_stream_of_long_prompts(tiny_models):
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(100, 150))] for _ in range(12)]
    off = tiny_llm(tiny_models, caching=False)
    expected = token_ids(off.generate(prompts, GREEDY, use_tqdm=False))
    # 20 blocks: two sequences of at most 150 + 8 tokens (10 blocks each) and not one block more.
    on = tiny_llm(tiny_models, max_num_seqs=2, max_model_len=256, kv_cache_memory=20 * BS * kv_bytes(off))
    engine, pool = on.engine, on.engine.block_pool
    assert pool.num_usable_blocks == 20
    outs = {}
    for i, prompt in enumerate(prompts):  # a stream: a new request arrives every other step
        engine.add_request(f"s{i}", prompt, GREEDY)
        for _ in range(2):
            outs.update((o.request_id, o) for o in engine.step() if o.finished)
            assert pool.num_free_blocks + pool.num_used_blocks == pool.num_usable_blocks
            assert_accounted(pool)
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert token_ids(outs[f"s{i}"] for i in range(12)) == expected
    assert pool.num_used_blocks == 0 and pool.num_evictable_blocks > 0  # finished prompts stay cached
    assert_accounted(pool)
    assert on.generate([prompts[-1]], GREEDY, use_tqdm=False)[0].num_cached_tokens > 0  # recent: kept
    assert on.generate([prompts[0]], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0  # oldest: evicted


# A constant hash: each registration takes the one hash over, so the only findable block is the
# last one registered, never a first block: every lookup collides and misses. A hash of the
# sorted tokens, blind to the parent: see the prompts below.
@pytest.mark.parametrize("hash_block, cached", [(lambda parent, tokens, extra: 0, [0, 0, 0, 0]),
                                                (lambda parent, tokens, extra: hash(tuple(sorted(tokens))),
                                                 [0, 0, BS, 0])], ids=["constant", "sorted-tokens"])
def test_hash_collisions_cannot_return_wrong_kv(tiny_models, monkeypatch, hash_block, cached):
    monkeypatch.setattr(kv_cache_manager, "hash_block", hash_block)
    rng = random.Random(3)
    x = [rng.randrange(3, 256) for _ in range(BS)]
    z, y = x[::-1], [rng.randrange(3, 256) for _ in range(BS)]

    def tail():
        return [rng.randrange(3, 256) for _ in range(9)]

    # x+y is cached, then z+tail takes over the hash of x's block; z+y then finds a block under
    # the hash of its y, but that y followed x: a hit there would be wrong KV, so it must miss.
    prompts = [x + y + tail(), z + tail(), z + y + tail(), x + y + tail()]
    on, off = tiny_llm(tiny_models), tiny_llm(tiny_models, caching=False)
    outs = [on.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]
    assert token_ids(outs) == token_ids(off.generate(prompts, GREEDY, use_tqdm=False))
    assert [o.num_cached_tokens for o in outs] == cached


def test_preemption_with_cache_keeps_greedy_output(tiny_models):
    rng = random.Random(4)
    heads = [[rng.randrange(3, 256) for _ in range(n)] for n in (40, 90)]
    prompts = [rng.choice(heads) + [rng.randrange(3, 256) for _ in range(rng.randint(1, 60))] for _ in range(20)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    off = tiny_llm(tiny_models, caching=False)
    expected = token_ids(off.generate(prompts, params, use_tqdm=False))
    llm = tiny_llm(tiny_models, max_num_batched_tokens=64, max_num_seqs=20, max_model_len=512,
                   kv_cache_memory=32 * BS * kv_bytes(off))
    assert token_ids(llm.generate(prompts, params, use_tqdm=False)) == expected
    assert llm.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert llm.engine.stats().prefix_cache.hit_tokens > 0
    assert_accounted(llm.engine.block_pool)


def test_reset_prefix_cache_then_the_next_request_misses(tiny_models):
    llm = tiny_llm(tiny_models)
    engine = llm.engine
    prompt = list(range(5, 45))
    llm.generate([prompt], GREEDY, use_tqdm=False)
    assert engine.block_pool.num_evictable_blocks > 0
    engine.add_request("busy", prompt, GREEDY)
    engine.step()
    assert not llm.reset_prefix_cache()  # a running request holds blocks
    while engine.has_unfinished_requests():
        engine.step()
    assert llm.reset_prefix_cache()
    assert engine.block_pool.num_evictable_blocks == 0
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


def test_cache_salt_keeps_requests_apart(tiny_models):
    engine = tiny_llm(tiny_models).engine
    prompt = list(range(5, 45))

    def cached(request_id, salt):
        engine.add_request(request_id, prompt, GREEDY, cache_salt=salt)
        finished = []
        while engine.has_unfinished_requests():
            finished += [o for o in engine.step() if o.finished]
        return finished[0].num_cached_tokens

    assert cached("a", "alice") == 0
    assert cached("b", "bob") == 0
    assert cached("c", "alice") == 32


def test_cli_flag_turns_prefix_caching_off():
    parse = build_parser().parse_args
    assert "enable_prefix_caching" not in engine_kwargs(parse(["generate", "hi"]))
    assert engine_kwargs(parse(["generate", "hi", "--no-enable-prefix-caching"]))["enable_prefix_caching"] is False
    assert engine_kwargs(parse(["generate", "hi", "--enable-prefix-caching"]))["enable_prefix_caching"] is True


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
def test_copy_on_write_moves_the_scales_of_an_8bit_cache(tiny_models, kv_cache_dtype):
    """The n samples' copied partial block carries its per-token scales: greedy samples stay identical."""
    prompt = list(range(40, 77))  # a partial last block, copied on write for each sample
    llm = tiny_llm(tiny_models, kv_cache_dtype=kv_cache_dtype)
    single = token_ids(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                    use_tqdm=False))[0][0]
    llm.reset_prefix_cache()
    copies = llm.engine.runner.num_copied_blocks
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert llm.engine.runner.num_copied_blocks > copies
    assert token_ids(out)[0] == [single] * 3

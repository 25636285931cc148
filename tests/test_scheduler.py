"""The scheduler alone, with a fake runner: plain Python, no model, no tensors."""

from __future__ import annotations

import random

from tokenmill.engine.policy import FCFSPolicy
from tokenmill.engine.scheduler import Scheduler
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.kv_cache_manager import KVCacheManager
from tokenmill.sampling_params import SamplingParams
from tokenmill.sequence import Sequence, SequenceStatus
from tokenmill.step_plan import SamplerOutput, StepResult

EOS = 10_000  # the fake runner's end-of-sequence token


def make_seq(prompt_len: int, max_tokens: int, arrival: float) -> Sequence:
    return Sequence(f"r{arrival}", 0, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), arrival)


def make_scheduler(num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                   caching: bool = True) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), block_size, enable_prefix_caching=caching)
    return Scheduler(kv, FCFSPolicy(), max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     eos_token_ids=[EOS])


def fake_step(sched: Scheduler, finished: list[Sequence], next_token=lambda seq: 0):
    """One engine step around a fake runner that emits `next_token(seq)` for each sampled sequence; the
    bookkeeping after it is the scheduler's own (`update_from_output`), as in the engine."""
    plan = sched.schedule()
    for chunk in plan.chunks:
        assert chunk.start == chunk.seq.num_computed_tokens
    sampled = [c for c in plan.chunks if c.sample]
    tokens = [next_token(c.seq) for c in sampled]
    updates = sched.update_from_output(plan, StepResult(sampled, SamplerOutput(tokens, None, None, None),
                                                        [1] * len(sampled)))
    for chunk in plan.chunks:
        assert len(sched.kv.block_table(chunk.seq.seq_id)) * sched.kv.block_size >= chunk.seq.num_computed_tokens
    finished += [u.seq for u in updates if u.seq.is_finished]
    return plan


def test_chunked_prefill_respects_the_token_budget():
    sched = make_scheduler(64, 4, max_num_seqs=8, max_num_batched_tokens=10)
    long = make_seq(25, 2, 0.0)
    sched.add(long)
    plans = [fake_step(sched, []) for _ in range(3)]
    assert [c.num_tokens for c in plans[0].chunks] == [10]
    assert [c.num_tokens for c in plans[1].chunks] == [10]
    assert [c.num_tokens for c in plans[2].chunks] == [5]
    assert [c.sample for p in plans for c in p.chunks] == [False, False, True]


def test_decodes_and_prefill_chunks_share_a_step():
    sched = make_scheduler(64, 4, max_num_seqs=8, max_num_batched_tokens=8)
    a = make_seq(3, 10, 0.0)
    sched.add(a)
    fake_step(sched, [])
    b = make_seq(20, 10, 1.0)
    sched.add(b)
    plan = fake_step(sched, [])
    assert [(c.seq, c.num_tokens) for c in plan.chunks] == [(a, 1), (b, 7)]


def test_max_num_seqs_caps_the_running_set():
    sched = make_scheduler(64, 4, max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(3, 5, float(i)) for i in range(4)]
    for s in seqs:
        sched.add(s)
    plan = fake_step(sched, [])
    assert [c.seq for c in plan.chunks] == seqs[:2]
    assert len(sched.waiting) == 2


def test_admission_is_first_come_first_served():
    sched = make_scheduler(64, 4, max_num_seqs=1, max_num_batched_tokens=100)
    late, early = make_seq(3, 1, 5.0), make_seq(3, 1, 1.0)
    sched.add(late)
    sched.add(early)
    assert fake_step(sched, []).chunks[0].seq is early


def test_preemption_takes_the_newest_and_recomputes_it():
    sched = make_scheduler(1 + 6, 4, max_num_seqs=4, max_num_batched_tokens=100)  # 6 usable blocks of 4 tokens
    pool = sched.kv.pool
    old, new = make_seq(8, 14, 0.0), make_seq(8, 14, 1.0)  # each fits alone (22 <= 24 tokens)
    sched.add(old)
    sched.add(new)
    finished: list[Sequence] = []
    preempted = []
    while sched.has_unfinished():
        plan = fake_step(sched, finished)
        preempted += plan.preempted
    assert preempted and preempted[0] is new
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    assert {s.num_output_tokens for s in finished} == {14}
    assert pool.num_free_blocks == pool.num_usable_blocks


def test_preempted_sequence_restarts_from_zero_with_its_output():
    sched = make_scheduler(1 + 4, 4, max_num_seqs=4, max_num_batched_tokens=100, caching=False)
    a, b = make_seq(6, 8, 0.0), make_seq(6, 8, 1.0)
    sched.add(a)
    sched.add(b)
    finished: list[Sequence] = []
    while not any(p is b for p in fake_step(sched, finished).preempted):
        pass
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and not sched.kv.block_table(b.seq_id)
    outputs_so_far = b.num_output_tokens
    tokens_at_preemption = b.num_tokens
    restarts = []
    while sched.has_unfinished():
        plan = fake_step(sched, finished)
        restarts += [c.num_tokens for c in plan.chunks if c.seq is b and c.start == 0]
    assert restarts[0] == tokens_at_preemption  # recomputes prompt + the tokens generated before
    assert b.num_output_tokens == 8 > outputs_so_far


def test_random_workload_finishes_everything_and_frees_every_block():
    """Shared prefixes (every prompt is 0, 1, 2, ...) and n = 3 requests: blocks are shared, never leaked."""
    rng = random.Random(7)
    sched = make_scheduler(1 + 30, 8, max_num_seqs=6, max_num_batched_tokens=32)
    pool = sched.kv.pool
    requests = []
    for i in range(40):
        prompt_len, max_tokens = rng.randint(1, 60), rng.randint(1, 40)
        requests.append([make_seq(prompt_len, max_tokens, float(i)) for _ in range(3 if i % 5 == 0 else 1)])
    finished: list[Sequence] = []
    pending = list(requests)
    steps = 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                seqs = pending.pop(0)
                sched.add(seqs[0], forks=seqs[1:])
        plan = fake_step(sched, finished)
        assert plan.num_tokens <= 32
        assert len(sched.running) <= 6
        assert len({b for s in sched.running for b in sched.kv.block_table(s.seq_id)}) == pool.num_used_blocks
        assert pool.num_used_blocks + pool.num_free_blocks == pool.num_usable_blocks
        steps += 1
        assert steps < 10_000
    every = [s for seqs in requests for s in seqs]
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in every)
    assert all(s.num_output_tokens == s.params.max_tokens for s in finished)
    assert sched.kv.stats.hit_tokens > 0
    assert pool.num_free_blocks == pool.num_usable_blocks and pool.num_used_blocks == 0


def test_block_pool_refuses_double_free():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    assert 0 not in blocks
    pool.free(blocks)
    try:
        pool.free(blocks)
    except RuntimeError as e:
        assert "twice" in str(e)
    else:
        raise AssertionError("double free went unnoticed")

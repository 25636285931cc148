"""The scheduler alone, with a fake runner: plain Python, no model, no tensors."""

from __future__ import annotations

import random

from tokenmill.engine.policy import FCFSPolicy
from tokenmill.engine.scheduler import Scheduler
from tokenmill.kv.block_pool import BlockPool
from tokenmill.sampling_params import SamplingParams
from tokenmill.sequence import Sequence, SequenceStatus


def make_seq(prompt_len: int, max_tokens: int, arrival: float) -> Sequence:
    return Sequence(f"r{arrival}", 0, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), arrival)


def fake_step(sched: Scheduler, finished: list[Sequence]) -> list:
    """What the engine does around the runner: advance computed counts, append a token, finish."""
    plan = sched.schedule()
    for chunk in plan.chunks:
        seq = chunk.seq
        assert chunk.start == seq.num_computed_tokens
        seq.num_computed_tokens += chunk.num_tokens
        assert len(seq.block_table) * sched.block_size >= seq.num_computed_tokens
        if chunk.sample:
            seq.token_ids.append(0)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq)
                finished.append(seq)
    return plan


def test_chunked_prefill_respects_the_token_budget():
    pool = BlockPool(64)
    sched = Scheduler(pool, 4, FCFSPolicy(), max_num_seqs=8, max_num_batched_tokens=10)
    long = make_seq(25, 2, 0.0)
    sched.add(long)
    plans = [fake_step(sched, []) for _ in range(3)]
    assert [c.num_tokens for c in plans[0].chunks] == [10]
    assert [c.num_tokens for c in plans[1].chunks] == [10]
    assert [c.num_tokens for c in plans[2].chunks] == [5]
    assert [c.sample for p in plans for c in p.chunks] == [False, False, True]


def test_decodes_and_prefill_chunks_share_a_step():
    pool = BlockPool(64)
    sched = Scheduler(pool, 4, FCFSPolicy(), max_num_seqs=8, max_num_batched_tokens=8)
    a = make_seq(3, 10, 0.0)
    sched.add(a)
    fake_step(sched, [])
    b = make_seq(20, 10, 1.0)
    sched.add(b)
    plan = fake_step(sched, [])
    assert [(c.seq, c.num_tokens) for c in plan.chunks] == [(a, 1), (b, 7)]


def test_max_num_seqs_caps_the_running_set():
    pool = BlockPool(64)
    sched = Scheduler(pool, 4, FCFSPolicy(), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(3, 5, float(i)) for i in range(4)]
    for s in seqs:
        sched.add(s)
    plan = fake_step(sched, [])
    assert [c.seq for c in plan.chunks] == seqs[:2]
    assert len(sched.waiting) == 2


def test_admission_is_first_come_first_served():
    pool = BlockPool(64)
    sched = Scheduler(pool, 4, FCFSPolicy(), max_num_seqs=1, max_num_batched_tokens=100)
    late, early = make_seq(3, 1, 5.0), make_seq(3, 1, 1.0)
    sched.add(late)
    sched.add(early)
    assert fake_step(sched, []).chunks[0].seq is early


def test_preemption_takes_the_newest_and_recomputes_it():
    pool = BlockPool(1 + 6)  # 6 usable blocks of 4 tokens
    sched = Scheduler(pool, 4, FCFSPolicy(), max_num_seqs=4, max_num_batched_tokens=100)
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
    pool = BlockPool(1 + 4)
    sched = Scheduler(pool, 4, FCFSPolicy(), max_num_seqs=4, max_num_batched_tokens=100)
    a, b = make_seq(6, 8, 0.0), make_seq(6, 8, 1.0)
    sched.add(a)
    sched.add(b)
    finished: list[Sequence] = []
    while not any(p is b for p in fake_step(sched, finished).preempted):
        pass
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and not b.block_table
    outputs_so_far = b.num_output_tokens
    tokens_at_preemption = b.num_tokens
    restarts = []
    while sched.has_unfinished():
        plan = fake_step(sched, finished)
        restarts += [c.num_tokens for c in plan.chunks if c.seq is b and c.start == 0]
    assert restarts[0] == tokens_at_preemption  # recomputes prompt + the tokens generated before
    assert b.num_output_tokens == 8 > outputs_so_far


def test_random_workload_finishes_everything_and_frees_every_block():
    rng = random.Random(7)
    pool = BlockPool(1 + 30)
    sched = Scheduler(pool, 8, FCFSPolicy(), max_num_seqs=6, max_num_batched_tokens=32)
    seqs = [make_seq(rng.randint(1, 60), rng.randint(1, 40), float(i)) for i in range(40)]
    finished: list[Sequence] = []
    pending = list(seqs)
    steps = 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        plan = fake_step(sched, finished)
        assert plan.num_tokens <= 32
        assert len(sched.running) <= 6
        used = sum(len(s.block_table) for s in sched.running)
        assert used + pool.num_free_blocks == pool.num_usable_blocks
        steps += 1
        assert steps < 10_000
    assert sorted(s.arrival_time for s in finished) == [s.arrival_time for s in seqs]
    assert all(s.num_output_tokens == s.params.max_tokens for s in finished)
    assert pool.num_free_blocks == pool.num_usable_blocks


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

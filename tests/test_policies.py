"""Scheduling policies with a fake runner (no model): admission order, preemption victims, the
starvation bounds of aging and sjf, fair shares, and that every policy finishes every request.
Then one end-to-end run: priority preemption on a real (tiny) model keeps greedy outputs."""

from __future__ import annotations

import random

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.engine import LLMEngine
from tokenmill.config import POLICIES, PolicyConfig, parse_tenant_weights
from tokenmill.engine.policy import AgingPolicy, FairSharePolicy, LengthEstimator, ShortestJobFirstPolicy, make_policy
from tokenmill.engine.scheduler import Scheduler
from tokenmill.errors import InvalidParameterError
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.kv_cache_manager import KVCacheManager
from tokenmill.sampling_params import SamplingParams as Params
from tokenmill.sequence import Sequence, SequenceStatus

from test_scheduler import EOS, fake_step

MAX_MODEL_LEN = 4096


def seq(arrival: float, prompt_len: int = 4, max_tokens: int = 8, priority: int = 0, tenant: str = "",
        output_len: int | None = None) -> Sequence:
    """A sequence; `output_len` (default max_tokens) is where the fake runner stops it with "stop"."""
    s = Sequence(f"r{arrival}-{tenant}-{priority}", 0, list(range(prompt_len)), Params(max_tokens=max_tokens),
                 arrival, priority=priority, tenant=tenant)
    s.output_len = output_len or max_tokens
    return s


def scheduler(policy, num_blocks: int = 256, block_size: int = 4, max_num_seqs: int = 4,
              max_num_batched_tokens: int = 64) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), block_size, enable_prefix_caching=False)
    return Scheduler(kv, policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     eos_token_ids=[EOS])


def step(sched: Scheduler, finished: list[Sequence] | None = None):
    """One engine step around a fake runner: a sequence emits EOS at its `output_len` (unless
    max_tokens ends it there), else token 0."""
    def next_token(s: Sequence) -> int:
        return EOS if s.num_output_tokens + 1 == s.output_len < s.params.max_tokens else 0
    return fake_step(sched, [] if finished is None else finished, next_token)


def started(s: Sequence) -> bool:
    return s.status is not SequenceStatus.WAITING or s.num_preemptions > 0


def admitted_order(policy, seqs: list[Sequence]) -> list[Sequence]:
    """The order one-seat scheduling starts the sequences in."""
    sched = scheduler(policy, max_num_seqs=1)
    for s in seqs:
        sched.add(s)
    order = []
    while sched.has_unfinished():
        for chunk in step(sched).chunks:
            if chunk.start == 0 and chunk.seq not in order:
                order.append(chunk.seq)
    return order


# ---- admission order ------------------------------------------------------------------------


def test_fcfs_admits_by_arrival():
    a, b, c = seq(2.0), seq(0.0), seq(1.0)
    assert admitted_order(make_policy(PolicyConfig("fcfs"), MAX_MODEL_LEN), [a, b, c]) == [b, c, a]


def test_priority_admits_lower_priority_values_first_then_by_arrival():
    a, b, c, d = seq(0.0, priority=2), seq(1.0, priority=0), seq(2.0, priority=1), seq(3.0, priority=0)
    assert admitted_order(make_policy(PolicyConfig("priority"), MAX_MODEL_LEN), [a, b, c, d]) == [b, d, c, a]


def test_aging_lets_a_long_wait_outrank_a_better_priority():
    # aging 10 s per level: priority 2 at t=0 ranks like priority 0 at t=20
    old_low, early_high, late_high = seq(0.0, priority=2), seq(15.0, priority=0), seq(25.0, priority=0)
    order = admitted_order(AgingPolicy(aging_seconds=10.0), [late_high, old_low, early_high])
    assert order == [early_high, old_low, late_high]


def test_sjf_admits_the_shortest_max_tokens_first_before_it_has_learned_anything():
    long, short, middle = seq(0.0, max_tokens=300), seq(1.0, max_tokens=10), seq(2.0, max_tokens=50)
    assert admitted_order(ShortestJobFirstPolicy(MAX_MODEL_LEN), [long, short, middle]) == [short, middle, long]


def test_sjf_counts_uncomputed_prompt_tokens_as_work():
    # Same output, but a 400-token prompt to prefill: with the default weight the short prompt goes
    # first although it arrived later; with weight 0 only outputs count, and arrival decides.
    long_prompt, short_prompt = seq(0.0, prompt_len=400, max_tokens=40), seq(1.0, prompt_len=50, max_tokens=40)
    policy = ShortestJobFirstPolicy(MAX_MODEL_LEN)
    assert policy.remaining_work(long_prompt) == 40 + 0.5 * 400
    assert admitted_order(policy, [long_prompt, short_prompt]) == [short_prompt, long_prompt]
    long_prompt, short_prompt = seq(0.0, prompt_len=400, max_tokens=40), seq(1.0, prompt_len=50, max_tokens=40)
    assert admitted_order(ShortestJobFirstPolicy(MAX_MODEL_LEN, prompt_token_weight=0.0),
                          [long_prompt, short_prompt]) == [long_prompt, short_prompt]
    # Computed prompt tokens are no longer work: a running request's key only falls.
    running = seq(2.0, prompt_len=400, max_tokens=40)
    running.num_computed_tokens = 400
    assert policy.remaining_work(running) == 40


def test_sjf_does_not_charge_a_preempted_sequence_its_prompt_again():
    # Its computed blocks stay in the prefix cache, so after preemption its key is what it was.
    policy = ShortestJobFirstPolicy(MAX_MODEL_LEN)
    sched = scheduler(policy, max_num_seqs=1, max_num_batched_tokens=512)
    victim = seq(0.0, prompt_len=400, max_tokens=40)
    sched.add(victim)
    step(sched)
    step(sched)
    assert victim.num_output_tokens == 2 and policy.remaining_work(victim) == 38
    sched._preempt(victim)
    sched.running.remove(victim)
    assert victim.num_computed_tokens == 0 and policy.remaining_work(victim) == 38
    # Preempted halfway through its prompt, only the half never computed is still work.
    half = seq(1.0, prompt_len=400, max_tokens=40)
    sched = scheduler(policy, max_num_seqs=1, max_num_batched_tokens=200)
    sched.add(half)
    step(sched)
    sched._preempt(half)
    sched.running.remove(half)
    assert policy.remaining_work(half) == 40 + 0.5 * 200


def test_fair_admits_the_tenant_with_the_fewest_tokens_per_weight():
    policy = FairSharePolicy({"a": 2.0})
    policy.served.update({"a": 10.0, "b": 8.0})  # a has computed 20 tokens at weight 2, b 8 at weight 1
    assert policy.next_to_admit([seq(0.0, tenant="a"), seq(1.0, tenant="b")]).tenant == "b"
    policy.served["b"] = 11.0
    assert policy.next_to_admit([seq(0.0, tenant="a"), seq(1.0, tenant="b")]).tenant == "a"


# ---- preemption victims ---------------------------------------------------------------------


def run_until_a_preemption(policy, seqs: list[Sequence], num_blocks: int) -> Sequence:
    """Start `seqs` together in a pool too small for all of them to finish; return the first victim."""
    sched = scheduler(policy, num_blocks=num_blocks, max_num_seqs=len(seqs), max_num_batched_tokens=256)
    for s in seqs:
        sched.add(s)
    for _ in range(200):
        plan = step(sched)
        if plan.preempted:
            return plan.preempted[0]
    raise AssertionError("no preemption happened")


@pytest.mark.parametrize("name, victim", [("fcfs", 2), ("priority", 0), ("sjf", 1), ("aging", 0)])
def test_the_policy_chooses_the_preemption_victim(name, victim):
    # 1 + 9 blocks of 4 tokens; three sequences of 8 prompt tokens that each grow to 20
    seqs = [seq(0.0, prompt_len=8, max_tokens=12, priority=3),   # oldest, worst priority
            seq(1.0, prompt_len=8, max_tokens=60, output_len=12),  # longest predicted output
            seq(2.0, prompt_len=8, max_tokens=12)]                # newest
    policy = make_policy(PolicyConfig(name), MAX_MODEL_LEN)
    assert run_until_a_preemption(policy, seqs, num_blocks=1 + 9) is seqs[victim]


def test_fair_preempts_the_most_served_tenant():
    policy = FairSharePolicy({"heavy": 0.1})  # each of its tokens counts 10x
    seqs = [seq(0.0, prompt_len=8, max_tokens=12, tenant="heavy"), seq(1.0, prompt_len=8, max_tokens=12, tenant="light"),
            seq(2.0, prompt_len=8, max_tokens=12, tenant="light")]
    assert run_until_a_preemption(policy, seqs, num_blocks=1 + 9).tenant == "heavy"


# ---- preemptive admission -------------------------------------------------------------------


def test_a_high_priority_arrival_takes_a_seat_in_the_next_step():
    sched = scheduler(make_policy(PolicyConfig("priority"), MAX_MODEL_LEN), max_num_seqs=2)
    low_old, low_new = seq(0.0, max_tokens=50, priority=5), seq(1.0, max_tokens=50, priority=5)
    sched.add(low_old)
    sched.add(low_new)
    step(sched)
    step(sched)
    urgent = seq(2.0, max_tokens=5, priority=0)
    sched.add(urgent)
    plan = step(sched)
    assert urgent in [c.seq for c in plan.chunks]
    assert plan.preempted == [low_new]  # of equal priority, the newest goes
    finished: list[Sequence] = []
    while sched.has_unfinished():
        step(sched, finished)
    assert finished[0] is urgent


def test_a_high_priority_arrival_preempts_for_blocks_too():
    # 1 + 8 blocks of 4 tokens, seats for everyone: blocks are what is short
    sched = scheduler(make_policy(PolicyConfig("priority"), MAX_MODEL_LEN), num_blocks=1 + 8, max_num_seqs=8)
    lows = [seq(float(i), prompt_len=12, max_tokens=20, priority=1) for i in range(2)]
    for s in lows:
        sched.add(s)
    step(sched)  # 2 x 12 prompt tokens: 6 of 8 blocks
    urgent = seq(5.0, prompt_len=12, max_tokens=4, priority=0)
    sched.add(urgent)
    plan = step(sched)
    assert urgent in [c.seq for c in plan.chunks] and plan.preempted == [lows[1]]


def test_equal_priorities_never_preempt_each_other():
    sched = scheduler(make_policy(PolicyConfig("priority"), MAX_MODEL_LEN), max_num_seqs=1)
    first, second = seq(0.0, max_tokens=10), seq(1.0, max_tokens=10)
    sched.add(first)
    step(sched)
    sched.add(second)
    preempted = []
    while sched.has_unfinished():
        preempted += step(sched).preempted
    assert preempted == []


def test_sjf_takes_the_seat_of_a_prefilling_sequence_but_never_of_a_decoding_one():
    sched = scheduler(ShortestJobFirstPolicy(MAX_MODEL_LEN), max_num_seqs=1, max_num_batched_tokens=64)
    prefilling = seq(0.0, prompt_len=400, max_tokens=40)  # its prompt takes seven 64-token steps
    sched.add(prefilling)
    step(sched)
    short = seq(1.0, max_tokens=4)
    sched.add(short)
    plan = step(sched)
    assert plan.preempted == [prefilling] and short in [c.seq for c in plan.chunks]
    # Once it decodes, a long request keeps its seat although the newcomer ranks ahead of it.
    policy = ShortestJobFirstPolicy(MAX_MODEL_LEN)
    sched = scheduler(policy, max_num_seqs=1, max_num_batched_tokens=512)
    decoding = seq(10.0, max_tokens=200)
    sched.add(decoding)
    step(sched)
    short = seq(11.0, max_tokens=4)
    assert decoding.num_output_tokens == 1 and policy.key(short) < policy.key(decoding)
    sched.add(short)
    finished: list[Sequence] = []
    preempted: list[Sequence] = []
    while sched.has_unfinished():
        preempted += step(sched, finished).preempted
    assert preempted == [] and finished == [decoding, short]


def test_sjf_holds_a_long_prefill_back_while_a_decoding_sequence_ranked_ahead_runs():
    # Seats and budget for everyone: only the policy keeps the long prompt waiting.
    policy = ShortestJobFirstPolicy(MAX_MODEL_LEN, long_prefill_tokens=256)
    sched = scheduler(policy, num_blocks=1024, max_num_seqs=8, max_num_batched_tokens=2048)
    ahead = seq(0.0, max_tokens=10)
    sched.add(ahead)
    step(sched)
    long_prompt, short_prompt = seq(1.0, prompt_len=300, max_tokens=10), seq(1.0, prompt_len=200, max_tokens=10)
    sched.add(long_prompt)
    sched.add(short_prompt)
    assert policy.key(ahead) < policy.key(short_prompt) < policy.key(long_prompt)
    finished: list[Sequence] = []
    started_at = None
    for n in range(100):
        if long_prompt in [c.seq for c in step(sched, finished).chunks] and started_at is None:
            started_at = n
            assert finished == [ahead, short_prompt]  # both ranked ahead; it waited for both to finish
        if not sched.has_unfinished():
            break
    assert started_at is not None and short_prompt in finished and long_prompt in finished
    # A short prompt is never held back, nor a long one that ranks ahead of every decoding sequence.
    short, early = seq(2.0, prompt_len=255, max_tokens=10), seq(-100.0, prompt_len=300, max_tokens=10)
    assert policy.startable([short, early], [ahead]) == [short, early]


# ---- starvation bounds ----------------------------------------------------------------------


def overload(policy, victim: Sequence, make_arrival, steps: int = 400, max_num_seqs: int = 2) -> list[Sequence]:
    """One step per second; two new requests arrive every second, more than two seats can serve.
    Returns every sequence in the order it started."""
    sched = scheduler(policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=512)
    sched.add(victim)
    order: list[Sequence] = []
    for t in range(1, steps):
        for _ in range(2):
            sched.add(make_arrival(float(t)))
        for chunk in step(sched).chunks:
            if chunk.start == 0 and chunk.seq not in order:
                order.append(chunk.seq)
    return order


def test_aging_bounds_the_wait_of_a_low_priority_request_under_overload():
    aging = 5.0
    victim = seq(0.0, priority=3, max_tokens=4)
    order = overload(AgingPolicy(aging), victim, lambda t: seq(t, priority=0, max_tokens=4))
    assert victim in order
    # Only requests that arrived within (3 - 0) * aging seconds of it may start before it.
    assert max(s.arrival_time for s in order[:order.index(victim)]) < 0.0 + 3 * aging
    # Without aging the same request starves.
    starved = seq(0.0, priority=3, max_tokens=4)
    assert starved not in overload(make_policy(PolicyConfig("priority"), MAX_MODEL_LEN), starved,
                                   lambda t: seq(t, priority=0, max_tokens=4))


def test_sjf_bounds_the_wait_of_a_long_request_under_a_stream_of_short_ones():
    per_token = 0.1
    long = seq(0.0, max_tokens=200)
    order = overload(ShortestJobFirstPolicy(MAX_MODEL_LEN, per_token), long, lambda t: seq(t, max_tokens=4))
    assert long in order
    # Overtaken only by requests arriving less than 0.1 s x its work after it: 200 predicted output
    # tokens and 4 prompt tokens at weight 0.5.
    assert max(s.arrival_time for s in order[:order.index(long)]) < 0.0 + per_token * (200 + 0.5 * 4)


def test_sjf_bounds_how_long_a_long_prefill_is_held_back():
    # One step per second and a short request (8 output tokens) every second, more than 4 seats
    # serve, so decoding ones ranked ahead of the long prompt run all the time. It waits until
    # those that arrived before its key's time have finished; later ones rank behind it.
    policy = ShortestJobFirstPolicy(MAX_MODEL_LEN)
    sched = scheduler(policy, num_blocks=1024, max_num_seqs=4, max_num_batched_tokens=1024)
    long_prompt = seq(5.0, prompt_len=600, max_tokens=4)
    key_time = policy.key(long_prompt)[0]  # 5 s + 0.1 s x (4 + 0.5 x 600): about 35 s
    finished_at: dict[int, int] = {}
    for t in range(300):
        sched.add(seq(float(t), max_tokens=8))
        if t == 5:
            sched.add(long_prompt)
        finished: list[Sequence] = []
        plan = step(sched, finished)
        finished_at.update((s.seq_id, t) for s in finished)
        if long_prompt in [c.seq for c in plan.chunks]:
            break
    before = [s for s in sched.waiting + sched.running if s.arrival_time < key_time and s is not long_prompt]
    assert t > 5 + 8 and not before  # held back, and started only after all of them finished,
    assert t == max(finished_at.values()) + 1  # in the step after the last one did


# ---- the output-length estimator ------------------------------------------------------------


def finish_with(policy: ShortestJobFirstPolicy, s: Sequence, output_len: int) -> None:
    policy.on_add(s)
    s.token_ids += [0] * output_len
    s.finish_reason = "stop"
    policy.on_finish(s)


def test_the_estimator_learns_per_tenant_lengths_and_sjf_uses_them():
    policy = ShortestJobFirstPolicy(MAX_MODEL_LEN)
    rng = random.Random(0)
    for i in range(200):  # both tenants ask for 512 tokens; "chat" stops near 20, "essay" near 400
        tenant, length = rng.choice([("chat", 20), ("essay", 400)])
        finish_with(policy, seq(float(i), max_tokens=512, tenant=tenant), length + rng.randint(-5, 5))
    stats = policy.estimator.stats
    assert stats.observations == 200
    assert stats.mae < 0.1 * stats.baseline_mae  # far better than trusting max_tokens
    assert stats.rmse >= stats.mae and stats.reliability > 0.8
    essay, chat = seq(1000.0, max_tokens=512, tenant="essay"), seq(1001.0, max_tokens=512, tenant="chat")
    assert policy.next_to_admit([essay, chat]) is chat
    assert abs(policy.predicted_remaining(chat) - 20) < 5


def test_the_estimator_separates_prompt_length_buckets_within_a_tenant():
    estimator = LengthEstimator()
    for i in range(100):
        short_prompt, long_prompt = seq(float(i), prompt_len=10, max_tokens=512), seq(float(i), prompt_len=900, max_tokens=512)
        short_prompt.token_ids += [0] * 30
        long_prompt.token_ids += [0] * 300
        estimator.observe(short_prompt, 512, 512)
        estimator.observe(long_prompt, 512, 512)
    assert abs(estimator.predict(seq(0.0, prompt_len=12, max_tokens=512), 512) - 30) < 10
    assert abs(estimator.predict(seq(0.0, prompt_len=800, max_tokens=512), 512) - 300) < 30


def test_the_estimator_trusts_max_tokens_when_most_requests_run_to_it():
    # 90% of requests use all 64 tokens, 10% stop at 5: any mean undershoots the 90%, max_tokens does not.
    policy = ShortestJobFirstPolicy(MAX_MODEL_LEN)
    for i in range(200):
        finish_with(policy, seq(float(i), max_tokens=64), 5 if i % 10 == 0 else 64)
    stats = policy.estimator.stats
    assert policy.predicted_remaining(seq(500.0, max_tokens=64)) == 64
    assert stats.mae <= stats.baseline_mae + 1.0  # learned no worse than trusting max_tokens


def test_sjf_degrades_to_fcfs_when_lengths_are_unpredictable():
    policy = ShortestJobFirstPolicy(MAX_MODEL_LEN)
    rng = random.Random(1)
    for i in range(400):  # output lengths unrelated to tenant, prompt length or max_tokens
        finish_with(policy, seq(float(i), prompt_len=rng.randint(1, 500), max_tokens=512,
                                tenant=rng.choice("abc")), rng.randint(1, 512))
    assert policy.estimator.stats.reliability < 0.05
    # max_tokens 16 or 512 no longer outweigh two seconds of arrival order
    seqs = [seq(2000.0 + 2 * i, max_tokens=rng.choice([16, 512]), tenant=rng.choice("abc")) for i in range(20)]
    assert policy.preemption_order(list(reversed(seqs))) == seqs
    # and no long prefill is held back behind decoding sequences
    decoding = seq(1999.0, max_tokens=16)
    decoding.token_ids.append(0)
    long_prompt = seq(2000.0, prompt_len=4000, max_tokens=16)
    assert policy.startable([long_prompt], [decoding]) == [long_prompt]


# ---- fair share -----------------------------------------------------------------------------


def test_fair_shares_follow_the_weights_over_a_long_run():
    policy = FairSharePolicy(parse_tenant_weights("gold=3,silver=1"))
    sched = scheduler(policy, max_num_seqs=8, max_num_batched_tokens=64)
    rng = random.Random(2)
    for _ in range(3000):
        for tenant in ("gold", "silver"):  # both always have work waiting
            while sum(1 for s in sched.waiting if s.tenant == tenant) < 4:
                sched.add(seq(0.0, prompt_len=rng.randint(1, 40), max_tokens=rng.randint(1, 60), tenant=tenant))
        step(sched)
    share = policy.tokens["gold"] / (policy.tokens["gold"] + policy.tokens["silver"])
    assert abs(share - 0.75) < 0.05


def test_a_tenant_back_from_idling_gets_no_credit_for_it():
    policy = FairSharePolicy()
    busy = seq(0.0, tenant="busy")
    policy.on_add(busy)
    policy.served["busy"] = 5000.0
    policy.on_add(seq(1.0, tenant="returning"))
    assert policy.served["returning"] == 5000.0


# ---- every policy finishes everything -------------------------------------------------------


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_finishes_every_request_and_frees_every_block(name):
    rng = random.Random(hash(name) % 1000)
    policy = make_policy(PolicyConfig(name, aging_seconds=2.0, tenant_weights={"x": 2.0}), MAX_MODEL_LEN)
    sched = scheduler(policy, num_blocks=1 + 24, block_size=8, max_num_seqs=5, max_num_batched_tokens=48)
    pool = sched.kv.pool
    pending = [seq(float(i), prompt_len=rng.randint(1, 60), max_tokens=rng.randint(1, 60), priority=rng.randint(0, 3),
                   tenant=rng.choice("xyz")) for i in range(80)]
    for s in pending:
        s.output_len = rng.randint(1, s.params.max_tokens)
    everything = list(pending)
    finished: list[Sequence] = []
    preemptions = 0
    for _ in range(20_000):
        if not (pending or sched.has_unfinished()):
            break
        for _ in range(rng.randint(0, 2)):
            if pending:
                sched.add(pending.pop(0))
        preemptions += len(step(sched, finished).preempted)
        assert len(sched.running) <= 5
        assert pool.num_used_blocks + pool.num_free_blocks == pool.num_usable_blocks
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in everything)
    assert all(s.num_output_tokens == s.output_len for s in finished)
    assert preemptions > 0
    assert pool.num_used_blocks == 0 and pool.num_free_blocks == pool.num_usable_blocks


def test_bad_policy_settings_are_refused_by_name():
    with pytest.raises(InvalidParameterError, match="scheduling_policy"):
        PolicyConfig("lifo")
    with pytest.raises(InvalidParameterError, match="aging_seconds"):
        PolicyConfig("aging", aging_seconds=0)
    with pytest.raises(InvalidParameterError, match="sjf_long_prefill_tokens"):
        PolicyConfig("sjf", sjf_long_prefill_tokens=0)
    with pytest.raises(InvalidParameterError, match="sjf_prompt_token_weight"):
        PolicyConfig("sjf", sjf_prompt_token_weight=-0.5)
    with pytest.raises(InvalidParameterError, match="tenant_weights"):
        PolicyConfig("fair", tenant_weights="alice=two")
    with pytest.raises(InvalidParameterError, match="tenant_weights"):
        PolicyConfig("fair", tenant_weights={"alice": -1.0})


# ---- end to end on a real model -------------------------------------------------------------


def test_priority_preemption_end_to_end_keeps_greedy_outputs(tiny_models):
    path = str(tiny_models["llama"])
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    alone = [LLM(path, dtype="float32", kv_cache_memory="2MiB").generate(p, greedy, use_tqdm=False)[0].outputs[0].token_ids
             for p in prompts]
    engine = LLMEngine(path, dtype="float32", kv_cache_memory="2MiB", max_num_seqs=2, scheduling_policy="priority")
    engine.add_request("low-0", prompts[0], greedy, priority=1)
    engine.add_request("low-1", prompts[1], greedy, priority=1)
    outputs: dict[str, list[int]] = {}
    for _ in range(5):
        engine.step()
    engine.add_request("urgent", prompts[2], greedy, priority=0)
    first = engine.step()
    assert "urgent" in [o.request_id for o in first]  # it started, and sampled, in the very next step
    assert engine.scheduler.num_preemptions == 1
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    assert [outputs["low-0"], outputs["low-1"], outputs["urgent"]] == alone


def test_priority_and_user_reach_the_engine_from_the_offline_api(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="2MiB", max_num_seqs=1,
              scheduling_policy="fair", tenant_weights={"b": 4})
    outs = llm.generate([[5, 6], [7, 8], [9, 10]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False,
                        priority=[0, 1, 2], user=["a", "b", None])
    assert len(outs) == 3
    assert dict(llm.engine.scheduler.policy.tokens) == {"a": 2 + 4 - 1, "b": 2 + 4 - 1, "": 2 + 4 - 1}
    with pytest.raises(InvalidParameterError, match="priority"):
        llm.generate([[5, 6]], priority=[0, 1], use_tqdm=False)
    with pytest.raises(InvalidParameterError, match="priority"):
        llm.generate([[5, 6]], priority=1.5, use_tqdm=False)


# ---- the server -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fair", "sjf"])
def test_the_server_takes_priority_and_tenants_and_exports_the_policy_state(tiny_chat_model, policy):
    import json

    import openai

    from server_process import ServerProcess

    flags = ["--model", str(tiny_chat_model), "--dtype", "float32", "--kv-cache-memory", "8MiB",
             "--scheduling-policy", policy, "--tenant-weights", "alice=2",
             "--metrics-tenant-labels"]  # no API key: tenant names on /metrics only with this flag
    with ServerProcess(flags) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        for user in ("alice", "bob"):
            client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=4, user=user,
                                      extra_body={"ignore_eos": True, "priority": 3})
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       extra_body={"ignore_eos": True}, extra_headers={"X-Tenant": "carol"})
        if policy == "fair":
            for tenant in ("alice", "bob"):  # 3 prompt tokens and 3 decodes each
                assert server.metric("tokenmill_tenant_computed_tokens_total", f'tenant="{tenant}"') == 6
            assert server.metric("tokenmill_tenant_computed_tokens_total", 'tenant="carol"') > 0
        else:
            assert server.metric("tokenmill_length_estimator_observations") == 3
            assert server.metric("tokenmill_length_estimator_reliability") == 1.0  # fewer than 8 seen: trusted
        assert server.metric("tokenmill_num_preemptions_total") == 0  # one request at a time: nobody preempted
        status, body = server.post("/v1/completions", json.dumps({"prompt": [5], "priority": "high"}).encode())
        assert status == 400 and body["error"]["param"] == "priority"

"""The simulator: exact virtual times on hand-computed cases, and the engine's own decisions.

A synthetic cost model makes every step's duration a known number, so TTFT, ITL and E2E can be
worked out by hand; the engine, given a runner that computes nothing, must admit and preempt
the same sequences in the same steps as the simulator on the same arrival trace.
"""

from __future__ import annotations

import json
import random

import pytest

from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.policy import PolicyConfig
from tokenmill.engine.router import Router
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.kv_cache_manager import KVCacheManager, prefix_hashes
from tokenmill.sampling_params import SamplingParams
from tokenmill.sim.cost_model import LinearStepCost, fit_linear
from tokenmill.sim.simulator import ReplicaSettings, SimRequest, Simulation
from tokenmill.step_plan import SamplerOutput, StepResult, StepShape


def synthetic(**coefficients) -> LinearStepCost:
    return LinearStepCost(coefficients, source="synthetic")


def flat(rows):
    return [x for row in rows for x in row]


def run(requests, cost, **settings):
    sim = Simulation(cost, ReplicaSettings(**{"num_blocks": 100, "block_size": 4, **settings}), trace=True)
    summary = sim.run(requests)
    return sim, summary


def test_one_request_prefill_then_decodes():
    # step 1: 10 prompt tokens, 1 + 0.1 * 10 = 2.0 s; then one token per 1.1 s step (0.1 per token either way)
    sim, s = run([SimRequest(0.0, list(range(1, 11)), 3)], synthetic(fixed=1.0, per_seq=0.1, per_prefill_token=0.1))
    assert s["completed"] == 1 and s["total_output_tokens"] == 3
    assert s["ttft"]["median_ms"] == pytest.approx(2000.0)
    assert s["itl"]["median_ms"] == pytest.approx(1100.0) and s["itl"]["p99_ms"] == pytest.approx(1100.0)
    assert s["e2e"]["median_ms"] == pytest.approx(4200.0)
    assert s["tpot"]["median_ms"] == pytest.approx(1100.0)
    assert s["duration_s"] == pytest.approx(4.2)
    assert flat((e.start, e.end) for e in sim.steps) == pytest.approx([0.0, 2.0, 2.0, 3.1, 3.1, 4.2])


def test_two_requests_share_a_step():
    # A (t=0) prefills alone until 2.0; B, arriving at 0.5 while that step runs, prefills in the next
    # step beside A's decode: 1 + 0.1 * (1 + 6) = 1.7 s, ending at 3.7 (A done, B's first token);
    # B's last token comes one 1.1 s step later.
    a = SimRequest(0.0, list(range(1, 11)), 2)
    b = SimRequest(0.5, list(range(100, 106)), 2)
    sim, s = run([a, b], synthetic(fixed=1.0, per_seq=0.1, per_prefill_token=0.1))
    assert flat((e.start, e.end, e.num_tokens) for e in sim.steps) == pytest.approx(
        [0.0, 2.0, 10, 2.0, 3.7, 7, 3.7, 4.8, 1])
    assert [e.admitted for e in sim.steps] == [["req-0"], ["req-1"], []]
    assert s["ttft"]["mean_ms"] == pytest.approx((2000.0 + 3200.0) / 2)
    assert s["e2e"]["mean_ms"] == pytest.approx((3700.0 + 4300.0) / 2)


def test_a_preemption_recomputes_after_the_cached_prefix():
    # 4 usable blocks of 4 tokens; two 4-token prompts of 8 outputs each, every step 1 s. Both
    # prefill in step 1 and decode until position 8 needs a third block each: in step 6 the newer,
    # B, is preempted (its blocks freed, the one holding tokens 4-7 taken by A). B comes back after
    # A ends at t=8: its first block is still cached, so it recomputes 5 tokens in step 9 and
    # samples its last two tokens at t=10 and t=11.
    a = SimRequest(0.0, [1, 2, 3, 4], 8)
    b = SimRequest(0.0, [5, 6, 7, 8], 8)
    sim, s = run([a, b], synthetic(fixed=1.0), num_blocks=5)
    assert s["num_preemptions"] == 1
    assert [e.preempted for e in sim.steps][5] == ["req-1"]
    assert [e.admitted for e in sim.steps][8] == ["req-1"]
    assert sim.steps[8].num_tokens == 5
    assert s["e2e"]["median_ms"] == pytest.approx((8000 + 11000) / 2)
    assert s["ttft"]["median_ms"] == pytest.approx(1000.0)
    assert s["duration_s"] == pytest.approx(11.0)
    assert s["prefix_hit_rate"] == pytest.approx(4 / (4 + 4 + 9))


def test_max_concurrency_holds_requests_back_and_ttft_starts_when_sent():
    # one client slot: B waits for A to finish (t=3.0); its TTFT counts from then, as bench serve's does
    a = SimRequest(0.0, [1, 2, 3, 4], 2)
    b = SimRequest(0.0, [5, 6, 7, 8], 2)
    sim = Simulation(synthetic(fixed=1.0, per_seq=0.25, per_prefill_token=0.25), ReplicaSettings(num_blocks=100, block_size=4),
                     max_concurrency=1)
    s = sim.run([a, b])
    assert s["ttft"]["median_ms"] == pytest.approx(2000.0)  # 1 + 0.25 * 4
    assert s["e2e"]["median_ms"] == pytest.approx(3250.0)
    assert s["duration_s"] == pytest.approx(6.5)


def test_prefix_aware_routing_sends_a_family_where_its_prefix_is_cached():
    family = [list(range(1, 65)), list(range(200, 264))]
    requests = [SimRequest(float(i), family[i % 2] + [1000 + i] * 8, 4) for i in range(16)]
    hit = {}
    for policy in ("prefix", "round_robin"):
        sim = Simulation(synthetic(fixed=0.01), ReplicaSettings(num_blocks=200, block_size=16), num_replicas=3,
                         routing_policy=policy)
        hit[policy] = sim.run(requests)["prefix_hit_rate"]
    # prefix: each family misses once (its first request), round robin once per replica
    assert hit["prefix"] == pytest.approx(14 * 64 / (16 * 72))
    assert hit["round_robin"] < hit["prefix"]


def test_router_balances_load_before_affinity():
    class Replica:
        def __init__(self, load, cached_tokens):
            self.kv = KVCacheManager(BlockPool(20), 4)
            self.load = load
            if cached_tokens:
                from tokenmill.sequence import Sequence

                seq = Sequence("warm", 0, list(range(cached_tokens)) + [99], SamplingParams(), 0.0)
                self.kv.allocate(seq, self.kv.lookup(seq), seq.num_tokens)
                seq.num_computed_tokens = cached_tokens
                self.kv.cache_full_blocks(seq)
    prompt = list(range(12)) + [7]
    assert len(list(prefix_hashes(prompt, 4))) == 3
    replicas = [Replica(3, 0), Replica(5, 8), Replica(4, 12)]
    assert Router("prefix", 4).route(replicas, prompt) == 2
    assert Router("least_loaded", 4).route(replicas, prompt) == 0
    assert Router("prefix", 4, balance_threshold=1).route(replicas, prompt) == 0  # loads 3..5 too far apart
    rr = Router("round_robin", 4)
    assert [rr.route(replicas, prompt) for _ in range(4)] == [0, 1, 2, 0]


def test_pools_count_the_replicas_caching_each_first_block():
    first_blocks: dict[int, int] = {}
    pools = [BlockPool(4, first_blocks), BlockPool(4, first_blocks)]
    root = [pool.cache(pool.allocate(1)[0], 11, (1, 2), None, None) for pool in pools]
    child = pools[0].cache(pools[0].allocate(1)[0], 12, (3, 4), root[0], None)
    assert first_blocks == {11: 2}  # a later block is not counted
    for pool in pools:
        pool.free([root[pools.index(pool)].block])
    pools[0].free([child.block])
    pools[0].allocate(3)  # evicts both of its cached blocks
    assert first_blocks == {11: 1}
    assert pools[1].reset_cache() and first_blocks == {}


def test_the_routers_first_block_index_changes_no_decision():
    """The simulator's shortcut (a prompt whose first block no replica caches goes straight to the
    least loaded) routes every request as asking each replica does; the loads it reads are the
    schedulers' own counts."""
    rng = random.Random(3)
    common = [rng.randrange(2, 900) for _ in range(8)]  # the families share their first blocks, then part
    families = [common + [rng.randrange(2, 900) for _ in range(16)] for _ in range(3)]
    t, requests = 0.0, []
    for i in range(120):
        t += rng.expovariate(40.0)
        prefix = families[i % 3] if i % 4 else []
        requests.append(SimRequest(t, prefix + [rng.randrange(2, 900) for _ in range(rng.randint(4, 40))],
                                   rng.randint(1, 40)))

    class CheckingRouter(Router):
        def route(self, replicas, token_ids, cache_salt=None, first_blocks=None):
            assert [r.load for r in replicas] == [len(r.scheduler.waiting) + len(r.scheduler.running) for r in replicas]
            return super().route(replicas, token_ids, cache_salt, first_blocks)

    traces = []
    for indexed in (True, False):
        sim = Simulation(synthetic(fixed=0.01, per_seq=0.001, per_prefill_token=0.0002), trace=True, num_replicas=4,
                         settings=ReplicaSettings(num_blocks=40, block_size=4, max_num_seqs=8, max_num_batched_tokens=64))
        sim.router = CheckingRouter("prefix", 4, balance_threshold=3)
        if not indexed:
            sim._first_blocks = None  # the pools still count; the router asks each replica
        summary = sim.run(requests)
        traces.append(([(e.replica, e.admitted) for e in sorted(sim.steps, key=lambda e: (e.start, e.replica))],
                       summary["prefix_hit_rate"], summary["num_preemptions"]))
    assert traces[0] == traces[1]
    assert traces[0][1] > 0 and traces[0][2] > 0


def test_a_step_reads_a_shared_prefix_block_once():
    from tokenmill.sequence import Sequence
    from tokenmill.step_plan import ScheduledChunk, StepShape

    a, b = (Sequence(r, 0, list(range(20)), SamplingParams(), 0.0) for r in "ab")
    shape = StepShape.of([ScheduledChunk(a, 19, 1, [1, 2, 3]), ScheduledChunk(b, 19, 1, [1, 2, 4])])
    assert (shape.num_context_tokens, shape.num_kv_blocks) == (40, 4)


def test_fit_recovers_the_coefficients_of_timed_steps():
    truth = synthetic(fixed=0.02, per_seq=0.001, per_prefill_token=0.0004, prefill_step=0.01, per_context_token=2e-6)
    shapes = [StepShape(b, b + p, b * c + p, 0.0) for b in (1, 4, 16) for c in (64, 512) for p in (0, 64, 256)]
    model = fit_linear(shapes, [truth.shape_seconds(s) for s in shapes])
    for term, value in truth.coefficients.items():
        assert model.coefficients[term] == pytest.approx(value, rel=1e-6, abs=1e-12)


# ---- the engine makes the same decisions -------------------------------------------------------


class NoComputeRunner:
    """Stands in for the model: every sampling chunk gets token 5; records each step's chunks."""

    def __init__(self):
        self.chunks = None

    def copy_blocks(self, copies):
        pass

    def execute(self, chunks, blocked, draft_probs=None):
        self.chunks = list(chunks)
        sampled = [c for c in chunks if c.sample]
        return StepResult(sampled, SamplerOutput([5] * len(sampled), None, None, None), [1] * len(sampled))


def workload(seed: int, n: int = 14):
    rng = random.Random(seed)
    t, requests = 0.0, []
    for _ in range(n):
        t += rng.expovariate(4.0)
        requests.append(SimRequest(t, [rng.randrange(10, 500) for _ in range(rng.randint(5, 70))], rng.randint(2, 24),
                                   priority=rng.randint(0, 2)))
    return requests


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_engine_and_simulator_decide_alike(stories_path, policy):
    cost = synthetic(fixed=0.05, per_seq=0.002, per_prefill_token=0.002, per_context_token=0.0001)
    engine = LLMEngine(str(stories_path), max_num_seqs=4, max_num_batched_tokens=48, block_size=16,
                       kv_cache_memory=16 * 16 * 5 * 2 * 4 * 4 * 8, scheduling_policy=policy)
    engine.runner = runner = NoComputeRunner()
    requests = workload(3)
    engine_steps = []
    pending, t, ids = list(requests), 0.0, iter(range(len(requests)))
    while pending or engine.has_unfinished_requests():
        if not engine.has_unfinished_requests() and pending[0].arrival > t:
            t = pending[0].arrival
        while pending and pending[0].arrival <= t:
            r = pending.pop(0)
            engine.add_request(f"req-{next(ids)}", r.prompt_ids, SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                               arrival_time=t, priority=r.priority)
        waiting = {id(s) for s in engine.scheduler.waiting}
        before = {s.request_id: s.num_preemptions for s in engine.scheduler.waiting + engine.scheduler.running}
        runner.chunks = None
        engine.step()
        assert runner.chunks, "the engine stalled"
        after = {s.request_id: s.num_preemptions for s in engine.scheduler.waiting + engine.scheduler.running}
        engine_steps.append(([c.seq.request_id for c in runner.chunks if id(c.seq) in waiting],
                             sorted(r for r in after if after[r] > before.get(r, 0)),
                             sum(c.num_tokens for c in runner.chunks)))
        t += cost.step_seconds(runner.chunks)
    settings = ReplicaSettings(engine.block_pool.num_blocks, 16, 4, 48, engine.max_model_len, True, PolicyConfig(policy))
    sim = Simulation(cost, settings, trace=True)
    summary = sim.run(requests)
    sim_steps = [(e.admitted, sorted(e.preempted), e.num_tokens) for e in sim.steps]
    assert sim_steps == engine_steps
    assert summary["duration_s"] == pytest.approx(t)
    assert summary["num_preemptions"] == engine.stats().num_preemptions
    if policy == "fcfs":
        assert summary["num_preemptions"] > 0, "the workload should force preemptions"


# ---- workloads and planning ----------------------------------------------------------------------


def test_synthetic_workload_follows_bench_serve_knobs():
    from tokenmill.sim.workload import WorkloadSpec, synthetic

    spec = WorkloadSpec(num_prompts=40, request_rate=5.0, input_len="80:120", output_len=16, shared_prefix_len=64,
                        num_prefixes=2, vocab_size=1000, seed=1)
    requests = list(synthetic(spec))
    assert len(requests) == 40 and requests[0].arrival == 0.0
    assert all(a.arrival <= b.arrival for a, b in zip(requests, requests[1:]))
    assert all(80 <= len(r.prompt_ids) <= 120 and r.output_len == 16 for r in requests)
    assert len({tuple(r.prompt_ids[:64]) for r in requests}) == 2  # two families
    assert requests[0].prompt_ids[:64] == requests[2].prompt_ids[:64] != requests[1].prompt_ids[:64]
    assert requests == list(synthetic(spec))  # seeded
    many = list(synthetic(WorkloadSpec(num_prompts=2500, input_len="4:9", output_len=2, vocab_size=50, seed=2)))
    assert len(many) == 2500 and all(4 <= len(r.prompt_ids) <= 9 for r in many)  # drawn 1,024 prompts at a time
    assert len({tuple(r.prompt_ids) for r in many}) > 2400
    from tokenmill.bench.workload import TenantSpec

    tenants = WorkloadSpec(tenants=[TenantSpec.parse("name=a,num=5,rate=2,input=8,output=3"),
                                    TenantSpec.parse("name=b,num=7,rate=9,input=16,output=2,priority=1")])
    merged = list(synthetic(tenants))
    assert [r.arrival for r in merged] == sorted(r.arrival for r in merged)
    assert sorted(r.tenant for r in merged) == ["a"] * 5 + ["b"] * 7
    assert {len(r.prompt_ids) for r in merged if r.tenant == "b"} == {16} and all(r.priority == 1 for r in merged
                                                                                   if r.tenant == "b")


def test_trace_lines_share_named_prefixes_and_bad_lines_say_where(tmp_path):
    from tokenmill.errors import InvalidParameterError
    from tokenmill.sim.workload import load_trace

    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival": 0, "input_len": 40, "prefix": "sys", "prefix_len": 32, "output_len": 4}\n'
                    '{"arrival": 0.5, "input_len": 36, "prefix": "sys", "prefix_len": 32, "output_len": 2, "tenant": "a"}\n'
                    '{"arrival": 1, "prompt_ids": [1, 2, 3], "output_len": 1}\n')
    first, second, third = load_trace(path)
    assert first.prompt_ids[:32] == second.prompt_ids[:32] and len(second.prompt_ids) == 36
    assert second.tenant == "a" and third.prompt_ids == [1, 2, 3]
    path.write_text('{"arrival": 0, "input_len": 4, "output_len": 1}\n{"arrival": 1, "output_len": 0, "input_len": 3}\n')
    with pytest.raises(InvalidParameterError, match="trace.jsonl line 2"):
        list(load_trace(path))
    for line, why in [('{"arrival": 0, "input_len": 1000000000000, "output_len": 1}', "does not fit max_model_len"),
                      ('{"arrival": 0, "prompt_ids": [1e30], "output_len": 1}', "token ids from 0 to 999"),
                      ('{"arrival": 0, "prompt_ids": [-3, 5], "output_len": 1}', "token ids"),
                      ('{"arrival": 0, "prompt_ids": [1000], "output_len": 1}', "token ids"),
                      ('{"arrival": 0, "prompt_ids": "abc", "output_len": 1}', "token ids"),
                      ("[1, 2]", "a JSON object")]:
        path.write_text(line + "\n")  # refused before any token is drawn: no 7 TiB array
        with pytest.raises(InvalidParameterError, match=f"line 1: .*{why}"):
            list(load_trace(path, vocab_size=1000, max_len=4096))


def test_plan_finds_the_fewest_replicas_that_meet_the_slo():
    from tokenmill.sim.plan import meets, search
    from tokenmill.sim.workload import WorkloadSpec, synthetic as requests_of

    spec = WorkloadSpec(num_prompts=120, request_rate=40.0, input_len=64, output_len=8, vocab_size=1000)
    cost = synthetic(fixed=0.02, per_seq=0.0005, per_prefill_token=0.0005)
    slos = {"ttft": 200.0}
    best, tried = search(cost, ReplicaSettings(num_blocks=400, block_size=16), lambda: requests_of(spec), slos,
                         max_num_seqs=[8], max_num_batched_tokens=[256], policies=["fcfs"], max_replicas=64)
    assert best is not None and meets(best.summary, slos, 90, 120)
    fewer = [c for c in tried if c.replicas == best.replicas - 1]
    assert fewer and not meets(fewer[0].summary, slos, 90, 120)
    assert best.summary["ttft"]["p90_ms"] <= 200.0 and best.replicas > 1


@pytest.mark.parametrize("policy", ["fcfs", "priority", "aging", "sjf", "fair"])
def test_runs_of_decode_steps_applied_in_one_go_change_nothing(policy):
    """The fast path (plain decode steps applied together, cut when an arrival joins) gives the very
    steps, records and counters of stepping one at a time, preemptions and several replicas included."""
    rng = random.Random(7)
    t, requests = 0.0, []
    for i in range(80):
        t += rng.expovariate(30.0)
        shared = [1] * 32 if i % 3 == 0 else []
        requests.append(SimRequest(t, shared + [rng.randrange(2, 900) for _ in range(rng.randint(4, 90))],
                                   rng.randint(1, 60), tenant="ab"[i % 2], priority=rng.randint(0, 2)))
    cost = synthetic(fixed=0.01, per_seq=0.0012, per_prefill_token=0.0002, prefill_step=0.003, per_context_token=1e-5,
                     per_kv_block=3e-4)  # a run's distinct blocks per step must match the steps' own
    results = {}
    for fast in (False, True):
        settings = ReplicaSettings(num_blocks=60, block_size=8, max_num_seqs=6, max_num_batched_tokens=64,
                                   policy=PolicyConfig(policy))
        sim = Simulation(cost, settings, num_replicas=2, trace=True, fast_forward=fast)
        summary = sim.run(requests)
        assert (sim.num_decode_runs > 10) == fast
        steps = sorted(sim.steps, key=lambda e: (e.replica, e.start))  # a run's steps are traced when it ends
        results[fast] = (summary, [(e.replica, e.admitted, sorted(e.preempted), e.num_tokens) for e in steps],
                         [e.end for e in steps])
    (slow, slow_steps, slow_ends), (fast, fast_steps, fast_ends) = results[False], results[True]
    assert fast_steps == slow_steps
    assert fast_ends == pytest.approx(slow_ends, rel=1e-12)
    assert slow["num_preemptions"] > 0 and slow["completed"] == 80
    for key in ("completed", "num_preemptions", "num_steps", "total_output_tokens", "prefix_hit_rate"):
        assert fast[key] == slow[key], key
    for name in ("ttft", "itl", "e2e", "tpot"):
        assert fast[name] == pytest.approx(slow[name], rel=1e-9), name


# ---- the commands ------------------------------------------------------------------------------


def test_calibrate_steps_then_simulate_finds_the_model_of_the_same_flags(stories_path, tmp_path, monkeypatch, capsys):
    from tokenmill.entrypoints.cli import main

    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "cache"))
    flags = ["--model", str(stories_path), "--kv-cache-memory", "4MiB", "--max-num-seqs", "8"]
    main(["calibrate", "--steps", *flags])
    out = capsys.readouterr().out
    assert "step cost of stories260k|dtype auto" in out and "median error" in out
    assert main(["simulate", *flags, "--num-prompts", "20", "--request-rate", "50", "--input-len", "16:64",
                 "--output-len", "8", "--output-json", str(tmp_path / "sim.json")]) == 0
    out = capsys.readouterr().out
    assert "| completed requests | 20 |" in out and "cost model measured (stories260k|" in out
    result = json.loads((tmp_path / "sim.json").read_text())
    assert result["runs"][0]["summary"]["total_output_tokens"] == 160 and result["cost_model"]["kind"] == "linear"
    # other model flags: another model, which was not calibrated
    assert main(["simulate", *flags, "--dtype", "bfloat16", "--num-prompts", "2"]) == 2
    assert "run `tokenmill calibrate --steps`" in capsys.readouterr().err


def test_plan_on_a_modelled_chip_prints_the_cheapest_plan(tmp_path, capsys):
    from tokenmill.entrypoints.cli import main

    args = ["plan", "--model", "llama-3.1-8b", "--chip", "h200", "--rate", "40", "--slo", "ttft:300,tpot:40",
            "--num-prompts", "300", "--input-len", "256:1024", "--output-len", "32:128", "--max-num-seqs", "32",
            "--try-max-num-seqs", "8", "32", "--output-json", str(tmp_path / "plan.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "llama-3.1-8b at 40.0 requests/s" in out and "$" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    chosen = plan["plan"]
    assert chosen["summary"]["ttft"]["p90_ms"] <= 300 and chosen["summary"]["tpot"]["p90_ms"] <= 40
    cheaper = [c for c in plan["tried"] if c["replicas"] < chosen["replicas"]]
    assert all(c["summary"]["ttft"]["p90_ms"] > 300 or c["summary"]["tpot"]["p90_ms"] > 40 for c in cheaper)


def test_simulate_bad_flags_say_what_is_wrong(tmp_path, capsys):
    from tokenmill.entrypoints.cli import main

    assert main(["simulate", "--model", "llama-3.1-8b", "--chip", "h100", "--num-prefixes", "0"]) == 2
    assert "num_prefixes" in capsys.readouterr().err
    assert main(["simulate", "--model", "llama-3.1-70b", "--chip", "h100"]) == 2
    assert "does not fit on one h100" in capsys.readouterr().err
    for text in ("not json", '{"kind": "linear", "coefficients": {"bogus": 1}}', '{"kind": "roofline"}'):
        (tmp_path / "cost.json").write_text(text)
        assert main(["simulate", "--model", "llama-3.1-8b", "--cost-model", str(tmp_path / "cost.json")]) == 2
        assert "cost_model: " in capsys.readouterr().err
    assert main(["simulate", "--model", "llama-3.1-8b", "--cost-model", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: cannot read it" in capsys.readouterr().err

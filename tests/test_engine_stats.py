"""LLMEngine.stats(): a frozen snapshot of the engine's state after each step or request change,
which /metrics and the benchmarks read instead of reaching into the scheduler, pool or policy."""

from __future__ import annotations

import dataclasses

import pytest

from tokenmill import SamplingParams
from tokenmill.engine.engine import LLMEngine
from tokenmill.step_plan import StepShape

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def test_stats_follow_requests_and_stay_frozen(tiny_models):
    engine = LLMEngine(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="2MiB", max_num_seqs=1,
                       scheduling_policy="fair")
    empty = engine.stats()
    assert (empty.num_requests, empty.num_running, empty.num_waiting) == (0, 0, 0)
    assert empty.kv_free_blocks == empty.kv_total_blocks > 0 and empty.kv_usage == 0
    assert empty.last_step is None and empty.last_step_seconds is None
    prompt = list(range(3, 40))
    engine.add_request("a", prompt, GREEDY, tenant="alice")
    engine.add_request("b", prompt, GREEDY, tenant="bob")
    queued = engine.stats()
    assert (queued.num_requests, queued.num_waiting, queued.num_queued) == (2, 2, 1)  # one seat
    engine.step()
    running = engine.stats()
    assert (running.num_running, running.num_waiting) == (1, 1) and running.kv_usage > 0
    assert running.policy.name == "fair" and running.policy.tenant_tokens == {"alice": len(prompt)}
    # the step's shape and wall time, what `tokenmill calibrate --steps` fits the simulator's cost model to
    blocks = -(-len(prompt) // engine.kv_cache.block_size)
    assert running.last_step == StepShape(1, len(prompt), len(prompt), len(prompt) * (len(prompt) + 1) / 2, blocks)
    assert running.last_step_seconds > 0
    drain(engine)
    done = engine.stats()
    assert done.num_requests == 0 and done.kv_free_blocks == done.kv_total_blocks
    assert done.prefix_cache.queries_tokens == 2 * len(prompt) and done.prefix_cache.hit_tokens > 0
    assert done.policy.tenant_tokens["bob"] > 0
    # earlier snapshots kept their values: they hold copies, not the engine's live objects
    assert running.policy.tenant_tokens == {"alice": len(prompt)} and running.prefix_cache.queries_tokens == len(prompt)
    with pytest.raises(dataclasses.FrozenInstanceError):
        done.num_running = 3


def test_stats_carry_speculation_and_the_length_estimator(tiny_models):
    path = str(tiny_models["llama"])
    engine = LLMEngine(path, dtype="float32", kv_cache_memory="2MiB", scheduling_policy="sjf",
                       speculative_config={"method": "draft", "model": path, "num_speculative_tokens": 2})
    assert engine.stats().spec.draft_tokens == 0
    engine.add_request("a", [5, 6, 7, 8], GREEDY)
    drain(engine)
    stats = engine.stats()
    assert stats.spec.draft_tokens > 0 and stats.spec.accepted_tokens == stats.spec.draft_tokens  # draft = target
    assert stats.policy.name == "sjf" and stats.policy.length_estimator.observations == 1
    plain = LLMEngine(path, dtype="float32", kv_cache_memory="2MiB")
    assert plain.stats().spec is None and plain.stats().policy.length_estimator is None


def test_setting_the_roofline_turns_its_fractions_on_in_stats(tiny_models, tmp_path, monkeypatch):
    from tokenmill.metering.roofline import Roofline

    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path))  # no cached calibration: the roofline starts off
    engine = LLMEngine(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="2MiB")
    assert engine.roofline is None and engine.stats().roofline == {}
    engine.roofline = Roofline(bandwidth=1e9, peak_flops=1e10)
    assert set(engine.stats().roofline) == {"prefill", "decode"}  # the snapshot is taken again at once
    engine.add_request("a", list(range(3, 20)), GREEDY)
    drain(engine)
    assert engine.stats().roofline["decode"].fraction > 0
    engine.roofline = None
    assert engine.stats().roofline == {}

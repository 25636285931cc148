"""Data-parallel replicas on a local Ray instance: the same greedy answers as one engine, prefix-aware
routing that caches more than round-robin, a replica killed and brought back, every KV block freed.

Each replica is a Ray actor process with the default model and one thread."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tokenmill.engine.replicas import ReplicaLostError, ReplicatedEngine
from tokenmill.errors import InvalidParameterError
from tokenmill.sampling_params import SamplingParams

from server_process import ServerProcess

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tokenmill[ray]')")

GREEDY = SamplingParams(temperature=0, max_tokens=12)
PROMPTS = ["The capital of France is", "Water boils at", "A haiku about the sea:", "def fibonacci(n):",
           "The three primary colors are", "Once upon a time"]
DEADLINE = 180  # seconds a replica may take to come back (a Ray restart builds its engine again)


@pytest.fixture(scope="module")
def local_ray(default_model_available):
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def replicated(local_ray):
    """A factory of ReplicatedEngines of the default model, each shut down after the test."""
    made = []

    def make(routing_policy: str = "prefix", **engine_kwargs) -> ReplicatedEngine:
        made.append(ReplicatedEngine(None, engine_kwargs, 2, 1, routing_policy=routing_policy))
        return made[-1]

    yield make
    for engine in made:
        assert_all_blocks_free(engine)
        engine.shutdown()


def assert_all_blocks_free(engine: ReplicatedEngine, timeout: float = 30) -> None:
    """Every replica idle with its whole pool free, within `timeout` (an abort reaches a replica's engine
    thread between two of its steps)."""
    deadline = time.monotonic() + timeout
    while True:
        asyncio.run(engine.refresh_stats())
        busy = [(r.index, r.load, s.num_requests, s.kv_total_blocks - s.kv_free_blocks) for r, s in engine.replica_stats()
                if r.load or s.num_requests or s.kv_free_blocks != s.kv_total_blocks]
        if not busy:
            return
        assert time.monotonic() < deadline, f"(replica, in flight, requests, KV blocks held): {busy}"
        time.sleep(0.1)


async def answer(engine, request_id: str, prompt, params: SamplingParams = GREEDY):
    stream = await engine.add_request(request_id, prompt, params)
    output = None
    async for output in stream:
        pass
    return output


def test_replicas_answer_as_one_engine(replicated):
    from tokenmill.entrypoints.llm import LLM

    expected = [o.outputs[0].token_ids for o in LLM().generate(PROMPTS, GREEDY)]
    engine = replicated("round_robin")  # both replicas serve some of the prompts

    async def run():
        return await asyncio.gather(*(answer(engine, f"r{i}", p) for i, p in enumerate(PROMPTS)))

    outputs = asyncio.run(run())
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert [r.routed for r in engine.replicas] == [3, 3]


def test_prefix_routing_caches_more_prompt_tokens_than_round_robin(replicated):
    """Two families of prompts over 512-token prefixes: prefix-aware routing sends each family to one
    replica, so every prompt after a family's first finds its prefix cached; round-robin splits them."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(1000, 40000) for _ in range(512)] for _ in range(2)]
    first = [prefixes[0] + [11, 12], prefixes[1] + [21, 22]]
    rest = [prefixes[f] + [100 + i, 200 + i] for i, f in enumerate([0, 0, 0, 1, 1, 1])]
    params = SamplingParams(temperature=0, max_tokens=1)
    hits = {}
    for policy in ("prefix", "round_robin"):
        engine = replicated(policy)

        async def run():
            await asyncio.gather(*(answer(engine, f"first{i}", p, params) for i, p in enumerate(first)))
            await asyncio.gather(*(answer(engine, f"rest{i}", p, params) for i, p in enumerate(rest)))
            await engine.refresh_stats()

        asyncio.run(run())
        hits[policy] = engine.stats().prefix_cache.hit_tokens  # what /metrics shows as the total
    assert hits["prefix"] == 6 * 512, hits
    assert hits["round_robin"] < hits["prefix"], hits


def test_a_client_that_leaves_frees_its_blocks_and_the_others_go_on(replicated):
    engine = replicated()
    long = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)

    async def run():
        leaving = [await engine.add_request(f"leave{i}", p, long) for i, p in enumerate(PROMPTS[:3])]
        staying = asyncio.gather(*(answer(engine, f"stay{i}", p) for i, p in enumerate(PROMPTS[3:])))
        for stream in leaving:
            async for output in stream:
                if len(output.outputs[0].token_ids) >= 2:
                    break  # leaving the iteration aborts the request
        assert all(o.finished for o in await staying)

    asyncio.run(run())
    assert_all_blocks_free(engine)


def test_a_killed_replica_ends_its_requests_and_comes_back(replicated):
    engine = replicated("least_loaded")  # the first request goes to replica 0
    victim = engine.replicas[0]
    long = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)

    async def run():
        outputs = (await engine.add_request("long", "Tell me a very long story.", long)).__aiter__()
        first = await asyncio.wait_for(outputs.__anext__(), 60)  # it is running on the victim
        assert victim.load == 1 and first.outputs[0].token_ids
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(ReplicaLostError, match="died"):
            await asyncio.wait_for(drain(outputs), 60)  # ends with an error, never hangs
        later = await asyncio.gather(*(answer(engine, f"later{i}", p) for i, p in enumerate(PROMPTS)))
        assert all(o.finished for o in later)
        deadline = time.monotonic() + DEADLINE
        while engine.num_up < 2:
            assert time.monotonic() < deadline, "the killed replica did not come back"
            await asyncio.sleep(0.2)
        back = await answer(engine, "back", PROMPTS[0])  # the restarted replica serves again
        assert back.finished

    asyncio.run(run())
    assert victim.restarts == 1 and victim.up


async def drain(outputs):
    async for _ in outputs:
        pass


def test_an_unknown_routing_policy_is_refused_before_anything_starts():
    with pytest.raises(InvalidParameterError, match="routing_policy"):
        ReplicatedEngine(None, {}, 2, 1, routing_policy="random")


@pytest.mark.slow
def test_server_with_replicas_survives_a_killed_replica(default_model_available):
    """The real server with two replicas: /health and /metrics count them, a killed replica's process
    is replaced while every later request gets 200, and every KV block ends free."""
    import openai

    with ServerProcess(["--data-parallel-size", "2", "--threads-per-replica", "1"]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        assert server.get_json("/health")["replicas"] == {"up": 2, "total": 2}
        chat = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                               max_tokens=8, temperature=0) for p in PROMPTS]
        assert all(c.choices[0].message.content for c in chat)
        pid = int(next(labels["pid"] for labels, _ in server.samples("tokenmill_replica_info")
                       if labels["replica"] == "0"))
        os.kill(pid, signal.SIGKILL)
        for prompt in PROMPTS * 2:  # routed around the dead replica: no error
            assert client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0).choices
        deadline = time.monotonic() + DEADLINE
        while server.get_json("/health")["replicas"]["up"] < 2:
            assert time.monotonic() < deadline, "the killed replica did not come back"
            time.sleep(0.2)
        assert server.metric("tokenmill_replica_restarts_total", 'replica="0"') == 1
        for i in (0, 1):
            assert (server.metric("tokenmill_replica_kv_cache_free_blocks", f'replica="{i}"')
                    == server.metric("tokenmill_replica_kv_cache_total_blocks", f'replica="{i}"'))
        assert server.metric("tokenmill_kv_cache_free_blocks") == server.metric("tokenmill_kv_cache_total_blocks")


def test_without_ray_the_flag_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(InvalidParameterError, match=r"pip install 'tokenmill\[ray\]'"):
        ReplicatedEngine(None, {}, 2, 1)


@pytest.mark.parametrize("flags, message", [
    (["--data-parallel-size", "0"], "data_parallel_size: must be at least 1"),
    (["--data-parallel-size", "2", "--threads-per-replica", "0"], "threads_per_replica: must be at least 1"),
    (["--threads-per-replica", "1"], "threads_per_replica: applies to replicas"),
    (["--data-parallel-size", "2", "--routing-policy", "random"], "invalid choice"),
])
def test_serve_refuses_bad_replica_flags(flags, message):
    result = subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", *flags],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr, result.stderr

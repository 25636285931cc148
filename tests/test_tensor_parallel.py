"""Tensor parallelism: an engine of tensor_parallel_size 2 (this process as rank 0, one worker process,
gloo over loopback) computes what one rank computes: float32 logits within 1e-5, the same 64 greedy
tokens, in float32 and in the int8 / int4 forms; sizes the model cannot be split by are refused; a
worker that dies fails the step with an error that says so. conftest.py checks after each test that
every KV block is back in the pool."""

from __future__ import annotations

import asyncio
import signal
from contextlib import contextmanager

import psutil
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tokenmill.engine.async_engine import AsyncLLMEngine, EngineStepError, UnavailableError
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import InvalidParameterError, TensorParallelError
from tokenmill.executor.layers.linear import Int4Linear, Int8Linear
from tokenmill.sampling_params import SamplingParams
from tokenmill.sequence import Sequence
from tokenmill.step_plan import ScheduledChunk

from conftest import save_tiny_model
from test_gguf import tiny_model as gguf_tiny_model, write_gguf

OPTIONS = dict(kv_cache_memory="4MiB", max_num_seqs=8)
GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3, 42], list(range(10, 40)), [7] * 12]


@contextmanager
def engines(path, **options):
    """(one rank, two ranks) of the same model and options; the workers end with the block."""
    single = LLMEngine(str(path), **OPTIONS, **options)
    split = LLMEngine(str(path), tensor_parallel_size=2, **OPTIONS, **options)
    try:
        yield single, split
    finally:
        split.shutdown()


def logits_trace(engine: LLMEngine, prompt: list[int], decodes: int = 6) -> list[torch.Tensor]:
    """Logits of a prompt prefilled in two chunks (the second reads the first's KV from the cache),
    then of `decodes` greedy decode steps; the blocks are given back."""
    seq = Sequence("r", 0, list(prompt), SamplingParams(), 0.0)
    spans = [(0, len(prompt) // 2), (len(prompt) // 2, len(prompt) - len(prompt) // 2)]
    trace = []
    try:
        for _ in range(len(spans) + decodes):
            start, length = spans.pop(0) if spans else (seq.num_tokens - 1, 1)
            assert engine.kv_cache.grow(seq.seq_id, start, start + length)
            chunk = ScheduledChunk(seq, start, length, engine.kv_cache.block_table(seq.seq_id))
            trace.append(engine.runner.logits_for([chunk]))
            if not spans:
                seq.token_ids.append(int(trace[-1][-1].argmax()))
    finally:
        engine.kv_cache.free(seq.seq_id)
    return trace


def compare_logits(single: LLMEngine, split: LLMEngine, prompt: list[int]) -> tuple[float, float, float]:
    """Over a prefill and decodes: the largest difference between the two engines' logits, the largest
    logit's magnitude (one rank's), and the largest KL divergence of the two ranks' next-token
    distribution from one rank's."""
    expected, got = torch.cat(logits_trace(single, prompt)), torch.cat(logits_trace(split, prompt))
    p, q = expected.double().log_softmax(-1), got.double().log_softmax(-1)
    kl = p.exp() * (p - q)
    return (expected - got).abs().max().item(), expected.abs().max().item(), kl.sum(-1).max().item()


def greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's 64 greedy tokens, all prompts batched together."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    return [tokens[str(i)] for i in range(len(prompts))]


def assert_same_as_one_rank(single: LLMEngine, split: LLMEngine, prompts: list[list[int]], tolerance: float) -> None:
    """Logits within `tolerance` times the largest logit's magnitude (at least 1), then the same 64 greedy
    tokens for each prompt, batched.

    Column-parallel layers compute each output as one rank does, bit for bit; a row-parallel layer
    (O, down) adds the two ranks' halves of each dot product: a float32 sum in another order, a few
    units in the last place of the logits (stories260K's reach 17, where one unit is 1.9e-6)."""
    difference, scale, kl = compare_logits(single, split, prompts[1])
    print(f"2 ranks against 1: largest logit difference {difference:.3g} (largest logit {scale:.3g}), "
          f"largest KL {kl:.2g}")
    assert difference <= tolerance * max(1.0, scale)
    expected = greedy(single, prompts)
    assert greedy(split, prompts) == expected
    assert all(len(t) == 64 for t in expected)
    pool = split.block_pool
    assert pool.num_free_blocks == pool.num_usable_blocks and pool.num_used_blocks == 0


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {arch: save_tiny_model(root / arch, arch) for arch in ("llama", "qwen2")}


def test_stories260k_float32(stories_path):
    with engines(stories_path, dtype="float32") as (single, split):
        prompts = [single.tokenizer.encode("Once upon a time, there was a little girl"), *PROMPTS]
        assert_same_as_one_rank(single, split, prompts, 1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: Q/K/V biases are split with their rows
def test_tiny_random_model_float32(tiny_llamas, arch):
    with engines(tiny_llamas[arch], dtype="float32") as (single, split):
        assert_same_as_one_rank(single, split, PROMPTS, 1e-5)


# The low-bit kernels quantize each layer's input to int8 codes (two terms, about 15 bits): a last-place
# difference left by a row-parallel sum can move a code, so the logits differ by up to about 1e-4 of
# their scale (measured), where float32 differs by 1e-6.
QUANTIZED_TOLERANCE = 1e-3


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_quantized_at_load(tiny_llamas, form):
    """Weights quantized as they load: each rank's share is quantized in the groups the whole layer has,
    so only the float sums of the row-parallel layers' halves differ."""
    with engines(tiny_llamas["llama"], dtype="float32", quantization=form) as (single, split):
        layer = {"int8": Int8Linear, "int4": Int4Linear}[form]
        assert all(isinstance(m, layer) for m in (split.runner.model.layers[0].mlp.down_proj,
                                                   split.runner.model.layers[0].self_attn.o_proj))
        assert_same_as_one_rank(single, split, PROMPTS, QUANTIZED_TOLERANCE)


def test_gguf_int4_and_int8_blocks_kept_as_stored(tmp_path):
    """A GGUF of Q4_0 and Q8_0 tensors: each rank keeps its rows, or its inputs' whole blocks, as stored."""
    config, state = gguf_tiny_model("llama", 256, intermediate_size=128)
    types = {name: Q.Q8_0 for name in state if "v_proj" in name or "down_proj" in name}
    path = write_gguf(tmp_path / "tiny.gguf", "llama", config, state, Q.Q4_0, permute=True, types=types)
    with engines(path, dtype="float32") as (single, split):
        assert split.memory_report.weights == "int4 + int8 as the file stores them"
        assert_same_as_one_rank(single, split, PROMPTS, QUANTIZED_TOLERANCE)


@pytest.mark.parametrize("size, what", [(3, "attention heads (4)"), (4, "KV heads (2)")])
def test_a_size_that_does_not_divide_the_heads_is_refused(tiny_llamas, size, what):
    with pytest.raises(InvalidParameterError, match=rf"tensor_parallel_size: {size} does not divide the model's "
                                                    rf"{what.replace('(', '[(]').replace(')', '[)]')}"):
        LLMEngine(str(tiny_llamas["llama"]), tensor_parallel_size=size, **OPTIONS)
    assert not psutil.Process().children()  # refused before any worker started


def test_a_size_below_one_is_refused(tiny_llamas):
    with pytest.raises(InvalidParameterError, match="tensor_parallel_size: must be at least 1"):
        LLMEngine(str(tiny_llamas["llama"]), tensor_parallel_size=0)


def test_a_split_through_int4_groups_is_refused(tmp_path):
    """down_proj has 96 inputs in Q4_0 groups of 32: halves of 48 would cut a group."""
    config, state = gguf_tiny_model("llama", 256)
    path = write_gguf(tmp_path / "tiny.gguf", "llama", config, state, Q.Q4_0, permute=True)
    with pytest.raises(InvalidParameterError, match=r"tensor_parallel_size: model\.layers\.0\.mlp\.down_proj\.weight "
                                                    r"\(64 x 96\) is int4 in groups of 32 as a whole"):
        LLMEngine(str(path), tensor_parallel_size=2, **OPTIONS)
    assert not psutil.Process().children()  # the worker that had started is gone


def test_a_dead_worker_fails_the_step_with_a_clear_error(tiny_llamas):
    engine = LLMEngine(str(tiny_llamas["llama"]), tensor_parallel_size=2, **OPTIONS)
    try:
        engine.add_request("r", PROMPTS[1], GREEDY)
        engine.step()
        (worker,) = engine.workers.procs
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        for _ in range(2):  # and every later step, at once
            with pytest.raises(TensorParallelError, match="worker rank 1 exited with code -9"):
                engine.step()
        engine.abort_request("r")
    finally:
        engine.shutdown()


def test_behind_the_server_loop_a_dead_worker_takes_the_engine_down(tiny_llamas):
    """The AsyncLLMEngine (what the server runs): the request in flight fails, the engine then says it
    is down (/health 503) and refuses new requests with UnavailableError (503) instead of failing each step."""
    engine = AsyncLLMEngine(LLMEngine(str(tiny_llamas["llama"]), tensor_parallel_size=2, **OPTIONS))

    async def run():
        stream = await engine.add_request("r", PROMPTS[1], SamplingParams(temperature=0, max_tokens=10_000,
                                                                          ignore_eos=True))
        outputs = stream.__aiter__()
        await outputs.__anext__()
        (worker,) = engine.engine.workers.procs
        worker.send_signal(signal.SIGKILL)
        with pytest.raises(EngineStepError):
            async for _ in outputs:
                pass
        assert not engine.alive
        with pytest.raises(UnavailableError, match="the engine is down.*worker rank 1 exited with code -9"):
            await engine.add_request("later", PROMPTS[0], GREEDY)

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
    assert not psutil.Process().children()  # shutdown ended the worker's process

"""Continuous batching, chunked prefill and preemption never change greedy output."""

from __future__ import annotations

import random

import pytest

from tokenmill import LLM, SamplingParams


def mixed_prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [rng.choice([1, 3, 8, 20, 45, 90, 150, 230]) for _ in range(count)]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def check_batch_invariance(path: str, vocab: int, max_tokens: int, quantization: str = "auto"):
    prompts = mixed_prompts(24, vocab)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    alone_llm = LLM(path, dtype="float32", kv_cache_memory="16MiB", max_model_len=512, quantization=quantization)
    alone = [alone_llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]

    # 40-token budget forces chunked prefill; 48 blocks of 16 tokens cannot hold 24 sequences.
    llm = LLM(path, dtype="float32", max_num_batched_tokens=40, max_num_seqs=24, block_size=16,
              kv_cache_memory=48 * 16 * llm_kv_bytes(alone_llm), max_model_len=512, quantization=quantization)
    together = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool was meant to be small enough to force preemption"
    for i, (expected, out) in enumerate(zip(alone, together)):
        assert out.outputs[0].token_ids == expected, f"prompt {i} (length {len(prompts[i])}) changed when batched"


def llm_kv_bytes(llm: LLM) -> int:
    return llm.engine.memory_report.kv_bytes_per_token


def test_batch_invariance_tiny_llama(tiny_models):
    check_batch_invariance(str(tiny_models["llama"]), 256, 24)


def test_batch_invariance_stories(stories_path):
    check_batch_invariance(str(stories_path), 512, 40)


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_batch_invariance_quantized(tiny_models, stories_path, quantization):
    """Quantized weights (tokenmill's kernels where built): a row's result does not depend on its batch."""
    check_batch_invariance(str(tiny_models["llama"]), 256, 24, quantization)
    check_batch_invariance(str(stories_path), 512, 40, quantization)


def test_requests_join_while_others_run(tiny_models):
    """A request added mid-generation is scheduled in the very next step, alongside the running one."""
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="4MiB")
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], params)
    engine.step()
    engine.step()
    engine.add_request("b", [9, 10], params)
    plan_ids = set()
    outs = engine.step()
    plan_ids = {o.request_id for o in outs}
    assert plan_ids == {"a", "b"}
    while engine.has_unfinished_requests():
        engine.step()


def test_a_prompt_gets_the_same_bits_however_it_is_chunked(default_model_available):
    """The default form (int4 on tokenmill's kernels where built): every prompt token's logprob, and the
    greedy answer, are the same bits whether the prompt is prefilled in one step, in chunks of 48 tokens
    (rows attended alone, in pairs, split over threads), or beside another prompt."""
    prompt = [(i * 7919) % 40000 + 100 for i in range(300)]
    other = [(i * 104729) % 40000 + 100 for i in range(170)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    results = []
    for budget, prompts in ((2048, [prompt]), (48, [prompt]), (2048, [other, prompt])):
        llm = LLM(max_num_batched_tokens=budget, kv_cache_memory="64MiB", max_model_len=1024)
        out = llm.generate(prompts, params, use_tqdm=False)[-1]
        logprobs = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
        results.append((logprobs, out.outputs[0].token_ids))
    assert results[1] == results[0] and results[2] == results[0]

"""Prompt logprobs (what `echo` with logprobs and lm-evaluation-harness's loglikelihood read) equal
transformers' teacher-forced log_softmax, however the prompt is chunked, batched or cached."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams

PROMPT = list(range(3, 60))


@pytest.fixture(scope="module")
def reference(tiny_models) -> list[float]:
    """log p(prompt[i] | prompt[:i]) for i >= 1, from transformers in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), -1)
    return [logprobs[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))]


def prompt_values(out) -> list[float]:
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    return [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 7])  # 7: the prompt is prefilled over 9 steps
def test_prompt_logprobs_equal_transformers_alone_batched_and_chunked(tiny_models, reference, max_num_batched_tokens):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="8MiB", block_size=4,
              max_num_batched_tokens=max_num_batched_tokens)
    asked = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = llm.generate([PROMPT], asked, use_tqdm=False)[0]
    crowd = llm.generate([[5, 6, 7], PROMPT, list(range(80, 120))], [plain, asked, plain], use_tqdm=False)
    for out in (alone, crowd[1]):
        assert prompt_values(out) == pytest.approx(reference, abs=1e-5)
        for entry, token in zip(out.prompt_logprobs[1:], PROMPT[1:]):
            top = sorted(entry.values(), key=lambda lp: lp.rank)
            assert len(entry) in (3, 4) and top[0].rank == 1
            assert top[0].logprob == max(lp.logprob for lp in entry.values())
            assert (entry[token].rank == 1) == (entry[token].logprob == top[0].logprob)
    assert crowd[0].prompt_logprobs is None
    assert crowd[0].outputs[0].token_ids == llm.generate([[5, 6, 7]], plain, use_tqdm=False)[0].outputs[0].token_ids


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs(tiny_models, reference):
    """A cached prefix has no logits: such a request skips the prefix cache (as in vLLM), others still hit."""
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="8MiB", block_size=4)
    plain = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate([PROMPT], plain, use_tqdm=False)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    assert prompt_values(out) == pytest.approx(reference, abs=1e-5)
    assert llm.generate([PROMPT], plain, use_tqdm=False)[0].num_cached_tokens > 0


def test_prompt_logprobs_survive_a_preemption(tiny_models, reference):
    """A sequence preempted while its prompt is prefilled recomputes it; what was recorded stays once."""
    # 24 blocks of 4 tokens (512 bytes a token): the first request's 80 tokens leave too few for the prompt
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=24 * 4 * 512, block_size=4,
              max_num_batched_tokens=16, max_model_len=90)
    asked = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = llm.generate([list(range(100, 140)), PROMPT], [long, asked], use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert prompt_values(outs[1]) == pytest.approx(reference, abs=1e-5)


def test_n_samples_share_one_prompt_logprobs(tiny_models, reference):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="8MiB")
    out = llm.generate([PROMPT], SamplingParams(n=3, seed=1, max_tokens=2, prompt_logprobs=0), use_tqdm=False)[0]
    assert len(out.outputs) == 3
    assert prompt_values(out) == pytest.approx(reference, abs=1e-5)


# ---- LLMEngine.score ----------------------------------------------------------------------------


def test_score_equals_the_prompt_logprobs_of_a_generate_call(stories_path):
    """score() is the teacher-forced prefill that prompt_logprobs read, run past the scheduler: the same
    values, and its KV blocks go back to the pool (the autouse fixture checks that after the test too)."""
    llm = LLM(str(stories_path), dtype="float32", kv_cache_memory="4MiB", block_size=4)
    engine = llm.engine
    ids = llm.get_tokenizer().encode("Once upon a time there was a little girl who liked to play in the park.")
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    free = engine.block_pool.num_free_blocks
    scored = engine.score(ids)
    assert scored.shape == (len(ids), engine.model_config.vocab_size) and scored.dtype == torch.float32
    assert torch.allclose(scored.exp().sum(-1), torch.ones(len(ids)), atol=1e-5)
    assert [scored[i - 1, ids[i]].item() for i in range(1, len(ids))] == pytest.approx(prompt_values(out), abs=1e-5)
    assert int(scored[-1].argmax()) == out.outputs[0].token_ids[0]  # the greedy token after the prompt
    assert engine.block_pool.num_free_blocks == free and engine.block_pool.num_used_blocks == 0
    assert torch.equal(engine.score(ids), scored)  # a second call reads nothing the first one left


def test_score_refuses_bad_input_and_a_full_cache(stories_path):
    from tokenmill.errors import InvalidParameterError

    # 200 blocks of 4 tokens (1280 bytes a token): room for one 512-token context and a bit more
    llm = LLM(str(stories_path), dtype="float32", kv_cache_memory=200 * 4 * 1280, block_size=4, max_model_len=512)
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    for bad in ([], [1, vocab], [1, -1], [1, True], list(range(1, 3)) * engine.max_model_len):
        with pytest.raises(InvalidParameterError) as e:
            engine.score(bad)
        assert e.value.param == "prompt_ids"
    assert engine.score([1] * engine.max_model_len).shape[0] == engine.max_model_len  # no token to generate: all fit
    # a running request holds most of the pool: a score that needs more blocks than are free is refused
    engine.add_request("hog", [1] * 400, SamplingParams(max_tokens=8, ignore_eos=True))
    try:
        engine.step()  # its prompt is prefilled: it holds 101 blocks until it ends
        free_tokens = engine.block_pool.num_free_blocks * engine.config.cache.block_size
        assert free_tokens < engine.max_model_len
        with pytest.raises(InvalidParameterError, match="no room"):
            engine.score([1] * (free_tokens + 1))
        assert engine.score([1] * free_tokens).shape[0] == free_tokens
    finally:
        engine.abort_request("hog")
    assert engine.block_pool.num_used_blocks == 0

"""Real checkpoints against transformers: stories260K (HF folder) and SmolLM2-135M-Instruct (GGUF)."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.loader.checkpoint import default_model_path

GREEDY = SamplingParams(temperature=0, max_tokens=40)


def hf_generate(model, prompt_ids: list[int], max_new: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos or 0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def stories(stories_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    return LLM(str(stories_path), dtype="float32", kv_cache_memory="32MiB"), ref


@pytest.fixture(scope="module")
def smollm(default_model_available):
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return LLM(dtype="float32", kv_cache_memory="512MiB", quantization="none"), ref  # exact: dequantized weights


@pytest.mark.parametrize("prompt", ["One day, Lily met a dragon", "The cat sat", "Tom and Sue went to the beach. They"])
def test_stories_greedy_matches_transformers(stories, prompt):
    llm, ref = stories
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    expected = hf_generate(ref, out.prompt_token_ids, 40, eos=2)
    assert out.outputs[0].token_ids == expected


def test_smollm_answers_paris(smollm):
    llm, _ = smollm
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].text == "The capital of France is Paris."
    assert out.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("question", ["What is the capital of France?", "Write a haiku about the sea.",
                                      "List three primary colors."])
def test_smollm_chat_greedy_matches_transformers(smollm, question):
    llm, ref = smollm
    out = llm.chat([{"role": "user", "content": question}], GREEDY, use_tqdm=False)[0]
    eos = llm.engine.eos_token_ids[0]
    expected = hf_generate(ref, out.prompt_token_ids, 40, eos=eos)
    assert out.outputs[0].token_ids == expected


def test_smollm_default_model_is_the_embedded_gguf(smollm):
    llm, _ = smollm
    cfg = llm.engine.model_config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings


def test_smollm_chat_turns_same_with_a_warm_and_a_cold_prefix_cache(smollm):
    """Each turn re-renders the conversation through the chat template. Warm, it reuses the
    earlier turns' blocks; after reset_prefix_cache it computes everything; same tokens."""
    llm, _ = smollm
    params = SamplingParams(temperature=0, max_tokens=24)
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}]
    for turn, question in enumerate(["What is the capital of France?", "And of Germany?", "Which one is larger?"]):
        messages.append({"role": "user", "content": question})
        warm = llm.chat(messages, params, use_tqdm=False)[0]
        assert llm.reset_prefix_cache()
        cold = llm.chat(messages, params, use_tqdm=False)[0]
        assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
        assert cold.num_cached_tokens == 0
        if turn:
            assert warm.num_cached_tokens >= 16  # at least the system prompt and the first question
        messages.append({"role": "assistant", "content": warm.outputs[0].text})

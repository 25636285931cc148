"""tokenmill's logits and greedy tokens equal Hugging Face transformers' for every architecture."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.config import resolve_dtype
from tokenmill.engine.engine import LLMEngine
from tokenmill.step_plan import ScheduledChunk
from tokenmill.sequence import Sequence

from conftest import TINY_VARIANTS


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def run_chunks(engine: LLMEngine, seq: Sequence, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Compute `seq` span by span through the paged cache; logits of each span."""
    results = []
    for start, length in spans:
        assert engine.kv_cache.grow(seq.seq_id, start, start + length)
        results.append(engine.runner.logits_for([ScheduledChunk(seq, start, length, engine.kv_cache.block_table(seq.seq_id))]))
    return results


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_logits_match_transformers(tiny_models, variant):
    path = tiny_models[variant]
    ref = hf_model(path)
    engine = LLMEngine(str(path), dtype="float32", kv_cache_memory="4MiB")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 256, (40,), generator=g).tolist()
    seq = Sequence("r", 0, prompt, SamplingParams(), 0.0)
    try:
        # Prefill in two chunks (the second reads the first's KV from the cache), then 6 decodes.
        spans = [(0, 23), (23, 17)]
        logits = torch.cat(run_chunks(engine, seq, spans))
        with torch.no_grad():
            expected = ref(torch.tensor([prompt])).logits[0]
        assert (logits - expected).abs().max().item() <= 1e-4
        for _ in range(6):
            token = int(logits[-1].argmax())
            seq.token_ids.append(token)
            (logits,) = run_chunks(engine, seq, [(seq.num_tokens - 1, 1)])
            with torch.no_grad():
                expected = ref(torch.tensor([seq.token_ids])).logits[0, -1:]
            assert (logits - expected).abs().max().item() <= 1e-4
    finally:
        engine.kv_cache.free(seq)


@pytest.mark.parametrize("variant", ["llama", "mistral-window", "qwen2", "qwen3"])
def test_greedy_tokens_match_transformers(tiny_models, variant):
    path = tiny_models[variant]
    ref = hf_model(path)
    llm = LLM(str(path), dtype="float32", kv_cache_memory="4MiB")
    prompts = [[5, 17, 99, 3, 42], list(range(10, 40))]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(ref, prompt, 32)
        assert out.outputs[0].finish_reason == "length"


def test_sharded_safetensors_with_index(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32).save_pretrained(
        sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    one = LLM(str(tiny_models["qwen2"]), dtype="float32", kv_cache_memory="2MiB").generate([[5, 6, 7]], params, use_tqdm=False)
    many = LLM(str(sharded), dtype="float32", kv_cache_memory="2MiB").generate([[5, 6, 7]], params, use_tqdm=False)
    assert one[0].outputs[0].token_ids == many[0].outputs[0].token_ids


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_precision_logits_close_to_fp32(tiny_models, dtype, torch_dtype):
    path = tiny_models["llama"]
    engine = LLMEngine(str(path), dtype=dtype, kv_cache_memory="2MiB")
    assert engine.runner.kv_caches[0].data.dtype == torch_dtype
    prompt = list(range(3, 35))
    seq = Sequence("r", 0, prompt, SamplingParams(), 0.0)
    try:
        (logits,) = run_chunks(engine, seq, [(0, len(prompt))])
    finally:
        engine.kv_cache.free(seq)
    with torch.no_grad():
        expected = hf_model(path)(torch.tensor([prompt])).logits[0]
    assert (logits - expected).abs().max().item() < 0.1
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_cuda(tiny_models):
    # On CPU bf16 activations bought no speed and broke a near-tie of the default model's
    # greedy answer (resolve_dtype's docstring), so "auto" means float32 there.
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert LLMEngine(str(tiny_models["llama"]), device="cpu", kv_cache_memory="2MiB").runner.kv_caches[0].data.dtype == torch.float32

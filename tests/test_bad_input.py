"""Bad input gets a clear ValueError naming the problem, and leaves the engine serving."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest

from tokenmill import LLM, InvalidParameterError, ModelLoadError, SamplingParams
from tokenmill.errors import RequestFailedError
from tokenmill.config import parse_memory
from tokenmill.engine import async_engine


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="4MiB", max_model_len=64)


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"logprobs": 50}, "logprobs"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"seed": 2**64}, "seed"),  # past what a generator takes
    ({"seed": 2**64 - 1, "n": 2}, "seed"),  # sample 2 would use seed + 1
    ({"seed": 1.5}, "seed"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop": ["a\ud800"]}, "stop"),  # a lone surrogate: no tokenizer can encode it
    # Wrong types and non-finite numbers once passed here and raised TypeError inside a step.
    ({"top_k": 2.0}, "top_k"),
    ({"n": 1.5}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": 1.0}, "logprobs"),
    ({"max_tokens": 4.0}, "max_tokens"),
    ({"temperature": float("inf")}, "temperature"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"top_p": "0.5"}, "top_p"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"logit_bias": {5: 101}}, "logit_bias"),
    ({"logit_bias": {5: float("nan")}}, "logit_bias"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": [5]}, "logit_bias"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
])
def test_invalid_sampling_params(kwargs, param):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_empty_prompt(llm):
    with pytest.raises(InvalidParameterError, match="empty"):
        llm.generate([[]], use_tqdm=False)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(InvalidParameterError, match="max_model_len is 64"):
        llm.generate([list(range(3, 80))], use_tqdm=False)


def test_token_ids_outside_vocabulary(llm):
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        llm.generate([[1, 2, 999]], use_tqdm=False)


def test_logit_bias_outside_vocabulary_is_refused_before_any_step(llm):
    with pytest.raises(InvalidParameterError, match="outside the vocabulary") as e:
        llm.generate([[5, 6]], SamplingParams(logit_bias={3: 1.0, 999_999: 5.0}), use_tqdm=False)
    assert e.value.param == "logit_bias" and not llm.engine.requests


def test_stop_token_ids_outside_vocabulary_are_refused_before_any_step(llm):
    # it once reached the sampler, whose IndexError failed every request in the step
    params = SamplingParams(stop_token_ids=[999_999_999], min_tokens=2, max_tokens=4)
    with pytest.raises(InvalidParameterError, match="stop_token_ids.*outside the vocabulary"):
        llm.generate([[5, 6]], params, use_tqdm=False)
    assert not llm.engine.requests
    out = llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0", "2 parsecs"])
def test_bad_memory_sizes_name_the_flag(text):
    with pytest.raises(InvalidParameterError) as e:
        parse_memory(text)
    assert e.value.param == "kv_cache_memory" and repr(text) in str(e.value)


def test_text_prompt_without_tokenizer(llm):
    with pytest.raises(InvalidParameterError, match="no tokenizer"):
        llm.generate(["hello"], use_tqdm=False)


def test_a_bad_prompt_in_a_batch_adds_nothing(llm):
    with pytest.raises(InvalidParameterError):
        llm.generate([[5, 6], [], [7, 8]], use_tqdm=False)
    assert not llm.engine.requests
    out = llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_generation_stops_at_max_model_len(llm):
    out = llm.generate([list(range(3, 60))], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 64 - 57 and out.finish_reason == "length"


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        LLM(str(tmp_path / "no-such-model"))


def model_folder(root, architecture: str, model_type: str, weights_file: str, weights: bytes):
    folder = root / model_type
    folder.mkdir()
    (folder / "config.json").write_text(f'{{"architectures": ["{architecture}"], "model_type": "{model_type}"}}')
    (folder / weights_file).write_bytes(weights)
    return folder


def test_pickle_checkpoint_refused(tmp_path):
    folder = model_folder(tmp_path, "LlamaForCausalLM", "llama", "pytorch_model.bin", b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="pickle"):
        LLM(str(folder))
    with pytest.raises(ModelLoadError, match="pickle"):
        LLM(str(folder / "pytorch_model.bin"))


def test_unsupported_architecture(tmp_path):
    folder = model_folder(tmp_path, "GPT2LMHeadModel", "gpt2", "model.safetensors", b"")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLM(str(folder))


def test_max_model_len_larger_than_kv_pool(tiny_models):
    with pytest.raises(InvalidParameterError, match="max_model_len"):
        LLM(str(tiny_models["llama"]), kv_cache_memory="64KiB", max_model_len=512)


def test_the_kv_pool_is_committed_at_start(tiny_models):
    """Resident right after start, not page by page under traffic. Measured in a fresh process:
    in this one, memory freed by earlier tests is still resident and would be reused."""
    script = f"""
import psutil
from tokenmill import LLM
before = psutil.Process().memory_info().rss
llm = LLM({str(tiny_models["llama"])!r}, dtype="float32", kv_cache_memory="256MiB")
report = llm.engine.memory_report
print(report.kv_cache_tokens * report.kv_bytes_per_token, psutil.Process().memory_info().rss - before)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    pool_bytes, grown = map(int, run.stdout.split())
    assert pool_bytes > 255 << 20 and grown > 250 << 20, (pool_bytes, grown)


def test_the_default_kv_pool_holds_every_seat_full_and_is_the_same_every_start(tiny_models):
    reports = [LLM(str(tiny_models["llama"]), dtype="float32", max_num_seqs=3).engine.memory_report for _ in range(2)]
    assert reports[0] == reports[1]
    assert reports[0].kv_cache_tokens == 3 * 512  # max_num_seqs x the model's 512-token context


def test_a_kv_cache_larger_than_free_memory_is_refused(tiny_models):
    with pytest.raises(InvalidParameterError) as e:
        LLM(str(tiny_models["llama"]), kv_cache_memory=1 << 50)
    assert e.value.param == "kv_cache_memory" and "free" in str(e.value)


def test_mismatched_params_list(llm):
    with pytest.raises(InvalidParameterError, match="sampling_params"):
        llm.generate([[5], [6]], [SamplingParams()], use_tqdm=False)


POISON = [8, 9]  # the prompt whose chunks the injected fault hits


def _fault_on_poison(monkeypatch, engine, when=lambda chunks: True):
    """The real runner, except that a step holding the poison prompt raises (when `when` says so)."""
    real = engine.runner.execute

    def execute(chunks, *args):
        if any(c.seq.prompt_token_ids == POISON for c in chunks) and when(chunks):
            raise RuntimeError("a fault only this request causes")
        return real(chunks, *args)

    monkeypatch.setattr(engine.runner, "execute", execute)


@pytest.fixture(scope="module")
def default_llm(default_model_available):
    """The default form: the embedded GGUF, int4 weights on tokenmill's kernels, no flags."""
    return LLM(max_model_len=256, kv_cache_memory="64MiB")


@pytest.mark.parametrize("form", ["tiny float32", "default"])
def test_a_request_that_fails_the_step_by_itself_ends_alone(form, request, monkeypatch):
    llm = request.getfixturevalue("llm" if form == "tiny float32" else "default_llm")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = {"a": [5, 6, 7], "poison": POISON, "b": [10, 11, 12, 13]}
    alone = {rid: llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
             for rid, p in prompts.items() if rid != "poison"}
    engine = llm.engine
    # it fails in a decode step, after two tokens, among the others' decodes
    _fault_on_poison(monkeypatch, engine, when=lambda chunks: any(c.seq.num_output_tokens >= 2 for c in chunks
                                                                   if c.seq.prompt_token_ids == POISON))
    for rid, p in prompts.items():
        engine.add_request(rid, p, params)
    got, failed = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        failed.update(engine.pop_failed())
    assert list(failed) == ["poison"] and "a fault only this request causes" in str(failed["poison"])
    assert got == alone  # the others' greedy tokens are what they are alone


def test_offline_generate_names_the_prompt_that_failed(llm, monkeypatch):
    _fault_on_poison(monkeypatch, llm.engine)
    with pytest.raises(RequestFailedError, match="prompt 1 failed the engine step"):
        llm.generate([[5, 6, 7], POISON, [10, 11]], SamplingParams(max_tokens=4), use_tqdm=False)


def test_a_fault_no_single_request_reproduces_is_raised(llm, monkeypatch):
    _fault_on_poison(monkeypatch, llm.engine, when=lambda chunks: len(chunks) > 1)
    with pytest.raises(RuntimeError, match="only this request"):
        llm.generate([[5, 6, 7], POISON], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.pop_failed()


def test_an_engine_stuck_in_a_step_is_not_alive(llm, monkeypatch):
    monkeypatch.setattr(async_engine, "STALL_SECONDS", 0.05)
    release, stepping = threading.Event(), threading.Event()
    real_step = llm.engine.step

    def stuck_step():
        stepping.set()
        release.wait()
        return real_step()

    monkeypatch.setattr(llm.engine, "step", stuck_step)
    engine = async_engine.AsyncLLMEngine(llm.engine)

    async def run() -> list[int]:
        stream = await engine.add_request("r", [5, 6, 7], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        assert stepping.wait(timeout=30)
        deadline = time.monotonic() + 30
        while engine.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not engine.alive  # /health would say 503
        release.set()
        tokens = [out.outputs[0].token_ids async for out in stream][-1]
        assert engine.alive  # stepping again
        return tokens

    try:
        assert len(asyncio.run(run())) == 2
    finally:
        release.set()
        engine.shutdown()

"""Offline throughput: tokenmill's engine against Hugging Face transformers `generate`.

`run_throughput_benchmark(model=None, num_prompts=64, input_len="32:512", ...)` runs the whole
benchmark and returns a JSON-ready dict; `tokenmill bench throughput` and
benchmarks/offline_throughput.py call it. Both backends get the same token ids (never
re-tokenized), generate exactly `output_len` tokens per prompt (EOS ignored, greedy), and every
measurement is repeated `repeats` times and reported as the median. The parts, usable alone:

- bench/prompts.py: the prompt sets (`synthetic_prompts`, `load_prompts_file`, `spread_lengths`);
- bench/engine_timing.py: tokenmill's measurements on an `LLMEngine` (`measure_tokenmill`,
  `measure_tokenmill_decode`) and the roofline they report against;
- bench/hf_baseline.py: the transformers baseline (`load_hf_model`, `measure_hf`, `measure_hf_decode`);
- bench/results.py and bench/report.py: what a measurement returns, and the text, markdown and
  JSON forms of the whole result.

    prompts = synthetic_prompts(engine.tokenizer, vocab_size, input_lens, seed=0)
    result = measure_tokenmill(engine, prompts, output_lens, repeats=3)
"""

from __future__ import annotations

import gc
import platform
from typing import Callable

import torch

from tokenmill.bench.engine_timing import ensure_roofline, measure_tokenmill, measure_tokenmill_decode
from tokenmill.bench.hf_baseline import load_hf_model, measure_hf, measure_hf_decode, transformers_version
from tokenmill.bench.prompts import check_fits, load_prompts_file, spread_lengths, synthetic_prompts
from tokenmill.bench.report import format_markdown, format_text, model_label, write_json
from tokenmill.engine.engine import LLMEngine

# The report's functions are the CLI's way in, beside the orchestrator.
__all__ = ["format_markdown", "format_text", "model_label", "run_throughput_benchmark", "write_json"]


def run_throughput_benchmark(model: str | None = None, *, num_prompts: int | None = None,
                             input_len: int | str = "32:512", output_len: int | str = 128,
                             prompts_file: str | None = None, seed: int | None = 0, repeats: int = 3,
                             compare_hf: bool = False, hf_batch_size: int | None = None,
                             batch1: bool = False, batch1_tokens: int = 128, batch1_input_len: int = 32,
                             engine_args: dict | None = None,
                             log: Callable[[str], None] | None = None) -> dict:
    """Measure tokenmill (and optionally transformers) on one prompt set; return a JSON-ready dict."""
    say = log or (lambda msg: None)
    engine_args = dict(engine_args or {})
    if seed is not None:
        engine_args.setdefault("seed", seed)
    say("loading tokenmill engine")
    engine = LLMEngine(model, **engine_args)
    ensure_roofline(engine, say)
    tokenizer = engine.tokenizer
    if prompts_file:
        prompts = load_prompts_file(prompts_file, tokenizer, num_prompts)
        input_spec: str | int = "file"
    else:
        num = num_prompts if num_prompts is not None else 64
        prompts = synthetic_prompts(tokenizer, engine.model_config.vocab_size, spread_lengths(input_len, num, seed), seed)
        input_spec = str(input_len)
    output_lens = spread_lengths(output_len, len(prompts), None if seed is None else seed + 2)
    check_fits(prompts, output_lens, engine.max_model_len)
    decode_prompt = None
    if batch1:
        decode_prompt = synthetic_prompts(tokenizer, engine.model_config.vocab_size, [batch1_input_len],
                                          None if seed is None else seed + 3)[0]
        check_fits([decode_prompt], [batch1_tokens], engine.max_model_len)

    result: dict = {
        "model": model_label(model, engine.model_name),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": engine.device.type,
        "num_prompts": len(prompts),
        "input_len": input_spec,
        "output_len": str(output_len),
        "seed": seed,
        "repeats": repeats,
        "total_input_tokens": sum(map(len, prompts)),
        "total_output_tokens": sum(output_lens),
        "engine_args": {k: v for k, v in engine_args.items()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers_version(), "threads": torch.get_num_threads(),
                        "machine": platform.machine()},
    }
    say(f"tokenmill: {len(prompts)} prompts, {result['total_input_tokens']} input + "
        f"{result['total_output_tokens']} output tokens, {repeats} run(s)")
    result["tokenmill"] = measure_tokenmill(engine, prompts, output_lens, repeats).to_dict()
    if decode_prompt is not None:
        say(f"tokenmill: batch-1 decode of {batch1_tokens} tokens")
        result["batch1"] = {"prompt_tokens": len(decode_prompt), "new_tokens": batch1_tokens,
                            "tokenmill": measure_tokenmill_decode(engine, decode_prompt, batch1_tokens, repeats).to_dict()}
    dtype = engine.dtype
    del engine
    gc.collect()

    if compare_hf:
        say("loading the transformers model")
        hf_model = load_hf_model(model, dtype)
        say(f"transformers: batch size {hf_batch_size or len(prompts)}, {repeats} run(s)")
        result["hf"] = measure_hf(hf_model, prompts, output_lens, hf_batch_size, repeats).to_dict()
        result["ratio"] = {k: result["tokenmill"][k] / result["hf"][k]
                           for k in ("requests_per_s", "input_tokens_per_s", "output_tokens_per_s", "total_tokens_per_s")}
        if decode_prompt is not None:
            say(f"transformers: batch-1 decode of {batch1_tokens} tokens")
            result["batch1"]["hf"] = measure_hf_decode(hf_model, decode_prompt, batch1_tokens, repeats).to_dict()
            result["batch1"]["ratio"] = (result["batch1"]["tokenmill"]["decode_tokens_per_s"]
                                         / result["batch1"]["hf"]["decode_tokens_per_s"])
        del hf_model
        gc.collect()
    return result

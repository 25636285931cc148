"""Batch-1 speed of float32, int8 and the file's own low-bit weights, against llama.cpp on the same GGUF file.

A GGUF (--model, default the embedded SmolLM2-135M-Instruct Q4_1) in tokenmill as float32
(dequantized), int8 (requantized) and as stored ("auto": the Q4_1 blocks loaded packed as int4;
a Q4_K_M file's Q4_K as int4 and its Q5_0 / Q8_0 / Q6_K as int8), and in llama.cpp with --threads
threads: prefill tokens/s (one prompt of --prompt-tokens, timed to its first token) and
batch-1 decode tokens/s (--new-tokens greedy tokens, timed from the first to the last),
medians of --repeats runs, and each decode's fraction of the bandwidth roofline (the bytes a
token reads, weights and KV, over `tokenmill calibrate`'s stored bandwidth, and over the mean of
the bandwidth measured just before and after this run, which on a shared machine can be far from
the stored one). llama.cpp runs as
llama-bench built from source (--llama-bench PATH, from ../shared/tools/build-llamacpp.sh;
pp and tg tests with -r --repeats), or through llama-cpp-python where that is installed.
Prints a table with ratios to llama.cpp and writes results/quant_speed.json. --profile also
breaks one tokenmill decode step down (the model's layers, output head, sampling, and the
engine's own time: everything but the layers and the head).

    python benchmarks/quant_speed.py --llama-bench "$(bash ../shared/tools/build-llamacpp.sh)/llama-bench"
    python benchmarks/quant_speed.py --smoke      # a short run: 32-token prompt, 16 new tokens, 1 repeat
    python benchmarks/quant_speed.py --model SmolLM2-135M-Instruct-Q4_K_M.gguf --configs auto --llama-bench ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.engine_timing import measure_tokenmill_decode
from tokenmill.bench.report import write_json
from tokenmill.loader import load_checkpoint
from tokenmill.loader.checkpoint import default_model_path
from tokenmill.metering import calibrate
from tokenmill.metering.roofline import calibration_error

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "benchmarks" / "data" / "quality_text.txt"
CONFIGS = {"float32": {"quantization": "none"}, "int8": {"quantization": "int8"}, "auto": {"quantization": "auto"}}
LINEAR_OPS = {"aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm", "aten::mm", "aten::addmm",
              "tokenmill::q4_mm", "tokenmill::q8_mm"}
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::index_select", "aten::index_copy_",
                 "tokenmill::row_attention"}
FUSED_OPS = {"tokenmill::step_layers"}  # every decoder layer of a step in one call


def tokenmill_prefill(llm: LLM, prompt: list[int], repeats: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([prompt[:8]], params, use_tqdm=False)  # warm-up
    runs = []
    for _ in range(repeats):
        llm.engine.reset_prefix_cache()  # a cached prompt would skip the prefill being timed
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        runs.append(len(prompt) / (time.perf_counter() - start))
    return statistics.median(runs)


def llama_cpp_speed(path: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: the llama.cpp columns are skipped", file=sys.stderr)
        return None
    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + new_tokens + 16, n_batch=max(512, len(prompt)),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.reset()
    llm.eval(prompt[:8])  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill.append(len(prompt) / (time.perf_counter() - start))
        times = []
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # greedy; EOS is not a stop here
            times.append(time.perf_counter())
            if len(times) == new_tokens:
                break
        decode.append((len(times) - 1) / (times[-1] - times[0]))
    return {"prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
            "version": llama_cpp.__version__}


def llama_bench_speed(binary: str, path: Path, prompt_tokens: int, new_tokens: int, repeats: int,
                      threads: int) -> dict:
    """llama.cpp's own benchmark on the same file: pp (prefill) and tg (decode) tokens/s, mean of -r runs."""
    out = subprocess.run([binary, "-m", str(path), "-t", str(threads), "-p", str(prompt_tokens), "-n", str(new_tokens),
                          "-r", str(repeats), "-o", "json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    tg = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"prefill_tokens_per_s": pp["avg_ts"], "decode_tokens_per_s": tg["avg_ts"],
            "version": f"llama-bench {tg.get('build_commit', '?')}", "model_bytes": tg.get("model_size")}


def roofline_fraction(tokens_per_s: float, bytes_per_token: float, bandwidth: float) -> float:
    """Decode speed over what reading each token's bytes once at the machine's bandwidth allows."""
    return tokens_per_s * bytes_per_token / bandwidth


def _fraction(value: float) -> str:
    """A roofline fraction for the table, or the calibration error a value above 1 means."""
    return calibration_error(value) or f"{value:.2f}"


def _fractions(row: dict) -> str:
    return f"{_fraction(row['roofline_fraction'])} / {_fraction(row['run_roofline_fraction'])}"


def profile_decode(llm: LLM, prompt: list[int], steps: int = 16) -> dict:
    """One decode step's time in ms: forward, logits, sampling and the engine around them (wall clock),
    then, under torch.profiler, the ops' own time by kind; what they do not explain is Python and
    dispatch (a lower bound: the profiler's own cost lands in the ops' times)."""
    engine, runner = llm.engine, llm.engine.runner
    engine.add_request("profile", list(prompt), SamplingParams(temperature=0, max_tokens=4 * steps + 8, ignore_eos=True))
    for _ in range(steps):  # prefill, then settle into decoding
        engine.step()
    wall: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            wall[name] += time.perf_counter() - start
            return out
        return call

    sampler = runner.sampler
    runner.forward = timed("forward", runner.forward)
    runner.model.forward = timed("model", runner.model.forward)
    runner.model.compute_logits = timed("logits", runner.model.compute_logits)
    runner.sampler = timed("sampling", sampler)
    try:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        step_s = (time.perf_counter() - start) / steps
    finally:
        del runner.forward, runner.model.forward, runner.model.compute_logits  # back to the methods
        runner.sampler = sampler
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
    finally:
        engine.abort_request("profile")
    kinds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith(("aten::", "tokenmill::")):
            kind = ("linear" if event.key in LINEAR_OPS else "attention" if event.key in ATTENTION_OPS
                    else "fused_layers" if event.key in FUSED_OPS else "other_ops")
            kinds[kind] += event.self_cpu_time_total / 1e3 / steps
    ms = {name: 1e3 * s / steps for name, s in wall.items()}
    kernels = sum(kinds.values())
    layers = runner.cfg.num_layers
    return {"step_ms": 1e3 * step_s, "forward_ms": ms["forward"], "model_ms": ms["model"], "logits_ms": ms["logits"],
            "sampling_ms": ms["sampling"], "engine_ms": 1e3 * step_s - ms["forward"] - ms["logits"] - ms["sampling"],
            # all but the model's layers and output head: scheduling, step metadata, sampling, detokenizing
            "engine_own_ms": 1e3 * step_s - ms["model"] - ms["logits"],
            "fused_layers_ms": kinds["fused_layers"], "linear_kernels_ms": kinds["linear"],
            "attention_ms": kinds["attention"], "other_ops_ms": kinds["other_ops"],
            "python_and_dispatch_ms": 1e3 * step_s - kernels,
            "python_and_dispatch_per_layer_us": (1e6 * step_s - 1e3 * kernels) / layers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"which of {', '.join(CONFIGS)} to run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="a short run: 32-token prompt, 16 new tokens, 1 repeat")
    p.add_argument("--profile", action="store_true", help="break one decode step of each configuration down")
    p.add_argument("--llama-bench", help="llama.cpp's llama-bench binary (else llama-cpp-python, if installed)")
    p.add_argument("--output", default=str(ROOT / "results" / "quant_speed.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.prompt_tokens, args.new_tokens, args.repeats = 32, 16, 1
    torch.set_num_threads(args.threads)

    path = args.model or default_model_path()
    ckpt = load_checkpoint(path)
    prompt = ckpt.tokenizer.encode(TEXT.read_text())[:args.prompt_tokens]
    bandwidth = calibrate.load_or_measure(torch.device("cpu"))["bandwidth_bytes_per_s"]
    # The stored calibration may come from another day; this run's own (before and after) says how far
    # the machine's bandwidth has moved since, and gives each fraction a denominator of the same minutes.
    around = [max(calibrate.measure_bandwidth(torch.device("cpu")))]
    result = {"model": ckpt.name, "threads": args.threads, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
              "repeats": args.repeats, "torch": torch.__version__, "bandwidth_bytes_per_s": bandwidth, "tokenmill": {}}
    for name in args.configs.split(","):
        llm = LLM(ckpt, dtype="float32", kv_cache_memory="256MiB", seed=0, **CONFIGS[name])
        row = {"weights": llm.engine.memory_report.weights, "weight_bytes": llm.engine.memory_report.weight_bytes,
               "prefill_tokens_per_s": tokenmill_prefill(llm, prompt, args.repeats),
               "decode_tokens_per_s": measure_tokenmill_decode(llm.engine, prompt, args.new_tokens, args.repeats)
               .decode_tokens_per_s}
        read = llm.engine.model_bytes  # a decode token reads the layers, the head and its KV
        row["bytes_per_token"] = read.layers + read.head + read.kv_per_token * (len(prompt) + args.new_tokens / 2)
        row["roofline_fraction"] = roofline_fraction(row["decode_tokens_per_s"], row["bytes_per_token"], bandwidth)
        if args.profile:
            row["profile"] = profile_decode(llm, prompt)
        result["tokenmill"][name] = row
        print(f"[speed] {name}: {row['decode_tokens_per_s']:.1f} decode tok/s", file=sys.stderr)
        del llm
    if args.llama_bench:
        ref = llama_bench_speed(args.llama_bench, path, len(prompt), args.new_tokens, args.repeats, args.threads)
    else:
        ref = llama_cpp_speed(path, prompt, args.new_tokens, args.repeats, args.threads)
    if ref:
        ref["file"] = path.name
        ref["bytes_per_token"] = ref.get("model_bytes") or path.stat().st_size
        ref["roofline_fraction"] = roofline_fraction(ref["decode_tokens_per_s"], ref["bytes_per_token"], bandwidth)
    result["llama_cpp"] = ref
    around.append(max(calibrate.measure_bandwidth(torch.device("cpu"))))
    result["run_bandwidth_bytes_per_s"] = around
    for row in [*result["tokenmill"].values(), *([ref] if ref else [])]:
        row["run_roofline_fraction"] = roofline_fraction(row["decode_tokens_per_s"], row["bytes_per_token"],
                                                         sum(around) / len(around))
    print(format_table(result))
    print(f"wrote {write_json(result, args.output)}", file=sys.stderr)
    return 0


def format_table(result: dict) -> str:
    ref = result["llama_cpp"]
    lines = [f"{result['model']}, {result['threads']} threads, prompt {result['prompt_tokens']} tokens, "
             f"{result['new_tokens']} new tokens, median of {result['repeats']}",
             f"bandwidth {result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (tokenmill calibrate); this run's, before and "
             f"after: {' and '.join(f'{b / 1e9:.1f}' for b in result['run_bandwidth_bytes_per_s'])} GB/s",
             "| engine | weights | prefill tok/s | prefill / llama.cpp | decode tok/s | decode / llama.cpp "
             "| roofline fraction, stored / this run's bandwidth |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, row in result["tokenmill"].items():
        pre = f"{row['prefill_tokens_per_s'] / ref['prefill_tokens_per_s']:.2f}x" if ref else "-"
        dec = f"{row['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x" if ref else "-"
        lines.append(f"| tokenmill | {name} ({row['weight_bytes'] / 2**20:.0f} MiB) | {row['prefill_tokens_per_s']:.0f} "
                     f"| {pre} | {row['decode_tokens_per_s']:.1f} | {dec} | {_fractions(row)} |")
    if ref:
        lines.append(f"| llama.cpp ({ref['version']}) | {ref['file']} | {ref['prefill_tokens_per_s']:.0f} | 1.00x "
                     f"| {ref['decode_tokens_per_s']:.1f} | 1.00x | {_fractions(ref)} |")
    for name, row in result["tokenmill"].items():
        if "profile" in row:
            lines.append(f"{name} decode step: " + ", ".join(f"{k} {v:.2f}" for k, v in row["profile"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

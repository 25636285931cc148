"""Serving benchmark, side by side: `tokenmill serve` and llama.cpp's servers on the same GGUF.

    python benchmarks/serve_vs_llamacpp.py --llama-server PATH/TO/llama-server --concurrency 1 8 32

Each server is started in turn on the default model's GGUF file (SmolLM2-135M-Instruct Q4_1),
warmed up, then sent synthetic prompts (exact token counts) at each max concurrency with
`tokenmill bench serve`'s client; outputs run their full length (ignore_eos and min_tokens).
Each concurrency gets prompts of its own (the same for every server), so no server answers
from a prompt cache. Peers: llama.cpp's C++ `llama-server` (continuous batching over
`--parallel` slots) when --llama-server is given, and `python -m llama_cpp.server` from
llama-cpp-python (one request at a time) when that package is installed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from tokenmill.bench.launch import LaunchedServer, free_port
from tokenmill.bench.serve import ServeBenchConfig, build_requests, run_serve_benchmark_sync
from tokenmill.loader.checkpoint import default_model_path


def servers(args, gguf: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command without the port, readiness path)."""
    ctx = max(args.concurrency) * (args.input_len + args.output_len + 64)
    found = {"tokenmill": ([sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--log-level", "warning",
                            *args.tokenmill_args.split()], "/health")}
    llama_server = args.llama_server or shutil.which("llama-server")
    if llama_server:
        found["llama-server"] = ([llama_server, "-m", str(gguf), "-t", str(args.threads), "-c", str(ctx),
                                  "-np", str(max(args.concurrency)), "--host", "127.0.0.1"], "/health")
    try:
        import llama_cpp  # noqa: F401
        found["llama-cpp-python"] = ([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads",
                                      str(args.threads), "--n_ctx", str(args.input_len + args.output_len + 64),
                                      "--host", "127.0.0.1"], "/v1/models")
    except ImportError:
        print("llama-cpp-python is not installed: skipping its server", file=sys.stderr)
    return {name: found[name] for name in found if name in args.peers}


def run(args) -> dict:
    gguf = default_model_path()
    base = ServeBenchConfig("http://unused", num_prompts=args.num_prompts, input_len=args.input_len,
                            output_len=args.output_len, seed=args.seed)
    warmup = build_requests(replace(base, num_prompts=4))
    # A prompt set of its own per concurrency (other seeds): a set the server has seen would hit its
    # prefix cache and time no prefill.
    prompt_sets = {conc: build_requests(replace(base, seed=args.seed + 1 + i)) for i, conc in enumerate(args.concurrency)}
    results: dict = {"model": gguf.name, "num_prompts": args.num_prompts, "input_len": args.input_len,
                     "output_len": args.output_len, "servers": {}}
    for name, (cmd, ready) in servers(args, gguf).items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(args.log_dir) / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"== {name}", file=sys.stderr)
        with LaunchedServer(cmd + ["--port", str(port)], url, ready, log_path=str(log)):
            run_serve_benchmark_sync(ServeBenchConfig(url, max_concurrency=4, output_len=args.output_len), warmup)
            per_conc = {}
            for conc in args.concurrency:
                config = ServeBenchConfig(url, request_rates=[math.inf], max_concurrency=conc,
                                          num_prompts=args.num_prompts, input_len=args.input_len,
                                          output_len=args.output_len)
                result = run_serve_benchmark_sync(config, prompt_sets[conc], log=lambda m: print("  " + m, file=sys.stderr))
                summary = result["runs"][0]["summary"]
                per_conc[conc] = summary
                print(f"  concurrency {conc}: {summary['output_throughput']:.1f} output tok/s, "
                      f"{summary['failed']} failed", file=sys.stderr)
            results["servers"][name] = per_conc
    return results


def table(results: dict) -> str:
    names = list(results["servers"])
    lines = [f"{results['model']}: {results['num_prompts']} requests per concurrency, input {results['input_len']}, "
             f"output {results['output_len']} tokens",
             "| server | concurrency | output tok/s | vs tokenmill | TTFT median (ms) | TTFT p99 (ms) | "
             "TPOT median (ms) | TPOT p99 (ms) | failed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def cell(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for name in names:
        for conc, s in results["servers"][name].items():
            ours = results["servers"].get("tokenmill", {}).get(conc)
            ratio = f"{ours['output_throughput'] / s['output_throughput']:.2f}x" if ours and s["output_throughput"] else "-"
            lines.append(f"| {name} | {conc} | {cell(s['output_throughput'], 1)} | {ratio if name != 'tokenmill' else ''} | "
                         f"{cell(s['ttft']['median_ms'], 0)} | {cell(s['ttft']['p99_ms'], 0)} | "
                         f"{cell(s['tpot']['median_ms'], 1)} | {cell(s['tpot']['p99_ms'], 1)} | {s['failed']} |")
    lines.append("(vs tokenmill: tokenmill's output tok/s divided by the server's, at the same concurrency)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default: 2)")
    p.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server binary (default: on PATH)")
    p.add_argument("--peers", nargs="+", default=["tokenmill", "llama-server", "llama-cpp-python"])
    p.add_argument("--tokenmill-args", default="", help='extra `tokenmill serve` flags, e.g. "--dtype float32"')
    p.add_argument("--log-dir", default="results/serve_logs")
    p.add_argument("--output-json", default="results/serve_vs_llamacpp.json")
    args = p.parse_args()
    results = run(args)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))  # before the table, so a run is never lost
    print(f"wrote {out}", file=sys.stderr)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

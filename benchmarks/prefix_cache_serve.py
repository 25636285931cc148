"""Prefix caching, measured through the server: the same shared-prefix load with the cache on and off.

    python benchmarks/prefix_cache_serve.py            # 128 requests, 1024-token shared prefix, concurrency 16

Starts `tokenmill serve` twice on the default model (cache on, then `--no-enable-prefix-caching`),
sends each the same prompts (a 1024-token prefix shared by all, then 64 distinct tokens) with
`tokenmill bench serve`'s client; prompt tokens computed are the prompt tokens the server
reported in usage less the prefix-cache hits in its /metrics. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tokenmill.bench.launch import LaunchedServer, free_port, scrape_metric
from tokenmill.bench.serve import ServeBenchConfig, build_requests, run_serve_benchmark_sync


def run_one(flags: list[str], config: ServeBenchConfig, requests, log_path: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port), "--log-level", "warning",
           *flags]
    with LaunchedServer(cmd, url, log_path=str(log_path)):
        cfg = ServeBenchConfig(url, request_rates=[math.inf], max_concurrency=config.max_concurrency,
                               num_prompts=config.num_prompts, output_len=config.output_len)
        summary = run_serve_benchmark_sync(cfg, requests)["runs"][0]["summary"]
        hits = scrape_metric(url, "tokenmill_prefix_cache_hits_tokens_total")
    prompt_tokens = summary["total_input_tokens"]  # as the server counted them in usage
    return {"summary": summary, "prompt_tokens": prompt_tokens, "cached_tokens": hits,
            "computed_prompt_tokens": prompt_tokens - hits}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--tokenmill-args", default="", help="extra `tokenmill serve` flags")
    p.add_argument("--output-json", default="results/prefix_cache_serve.json")
    args = p.parse_args()
    config = ServeBenchConfig("http://unused", max_concurrency=args.concurrency, num_prompts=args.num_prompts,
                              input_len=args.prefix_len + args.suffix_len, output_len=args.output_len,
                              shared_prefix_len=args.prefix_len)
    requests = build_requests(config)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = args.tokenmill_args.split()
    results = {}
    for name, flags in (("cache on", extra), ("cache off", [*extra, "--no-enable-prefix-caching"])):
        print(f"== {name}", file=sys.stderr)
        results[name] = run_one(flags, config, requests, out.with_name(f"prefix_cache_{name.replace(' ', '_')}.log"))
    on, off = results["cache on"], results["cache off"]
    rows = [("TTFT median (ms)", lambda r: r["summary"]["ttft"]["median_ms"], "{:.0f}"),
            ("TTFT p99 (ms)", lambda r: r["summary"]["ttft"]["p99_ms"], "{:.0f}"),
            ("prompt tokens computed", lambda r: r["computed_prompt_tokens"], "{:.0f}"),
            ("output tok/s", lambda r: r["summary"]["output_throughput"], "{:.1f}"),
            ("failed requests", lambda r: r["summary"]["failed"], "{}")]
    print(f"{args.num_prompts} requests: {args.prefix_len}-token shared prefix + {args.suffix_len} distinct tokens, "
          f"{args.output_len} output tokens, concurrency {args.concurrency}")
    print("| metric | cache on | cache off | off / on |\n|---|---:|---:|---:|")
    for label, get, fmt in rows:
        a, b = get(on), get(off)
        ratio = f"{b / a:.2f}x" if a else "-"
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    out.write_text(json.dumps({"config": vars(args), "results": results}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel replicas, measured through the server: how to split the cores, and how to route.

    python benchmarks/replicas.py                    # both parts, default model, 2 cores
    python benchmarks/replicas.py --part routing     # only the routing comparison

Part "split": the same load (64 random prompts of 128 tokens, 128 output tokens, concurrency 32) on
one engine with every thread (`tokenmill serve`) against replicas of one thread each
(`--data-parallel-size N --threads-per-replica 1`, on a local Ray instance).
Part "routing": a multi-prefix load (8 families of prompts, each a 512-token prefix then 64
distinct tokens, 16 output tokens, concurrency 16, families interleaved at random) on 2 replicas
routed by prefix affinity, round-robin and least-loaded, with one engine of all the threads as the
reference: the share of prompt tokens found cached (/metrics), TTFT median and p99, output tok/s.
Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

from tokenmill.bench.launch import LaunchedServer, free_port, scrape_metric
from tokenmill.bench.serve import ServeBenchConfig, build_requests, run_serve_benchmark_sync
from tokenmill.bench.workload import load_tokenizer, synthetic_requests


def run_server(flags: list[str], requests, concurrency: int, log_path: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port), "--log-level", "warning",
           *flags]
    with LaunchedServer(cmd, url, log_path=str(log_path)):
        cfg = ServeBenchConfig(url, request_rates=[math.inf], max_concurrency=concurrency, num_prompts=len(requests))
        summary = run_serve_benchmark_sync(cfg, requests)["runs"][0]["summary"]
        hits = scrape_metric(url, "tokenmill_prefix_cache_hits_tokens_total")
    return {"summary": summary, "cached_share": hits / summary["total_input_tokens"]}


def multi_prefix_requests(families: int, per_family: int, prefix_len: int, suffix_len: int, output_len: int,
                          seed: int):
    tokenizer = load_tokenizer(None)
    requests = [r for f in range(families)
                for r in synthetic_requests(tokenizer, per_family, prefix_len + suffix_len, output_len, prefix_len,
                                            seed + f)]
    random.Random(seed).shuffle(requests)
    return requests


def table(title: str, results: dict[str, dict], rows) -> None:
    print(f"\n{title}\n| metric | " + " | ".join(results) + " |\n|---|" + "---:|" * len(results))
    for label, get, fmt in rows:
        print(f"| {label} | " + " | ".join(fmt.format(get(r)) for r in results.values()) + " |")


ROWS = [("output tok/s", lambda r: r["summary"]["output_throughput"], "{:.1f}"),
        ("TTFT median (ms)", lambda r: r["summary"]["ttft"]["median_ms"], "{:.0f}"),
        ("TTFT p99 (ms)", lambda r: r["summary"]["ttft"]["p99_ms"], "{:.0f}"),
        ("TPOT median (ms)", lambda r: r["summary"]["tpot"]["median_ms"], "{:.1f}"),
        ("prompt tokens found cached", lambda r: 100 * r["cached_share"], "{:.0f}%"),
        ("failed requests", lambda r: r["summary"]["failed"], "{}")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["split", "routing", "both"], default="both")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="the one engine's threads (default: all)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--families", type=int, default=8)
    p.add_argument("--per-family", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--routing-concurrency", type=int, default=16)
    p.add_argument("--output-json", default="results/replicas.json")
    args = p.parse_args()
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    one = ["--data-parallel-size", "1"]
    many = ["--data-parallel-size", str(args.replicas), "--threads-per-replica", "1"]
    single, replicated = f"1 x {args.threads} threads", f"{args.replicas} x 1 thread"
    report = {"config": vars(args)}
    if args.part in ("split", "both"):
        requests = build_requests(ServeBenchConfig("http://unused", num_prompts=args.num_prompts))
        results = {}
        for name, flags in ((single, one), (replicated, many)):
            print(f"== split: {name}", file=sys.stderr)
            results[name] = run_server(flags, requests, args.concurrency, out.with_name(f"replicas_split_{len(results)}.log"))
        table(f"{args.num_prompts} prompts of 128 tokens, 128 output tokens, concurrency {args.concurrency}",
              results, ROWS)
        report["split"] = results
    if args.part in ("routing", "both"):
        requests = multi_prefix_requests(args.families, args.per_family, args.prefix_len, 64, 16, seed=0)
        results = {}
        for name, flags in ((f"{single}", one), *((f"{replicated}, {policy}", [*many, "--routing-policy", policy])
                                                   for policy in ("prefix", "round_robin", "least_loaded"))):
            print(f"== routing: {name}", file=sys.stderr)
            results[name] = run_server(flags, requests, args.routing_concurrency,
                                       out.with_name(f"replicas_routing_{len(results)}.log"))
        table(f"{len(requests)} prompts: {args.families} families of a {args.prefix_len}-token prefix + 64 tokens, "
              f"16 output tokens, concurrency {args.routing_concurrency}", results, ROWS)
        report["routing"] = results
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

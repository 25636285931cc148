"""Scheduling policies under a saturating multi-tenant load: the same workload against each policy.

    python benchmarks/scheduling_policies.py                      # fcfs priority aging sjf fair, default model

"Saturating" is measured, not guessed: a machine twice as slow turns a fixed arrival rate from
a busy server into a backlog that grows without bound, where every reordering policy's tail
loses to fcfs's. So the benchmark first measures the server's capacity for this workload (a
fifth of each tenant's requests sent at once to an fcfs server: requests completed per
second) and scales every tenant's rate so that together they arrive at --load x that capacity
(--rate-scale fixes the scale instead).

Starts `tokenmill serve --scheduling-policy P` once per policy (same engine flags) and sends each
the same multi-tenant workload with `tokenmill bench serve`'s client: three tenants with their
own prompt and output lengths, rates and priorities, one of them bursty. It prints the median and
p99 end-to-end latency per tenant and overall for every policy, the sjf length estimator's error
and the preemptions (read from /metrics), and writes everything to JSON. With --repeats N the
policies take turns N times (so drift on a noisy machine hits them alike) and every figure is
the median over the N runs; the ratios to fcfs are per repeat, then their median.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import urllib.request
from pathlib import Path

from tokenmill.bench.launch import LaunchedServer, free_port
from tokenmill.bench.serve import ServeBenchConfig, run_serve_benchmark_sync
from tokenmill.bench.workload import TenantSpec
from tokenmill.config import POLICIES

# (interactive chat, document summaries, a bursty offline batch job); lower priority runs first.
# The rates are relative: --load or --rate-scale scales them all.
TENANTS = ["name=chat,num=150,rate=1.0,input=64:256,output=16:48,priority=0",
           "name=summarize,num=30,rate=0.2,input=512:1024,output=32:64,priority=1",
           "name=batch,num=15,rate=0.1,burstiness=0.3,input=128:256,output=192:256,priority=2"]
ESTIMATOR = ("mae_tokens", "rmse_tokens", "baseline_mae_tokens", "reliability", "observations")
PROBE_FRACTION = 5  # the capacity probe sends every tenant's num / 5 requests, all at once


def scrape(url: str, prefix: str) -> dict[str, float]:
    """The samples of /metrics whose names start with `prefix`."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {line.split()[0]: float(line.split()[-1]) for line in lines if line.startswith(prefix)}


def run_policy(policy: str, flags: list[str], tenants: list[TenantSpec], ignore_eos: bool, log_path: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port), "--log-level", "warning",
           "--scheduling-policy", policy, *flags]
    with LaunchedServer(cmd, url, log_path=str(log_path)):
        result = run_serve_benchmark_sync(ServeBenchConfig(url, tenants=tenants, ignore_eos=ignore_eos),
                                          log=lambda msg: print(f"[{policy}] {msg}", file=sys.stderr, flush=True))
        estimator = scrape(url, "tokenmill_length_estimator_")
        preemptions = scrape(url, "tokenmill_num_preemptions_total")["tokenmill_num_preemptions_total"]
    run = result["runs"][0]
    return {"summary": run["summary"], "tenants": run["tenants"], "requests": run["requests"],
            "preemptions": preemptions,
            "estimator": {k.removeprefix("tokenmill_length_estimator_"): v for k, v in estimator.items()}}


def measure_capacity(flags: list[str], tenants: list[TenantSpec], ignore_eos: bool, log_path: Path) -> float:
    """Requests per second an fcfs server completes of this workload's mix, given all at once."""
    probe = [dataclasses.replace(t, num_prompts=max(1, t.num_prompts // PROBE_FRACTION), rate=float("inf"))
             for t in tenants]
    summary = run_policy("fcfs", flags, probe, ignore_eos, log_path)["summary"]
    if summary["failed"]:
        raise SystemExit(f"capacity probe: {summary['failed']} requests failed; see {log_path}")
    return summary["request_throughput"]


def e2e_seconds(run: dict, tenant: str) -> tuple[float, float] | None:
    """(median, p99) end-to-end latency of one run, overall ("all") or for one tenant."""
    e2e = (run["summary"] if tenant == "all" else run["tenants"][tenant])["e2e"]
    return None if e2e["median_ms"] is None else (e2e["median_ms"] / 1000, e2e["p99_ms"] / 1000)


def median_of(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def table(results: dict[str, list[dict]], tenants: list[str]) -> str:
    head = " | ".join(f"{t} median / p99" for t in [*tenants, "all"])
    lines = [f"| policy | {head} | failed | preemptions |", "|---|" + "---:|" * (len(tenants) + 3)]
    for policy, runs in results.items():
        cells = []
        for t in [*tenants, "all"]:
            pairs = [e2e_seconds(r, t) for r in runs]
            pairs = [x for x in pairs if x is not None]
            cells.append(f"{median_of([m for m, _ in pairs]):.1f} / {median_of([p for _, p in pairs]):.1f}"
                         if pairs else "-")
        failed = sum(r["summary"]["failed"] for r in runs)
        lines.append(f"| {policy} | {' | '.join(cells)} | {failed} | {median_of([r['preemptions'] for r in runs]):.0f} |")
    return "\n".join(lines)


def ratios_to_fcfs(results: dict[str, list[dict]]) -> list[str]:
    """Per policy: its overall median and p99 over fcfs's, repeat by repeat, and the median of each."""
    lines = []
    for policy, runs in results.items():
        pairs = [(e2e_seconds(r, "all"), e2e_seconds(b, "all")) for r, b in zip(runs, results["fcfs"])]
        pairs = [(r, b) for r, b in pairs if r and b]
        if not pairs:
            continue
        median = [r[0] / b[0] for r, b in pairs]
        p99 = [r[1] / b[1] for r, b in pairs]
        lines.append(f"{policy}: overall median {statistics.median(median):.2f}x fcfs, p99 {statistics.median(p99):.2f}x "
                     f"fcfs (per repeat: {', '.join(f'{m:.2f}/{q:.2f}' for m, q in zip(median, p99))})")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--tenant", action="append", default=None, metavar="SPEC",
                   help="replace the default tenants (same syntax as `tokenmill bench serve --tenant`)")
    p.add_argument("--tokenmill-args", default="--max-num-seqs 8", help="`tokenmill serve` flags for every policy")
    p.add_argument("--sjf-seconds-per-token", type=float, nargs="+", default=[0.1],
                   help="run sjf once per value (how much waiting outweighs predicted length; default: 0.1)")
    p.add_argument("--load", type=float, default=0.9,
                   help="total arrival rate as a fraction of the measured capacity (default: 0.9)")
    p.add_argument("--rate-scale", type=float, default=None,
                   help="multiply every tenant's arrival rate by this instead of measuring the capacity")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let outputs end at EOS, so lengths are the model's and the estimator has to learn them")
    p.add_argument("--repeats", type=int, default=1, help="run every policy this many times, taking turns")
    p.add_argument("--output-json", default="results/scheduling_policies.json")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if not args.load > 0 or (args.rate_scale is not None and not args.rate_scale > 0):
        p.error("--load and --rate-scale must be positive")
    tenants = [TenantSpec.parse(spec) for spec in args.tenant or TENANTS]
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    capacity = None
    scale = args.rate_scale
    if scale is None:
        print("measuring the capacity (fcfs, a fifth of the requests at once)", file=sys.stderr, flush=True)
        capacity = measure_capacity(args.tokenmill_args.split(), tenants, args.ignore_eos,
                                    out.with_name("scheduling_capacity.log"))
        scale = args.load * capacity / sum(t.rate for t in tenants)
        print(f"capacity {capacity:.3f} requests/s; rates x {scale:.3f} for load {args.load}", file=sys.stderr)
    tenants = [dataclasses.replace(t, rate=t.rate * scale) for t in tenants]
    runs = [(p, []) for p in args.policies if p != "sjf"]
    if "sjf" in args.policies:
        at = args.policies.index("sjf")
        runs[at:at] = [(f"sjf {v} s/token" if len(args.sjf_seconds_per_token) > 1 else "sjf",
                        ["--sjf-seconds-per-token", str(v)]) for v in args.sjf_seconds_per_token]
    results: dict[str, list[dict]] = {label: [] for label, _ in runs}
    for repeat in range(args.repeats):
        for label, flags in runs:
            log = out.with_name(f"scheduling_{label.replace(' ', '_').replace('/', '')}_{repeat}.log")
            print(f"[{label}] repeat {repeat + 1} of {args.repeats}", file=sys.stderr, flush=True)
            results[label].append(run_policy(label.split()[0], [*args.tokenmill_args.split(), *flags], tenants,
                                             args.ignore_eos, log))
            out.write_text(json.dumps({"config": vars(args), "capacity_requests_per_s": capacity, "rate_scale": scale,
                                       "tenants": [vars(t) for t in tenants], "results": results}, indent=2))
    names = [t.name for t in tenants]
    if capacity is not None:
        print(f"Load {args.load} x the measured capacity of {capacity:.3f} requests/s (tenant rates x {scale:.3f}).")
    print(f"End-to-end latency in seconds, median / p99, per tenant"
          f"{f' (medians over {args.repeats} runs)' if args.repeats > 1 else ''}:")
    print(table(results, names))
    if "fcfs" in results:
        print("\n".join(ratios_to_fcfs(results)))
    for label, runs_of_label in results.items():
        if runs_of_label[0]["estimator"]:
            print(f"{label} length estimator: " + ", ".join(
                f"{k} {median_of([r['estimator'].get(k, float('nan')) for r in runs_of_label]):.2f}"
                for k in ESTIMATOR))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The simulator against the server: the README's serving runs, measured and predicted side by side.

    python benchmarks/simulator_accuracy.py                 # every scenario, default model
    python benchmarks/simulator_accuracy.py --scenarios c1 c8

First times engine steps here and fits the step-cost model (`tokenmill calibrate --steps`),
then for each scenario starts `tokenmill serve` with its flags, sends the workload with
`tokenmill bench serve`'s client, and replays the same requests (token counts as the server
reported them, the same arrival times and concurrency cap) in `tokenmill simulate` with the
server's own KV pool size. Prints measured, predicted and the error of each median and p99,
and writes everything to JSON.

A machine whose speed drifts between the fit and a scenario would show the drift as the model's
error. So, unless --no-rescale, just before and just after each scenario a probe times a few
steps of the fit's grid again (batch 1 and 8 at context 256, with their prefills) and the model is
scaled for that scenario by the probes' measured over predicted seconds (their mean); the factor
and the unscaled errors go to the JSON too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from tokenmill.bench.launch import LaunchedServer, free_port, scrape_metric
from tokenmill.bench.serve import ServeBenchConfig, build_requests, run_serve_benchmark_sync
from tokenmill.bench.workload import TenantSpec, arrival_times, tenant_workload, load_tokenizer
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.policy import PolicyConfig
from tokenmill.sim import calibrate_steps
from tokenmill.sim.cost_model import LinearStepCost, load_file
from tokenmill.sim.simulator import ReplicaSettings, SimRequest, Simulation

POLICY_TENANTS = ["name=chat,num=60,rate=1.0,input=64:256,output=16:48,priority=0",
                  "name=summarize,num=12,rate=0.2,input=512:1024,output=32:64,priority=1",
                  "name=batch,num=6,rate=0.1,burstiness=0.3,input=128:256,output=192:256,priority=2"]

# name -> (server flags, bench serve config fields)
SCENARIOS = {
    "c1": ([], dict(num_prompts=12, input_len=128, output_len=64, max_concurrency=1)),
    "c8": ([], dict(num_prompts=48, input_len=128, output_len=64, max_concurrency=8)),
    "c32": ([], dict(num_prompts=96, input_len=128, output_len=64, max_concurrency=32)),
    "fcfs": (["--max-num-seqs", "8", "--scheduling-policy", "fcfs"], dict(tenants=POLICY_TENANTS)),
    "sjf": (["--max-num-seqs", "8", "--scheduling-policy", "sjf"], dict(tenants=POLICY_TENANTS)),
    "prefix": ([], dict(num_prompts=48, input_len=1088, shared_prefix_len=1024, output_len=32, max_concurrency=16)),
}
METRICS = ("ttft", "tpot", "e2e")


def measure(flags: list[str], config: ServeBenchConfig, requests, log_path: Path) -> tuple[dict, int]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(port), "--log-level", "warning",
           *flags]
    with LaunchedServer(cmd, url, log_path=str(log_path)):
        config.base_url = url
        run = run_serve_benchmark_sync(config, requests)["runs"][0]
        blocks = int(scrape_metric(url, "tokenmill_kv_cache_total_blocks")) + 1
    return run, blocks


def replay(run: dict, times: list[float], shared_prefix_len: int, tenants: dict[str, int]) -> list[SimRequest]:
    """The requests as the server saw them: its token counts, the same send times, prefixes shared alike."""
    prefix = list(range(1, shared_prefix_len + 1))
    out = []
    for i, (record, at) in enumerate(zip(run["requests"], times)):
        n = record["prompt_len"]
        body = [1000 + (i * 7919 + j) % 40000 for j in range(n - len(prefix))]
        out.append(SimRequest(at, prefix[:n] + body, record["output_tokens"] or record["output_len"],
                              record.get("tenant") or "", tenants.get(record.get("tenant"), 0)))
    return out


def settings_of(flags: list[str], num_blocks: int) -> ReplicaSettings:
    args = dict(zip(flags[::2], flags[1::2]))
    return ReplicaSettings(num_blocks=num_blocks, max_num_seqs=int(args.get("--max-num-seqs", 64)),
                           max_model_len=min(8192, (num_blocks - 1) * 16),
                           policy=PolicyConfig(args.get("--scheduling-policy", "fcfs")))


def speed_factor(engine: LLMEngine, cost: LinearStepCost) -> float:
    """How much slower (> 1) or faster the machine runs a probe of the fit's steps now than `cost` predicts."""
    samples = calibrate_steps.time_steps(engine, batches=(1, 8), contexts=(256,))
    return sum(t for _, t in samples) / sum(cost.shape_seconds(shape) for shape, _ in samples)


def scaled(cost: LinearStepCost, factor: float) -> LinearStepCost:
    return replace(cost, coefficients={k: v * factor for k, v in cost.coefficients.items()})


def errors(predicted: dict, measured: dict) -> dict:
    out = {f"{metric}_{stat}_error": error(predicted[metric][stat], measured[metric][stat])
           for metric in METRICS for stat in ("median_ms", "p99_ms")}
    out["output_throughput_error"] = error(predicted["output_throughput"], measured["output_throughput"])
    return out


def error(predicted, measured):
    return None if predicted is None or not measured else predicted / measured - 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--cost-model", default=None, help="a JSON cost model (default: calibrate the default model now)")
    p.add_argument("--output-json", default="results/simulator_accuracy.json")
    p.add_argument("--no-rescale", action="store_true",
                   help="predict every scenario with the model as fitted (default: rescaled by probes around each)")
    args = p.parse_args()
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    cost = load_file(args.cost_model) if args.cost_model else None
    rescale = not args.no_rescale and (cost is None or isinstance(cost, LinearStepCost))  # a roofline has no fit to redo
    engine = LLMEngine() if cost is None or rescale else None  # for the fit and the probes
    fit = None
    if cost is None:
        print("timing engine steps for the cost model", file=sys.stderr, flush=True)
        cost, fit = calibrate_steps.measure(engine, say=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"cost model {cost.coefficients}, fit {fit}", file=sys.stderr, flush=True)
    tokenizer = load_tokenizer(None)
    results = {}
    for name in args.scenarios:
        flags, fields = SCENARIOS[name]
        tenant_specs = [TenantSpec.parse(s) for s in fields.get("tenants", [])]
        config = ServeBenchConfig("http://unset", request_rates=[math.inf], **{**fields, "tenants": tenant_specs})
        if tenant_specs:
            requests, times = tenant_workload(tokenizer, tenant_specs, config.seed)
        else:
            requests = build_requests(config, tokenizer)
            times = arrival_times(len(requests), math.inf)
        before = speed_factor(engine, cost) if rescale else None
        print(f"[{name}] measuring", file=sys.stderr, flush=True)
        # with tenants, bench serve builds the same seeded workload itself
        run, blocks = measure(flags, config, None if tenant_specs else requests, out.with_name(f"simacc_{name}.log"))
        factor = (before + speed_factor(engine, cost)) / 2 if rescale else None
        priorities = {t.name: t.priority or 0 for t in tenant_specs}
        simulated = replay(run, times, config.shared_prefix_len, priorities)
        measured = run["summary"]
        predicted = Simulation(cost, settings_of(flags, blocks), max_concurrency=config.max_concurrency).run(simulated)
        row = {"measured": measured, "predicted": predicted, "speed_factor": 1.0, **errors(predicted, measured)}
        if factor is not None:
            row["unscaled"] = {"predicted": predicted, **errors(predicted, measured)}
            row["speed_factor"] = factor
            row["predicted"] = Simulation(scaled(cost, factor), settings_of(flags, blocks),
                                          max_concurrency=config.max_concurrency).run(simulated)
            row.update(errors(row["predicted"], measured))
        results[name] = row
        out.write_text(json.dumps({"cost_model": cost.to_dict(), "fit": fit, "results": results}, indent=2))
    print(f"{'scenario':9s} {'metric':6s} {'measured med':>12s} {'predicted':>10s} {'err':>6s} "
          f"{'measured p99':>12s} {'predicted':>10s} {'err':>6s}")
    for name, row in results.items():
        for metric in METRICS:
            m, s = row["measured"][metric], row["predicted"][metric]
            print(f"{name:9s} {metric:6s} {m['median_ms'] or 0:12.1f} {s['median_ms'] or 0:10.1f} "
                  f"{(row[f'{metric}_median_ms_error'] or 0) * 100:5.0f}% {m['p99_ms'] or 0:12.1f} "
                  f"{s['p99_ms'] or 0:10.1f} {(row[f'{metric}_p99_ms_error'] or 0) * 100:5.0f}%")
        print(f"{name:9s} output tok/s measured {row['measured']['output_throughput']:.1f}, predicted "
              f"{row['predicted']['output_throughput']:.1f} ({row['output_throughput_error'] * 100:+.0f}%); "
              f"model scaled by {row['speed_factor']:.2f}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

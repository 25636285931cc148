"""`tokenmill simulate` and `tokenmill plan`: serving predicted from a step-cost model, no weights loaded.

Both take the engine flags (what each replica runs with), a workload described as `tokenmill
bench serve` takes one (or a JSONL trace), and where the steps run: `--chip here` uses the cost
model `tokenmill calibrate --steps` stored for the same model flags on this machine; `--chip
h100` or `h200` a roofline model of that chip ("modelled").
"""

from __future__ import annotations

import argparse
import math
import sys

from tokenmill.errors import InvalidParameterError


def _add_simulation_flags(p: argparse.ArgumentParser, rate: bool = True) -> None:
    g = p.add_argument_group("replicas")
    g.add_argument("--chip", choices=("here", "h100", "h200"), default="here",
                   help="here: the step-cost model `tokenmill calibrate --steps` measured for these model flags; "
                        "h100, h200: a roofline model of that chip (default: here)")
    g.add_argument("--cost-model", default=None, metavar="JSON", help="a cost model file instead (as --output-json writes it)")
    g.add_argument("--routing-policy", choices=("prefix", "round_robin", "least_loaded"), default="prefix",
                   help="how requests are spread over replicas (default: prefix)")
    g = p.add_argument_group("workload")
    if rate:
        g.add_argument("--request-rate", type=float, default=math.inf, help="requests per second, or inf (default: inf)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 is Poisson (default: 1)")
    g.add_argument("--num-prompts", type=int, default=1000, help="requests (default: 1000)")
    g.add_argument("--input-len", default="128", help='prompt tokens, or a range "LOW:HIGH" (default: 128)')
    g.add_argument("--output-len", default="128", help='tokens to generate, or a range "LOW:HIGH" (default: 128)')
    g.add_argument("--shared-prefix-len", type=int, default=0, help="tokens of the prefix each prompt family shares")
    g.add_argument("--num-prefixes", type=int, default=1, help="prompt families, each with its own prefix (default: 1)")
    g.add_argument("--tenant", action="append", default=[], metavar="SPEC",
                   help="a tenant, as `tokenmill bench serve --tenant` takes it (replaces the fields above)")
    g.add_argument("--trace", default=None, metavar="JSONL",
                   help='requests from a file: {"arrival", "output_len", and "prompt_ids" or "input_len" with '
                        'optional "prefix", "prefix_len"} per line')
    g.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    g.add_argument("--output-json", default=None, help="write the result to this file")


def add_simulate(sub) -> None:
    from tokenmill.entrypoints.cli import engine_parent

    p = sub.add_parser("simulate", parents=[engine_parent()], help="predict serving figures without running the model",
                       description="Run the real scheduler, policy, KV cache and router on a virtual clock whose "
                                   "steps cost what the cost model says, and report what `tokenmill bench serve` "
                                   "would: TTFT, TPOT, ITL and E2E percentiles, throughput, goodput, preemptions, "
                                   "prefix-cache hits, energy and price per million tokens.")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas behind the router (default: 1)")
    p.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50")
    _add_simulation_flags(p)
    p.set_defaults(func=cmd_simulate)


def add_plan(sub) -> None:
    from tokenmill.entrypoints.cli import engine_parent

    p = sub.add_parser("plan", parents=[engine_parent()], help="the cheapest replicas and settings that meet an SLO",
                       description="Search replica counts and engine settings by simulation for the fewest replicas "
                                   "whose SLO percentile of each named latency meets its target at --rate.")
    p.add_argument("--rate", type=float, required=True, help="requests per second to serve")
    p.add_argument("--slo", required=True, help='targets in ms, e.g. "ttft:500,tpot:50"')
    p.add_argument("--slo-percentile", type=int, choices=(50, 90, 99), default=90, help="(default: 90)")
    p.add_argument("--max-replicas", type=int, default=1024, help="(default: 1024)")
    p.add_argument("--try-max-num-seqs", type=int, nargs="+", default=None, metavar="N",
                   help="max_num_seqs values to try (default: the engine's)")
    p.add_argument("--try-max-num-batched-tokens", type=int, nargs="+", default=None, metavar="N",
                   help="token budgets to try (default: the engine's)")
    p.add_argument("--try-policies", nargs="+", default=None, metavar="POLICY",
                   help="scheduling policies to try (default: the engine's)")
    _add_simulation_flags(p, rate=False)
    p.set_defaults(func=cmd_plan)


def _inputs(args):
    """(cost model, replica settings, model name, workload factory, price per hour) from the flags."""
    import torch

    from tokenmill.bench.workload import TenantSpec
    from tokenmill.config import EngineConfig, resolve_dtype, resolve_kv_cache_dtype
    from tokenmill.engine.builder import pool_size
    from tokenmill.entrypoints.cli import engine_kwargs
    from tokenmill.metering.roofline import ModelBytes
    from tokenmill.sim import calibrate_steps
    from tokenmill.sim.cost_model import CHIPS, load_file, modelled
    from tokenmill.sim.shapes import model_shape
    from tokenmill.sim.simulator import ReplicaSettings
    from tokenmill.sim.workload import WorkloadSpec, load_trace, synthetic

    config = EngineConfig.from_kwargs(model=args.model, **engine_kwargs(args))
    name, shape = model_shape(config.model.source)
    price = config.metering.price_per_hour
    if args.chip == "here":
        device = torch.device(config.model.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        kv_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, resolve_dtype(config.model.dtype, device))
        if args.cost_model:
            cost = load_file(args.cost_model, shape)
        else:
            cost = calibrate_steps.load(config, device)
            if cost is None:
                raise InvalidParameterError("chip", f"no step-cost model of {calibrate_steps.engine_label(config)} on "
                                                    "this machine: run `tokenmill calibrate --steps` with the same "
                                                    "model flags first, or pass --chip h100/h200")
        num_blocks, max_model_len = pool_size(config, shape, kv_dtype, device)
    else:
        chip = CHIPS[args.chip]
        dtype = resolve_dtype(config.model.dtype, torch.device("cuda"))
        kv_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, dtype)
        cost = load_file(args.cost_model, shape) if args.cost_model else modelled(args.chip, shape, dtype)
        per_block = shape.kv_bytes_per_token(kv_dtype) * config.cache.block_size
        weights = ModelBytes.dense(shape, dtype)
        budget = config.cache.kv_cache_memory or int(0.9 * chip["memory_bytes"] - weights.layers - weights.head)
        if budget < per_block:
            raise InvalidParameterError("chip", f"{name} does not fit on one {args.chip}")
        num_blocks = budget // per_block + 1
        max_model_len = min(config.model.max_model_len or shape.max_position_embeddings, (num_blocks - 1) * config.cache.block_size)
        price = chip["price_per_hour"] if price is None else price
    settings = ReplicaSettings(num_blocks, config.cache.block_size, config.scheduler.max_num_seqs,
                               config.scheduler.max_num_batched_tokens, max_model_len,
                               config.cache.enable_prefix_caching, config.scheduler.policy)
    seed = config.model.seed or 0
    if args.trace:
        def workload():
            return load_trace(args.trace, shape.vocab_size, seed, settings.max_model_len)
    else:
        spec = WorkloadSpec(args.num_prompts, getattr(args, "request_rate", getattr(args, "rate", math.inf)),
                            args.burstiness, args.input_len, args.output_len, args.shared_prefix_len, args.num_prefixes,
                            [TenantSpec.parse(t) for t in args.tenant], shape.vocab_size, seed)

        def workload():
            return synthetic(spec)
    return cost, settings, name, workload, price, config.metering.energy_price


def _describe(summary: dict, price, energy_price) -> list[str]:
    from tokenmill.sim.simulator import price_per_million

    per_million = price_per_million(summary, price, energy_price)
    joules = summary["joules_per_output_token"]
    return [f"replicas {summary['num_replicas']}, cost model {summary['cost_model']['source']} "
            f"({summary['cost_model']['label']})",
            f"preemptions {summary['num_preemptions']}, prefix-cache hit rate {summary['prefix_hit_rate']:.2f}",
            f"energy {'-' if joules is None else f'{joules:.3f}'} J per output token, "
            f"{'-' if per_million is None else f'${per_million:.3f}'} per million output tokens"]


def cmd_simulate(args: argparse.Namespace) -> int:
    from tokenmill.bench.metrics import parse_slos
    from tokenmill.bench.serve import format_table, rate_label
    from tokenmill.bench.report import write_json
    from tokenmill.sim.simulator import Simulation

    cost, settings, name, workload, price, energy_price = _inputs(args)
    sim = Simulation(cost, settings, args.replicas, args.routing_policy, args.max_concurrency)
    summary = sim.run(workload(), parse_slos(args.goodput))
    rate = "trace" if args.trace else "tenants" if args.tenant else rate_label(args.request_rate)
    result = {"model": name, "num_prompts": summary["completed"] + summary["failed"],
              "runs": [{"request_rate": rate, "summary": summary}]}
    print(format_table(result))
    print("\n".join(_describe(summary, price, energy_price)))
    if args.output_json:
        write_json({**result, "cost_model": cost.to_dict()}, args.output_json)
        print(f"wrote {args.output_json}", file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tokenmill.bench.metrics import parse_slos
    from tokenmill.bench.report import write_json
    from tokenmill.sim.plan import search

    cost, settings, name, workload, price, energy_price = _inputs(args)
    slos = parse_slos(part for part in args.slo.split(",") if part)
    best, tried = search(cost, settings, workload, slos, args.try_max_num_seqs or [settings.max_num_seqs],
                         args.try_max_num_batched_tokens or [settings.max_num_batched_tokens],
                         args.try_policies or [settings.policy.name], args.max_replicas, args.slo_percentile,
                         args.routing_policy, say=lambda msg: print(msg, file=sys.stderr, flush=True))
    if best is None:
        print(f"no plan of at most {args.max_replicas} replicas meets {args.slo} at {args.rate} requests/s")
        return 1
    s = best.summary
    key = {50: "median_ms", 90: "p90_ms", 99: "p99_ms"}[args.slo_percentile]
    print(f"{name} at {args.rate} requests/s, p{args.slo_percentile} SLO {args.slo}: {best.replicas} replicas, "
          f"max_num_seqs {best.settings.max_num_seqs}, max_num_batched_tokens {best.settings.max_num_batched_tokens}, "
          f"{best.settings.policy.name}")
    for metric in ("ttft", "tpot", "e2e"):
        print(f"  {metric.upper()} median {s[metric]['median_ms']:.1f} ms, p{args.slo_percentile} {s[metric][key]:.1f} ms")
    print(f"  output {s['output_throughput']:.0f} tok/s, {s['request_throughput']:.1f} requests/s")
    print("  " + "\n  ".join(_describe(s, price, energy_price)))
    if args.output_json:
        write_json({"model": name, "rate": args.rate, "slo": slos, "percentile": args.slo_percentile,
                    "plan": best.to_dict(), "tried": [c.to_dict() for c in tried]}, args.output_json)
        print(f"wrote {args.output_json}", file=sys.stderr)
    return 0

"""Decode energy per token and roofline fraction at batch sizes 1, 4, 16, 64.

SmolLM2-135M-Instruct (the embedded default model) by default; B prompts of --prompt-len
random tokens are prefilled, then --new-tokens are decoded together and only the decode
steps are measured. Energy comes from RAPL/NVML where readable, else it is estimated from
CPU time (and labelled so). Prints a markdown table and writes results/energy_batch.json.

    python benchmarks/energy_batch.py [--batch-sizes 1 4 16 64] [--new-tokens 64] [--plot]

Run it on a quiet machine: other processes' load changes both time and measured energy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenmill.bench.energy import format_table, measure_decode_energy, plot_joules_per_token
from tokenmill.bench.engine_timing import ensure_roofline
from tokenmill.engine.engine import LLMEngine

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--energy-meter", default="auto")
    p.add_argument("--price-per-hour", type=float, default=None, help="machine cost in USD per hour")
    p.add_argument("--output", default=str(ROOT / "results" / "energy_batch.json"))
    p.add_argument("--plot", action="store_true", help="also write a PNG of J/token vs batch size beside the JSON")
    args = p.parse_args(argv)

    engine = LLMEngine(args.model, dtype=args.dtype, max_num_seqs=max(args.batch_sizes), energy_meter=args.energy_meter,
                       price_per_hour=args.price_per_hour, kv_cache_memory="1GiB", seed=0)
    ensure_roofline(engine)
    measure_decode_energy(engine, 1, args.prompt_len, 4)  # warm-up
    rows = []
    for b in args.batch_sizes:
        print(f"[energy] batch {b}", file=sys.stderr, flush=True)
        rows.append(measure_decode_energy(engine, b, args.prompt_len, args.new_tokens))
    title = f"{engine.model_name}, {args.dtype}, {engine.device.type}"
    print(f"\n### Decode energy vs batch size: {title}\n")
    print(format_table(rows))
    result = {"model": engine.model_name, "dtype": args.dtype, "device": engine.device.type,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.name}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot_joules_per_token(rows, out.with_suffix('.png'), title).name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

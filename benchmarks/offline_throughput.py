"""The offline-throughput benchmark: tokenmill vs Hugging Face transformers `generate`.

SmolLM2-135M-Instruct (the embedded default model) in float32; 64 synthetic prompts with
input lengths spread over 32..512 tokens, 128 output tokens each (greedy, EOS ignored);
transformers runs the same token ids in one left-padded batch. Also batch-1 decode tokens/s
for both. Prints a markdown table and writes results/offline_throughput.json.

    python benchmarks/offline_throughput.py [--repeats 3] [--model PATH] [--output results/offline_throughput.json]

All the measuring lives in tokenmill.bench (throughput.py runs it); this script only fixes the settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenmill.bench.report import format_markdown, write_json
from tokenmill.bench.throughput import run_throughput_benchmark

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", default="32:512")
    p.add_argument("--output-len", default="128")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(ROOT / "results" / "offline_throughput.json"))
    args = p.parse_args(argv)

    result = run_throughput_benchmark(
        args.model, num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
        seed=args.seed, repeats=args.repeats, compare_hf=True, batch1=True, batch1_tokens=128,
        engine_args={"dtype": "float32", "quantization": "none"},  # float32 weights, as transformers runs them
        log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))

    print(f"\n### Offline throughput: {result['model']} ({result['dtype']}, {result['device']}, "
          f"{result['environment']['threads']} threads)\n")
    print(f"{result['num_prompts']} prompts, input {result['input_len']} tokens "
          f"({result['total_input_tokens']} in all), {result['output_len']} output tokens each; "
          f"transformers in one left-padded batch; median of {result['repeats']} runs.\n")
    print(format_markdown(result))
    path = write_json(result, args.output)
    print(f"\nwrote {path.relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

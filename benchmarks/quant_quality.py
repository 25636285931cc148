"""Quality of quantized weights and KV caches against float32, as llama.cpp measures its quants.

The fixed text benchmarks/data/quality_text.txt, cut into 4 chunks of 512 tokens, is run
teacher-forced (one prefill per chunk) through SmolLM2-135M-Instruct in float32 (its GGUF
weights dequantized: the reference) and in each configuration: int8 and int4 (g32, g128)
weights, int8 and fp8 KV caches. Prints mean KL divergence, top-1 agreement, perplexity,
weight bytes and KV bytes per token, and writes results/quant_quality.json.

    python benchmarks/quant_quality.py [--model PATH] [--output results/quant_quality.json]

The measuring lives in tokenmill.bench.quality (tests/test_quantization.py uses it too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenmill.bench.quality import format_table, run_quality
from tokenmill.bench.report import write_json

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "benchmarks" / "data" / "quality_text.txt"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--output", default=str(ROOT / "results" / "quant_quality.json"))
    args = p.parse_args(argv)

    result = run_quality(TEXT.read_text(), args.model, log=lambda msg: print(f"[quality] {msg}", file=sys.stderr))
    print(format_table(result))
    print(f"wrote {write_json(result, args.output)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speculative decoding, side by side: decode tokens/s with speculation off, n-gram lookup and a draft model.

    python benchmarks/speculative.py                 # float32 target, batch 1 and 8, 3 repeats
    python benchmarks/speculative.py --engine '{}' --methods off ngram    # the default engine (int4 weights)

Two tasks on SmolLM2-135M-Instruct, greedy: (a) "copy": copy a given passage, fixing its
spelling (the output repeats the prompt: lookup should pay), (b) "story": free story writing
(it should not). Each runs at batch 1 (one prompt at a time) and batch 8 (eight at once).
Decode tokens/s counts the tokens after each request's first, over the time from the first
token to the last. The target is the GGUF dequantized to float32 (exact weights); the draft
is the same checkpoint as the default engine holds it (int4 weights, bf16 activations where
the CPU has native bf16), about half the cost of a float32 step: the smallest model with
SmolLM2's tokenizer is SmolLM2-135M itself, and copies with layers removed agree with it on
under a tenth of the tokens (README). Greedy outputs must be identical across methods; the
script checks it. Prints a table of medians over --repeats and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tokenmill import LLM, SamplingParams

PASSAGES = [
    "The old lighthouse stood at the edge of the clif for more than a hundred years. Every night its keeper climbed "
    "the narow stairs, lit the great lamp, and watched the ships pass safely through the dark water.",
    "Bees visit thousands of flowers each day. They carry pollen from one plant to the next, and without them many "
    "fruits and vegetables would never grow. A single hive can hold fifty thousand bees in sumer.",
    "The train left the station at seven o'clock sharp. Passengers read newspapers, drank coffee, and watched the "
    "feilds roll by as the morning sun rose over the hills and the river beside the tracks.",
    "Water boils at one hundred degrees Celsius at sea level, but at the top of a high mountain it boils at a lower "
    "temprature, because the air pressure there is lower. Cooks in the mountains must wait longer for pasta.",
    "Our town library opens at nine in the morning and closes at six in the evening. Children can borrow up to five "
    "books at a time, and the reading room on the second flor is always quiet and warm.",
    "The recipe is simple. Mix two cups of flour with a spoon of salt, add warm water slowly, and knead the dough for "
    "ten minuts. Let it rest for an hour before you shape the loaves and bake them.",
    "In the spring the river rises with melted snow from the mountains. The farmers open the old canals, and the "
    "water flows into the feilds where the young rice plants wait in long green rows.",
    "The museum's new exibit shows tools made by people who lived here ten thousand years ago: stone knives, bone "
    "needles, and small clay pots that still carry the marks of their makers' fingers.",
]
STORIES = ["a dragon who learns to bake bread", "a lighthouse keeper and a lost whale", "a robot that plants a garden",
           "two friends who build a boat", "a cat who runs a small bookshop", "a girl who can talk to the wind",
           "an old clock that stops time", "a village that forgets how to sing"]
TASKS = {
    "copy": [f"Copy the following passage exactly, fixing only its spelling mistakes:\n\n{p}" for p in PASSAGES],
    "story": [f"Write a short story about {s}." for s in STORIES],
}
DRAFT = {"method": "draft", "draft_dtype": "auto", "draft_quantization": "auto"}  # the default engine form
METHODS = {"off": None, "ngram": {"method": "ngram"}, "draft": DRAFT,
           "draft-always": DRAFT | {"adaptive": False}}  # the same draft without the controller, for comparison


def decode_rate(outputs) -> float:
    """Tokens after each request's first, per second from the first first token to the last finish."""
    tokens = sum(len(o.outputs[0].token_ids) - 1 for o in outputs)
    span = max(o.metrics.finished_time for o in outputs) - min(o.metrics.first_token_time for o in outputs)
    return tokens / span


def run(llm: LLM, prompts: list[str], batch: int, params: SamplingParams) -> tuple[float, list, dict]:
    """Decode tokens/s over the prompts in groups of `batch`; the outputs; draft counts."""
    rates, outputs = [], []
    for i in range(0, len(prompts), batch):
        group = [[{"role": "user", "content": p}] for p in prompts[i:i + batch]]
        outs = llm.chat(group, params, use_tqdm=False)
        outputs += outs
        rates.append((sum(len(o.outputs[0].token_ids) - 1 for o in outs), decode_rate(outs)))
    tokens = sum(t for t, _ in rates)
    seconds = sum(t / r for t, r in rates)
    counts = {"draft_tokens": sum(o.metrics.spec_draft_tokens for o in outputs),
              "accepted_tokens": sum(o.metrics.spec_accepted_tokens for o in outputs)}
    return tokens / seconds, [o.outputs[0].token_ids for o in outputs], counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["off", "ngram", "draft"], choices=METHODS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--batch1-prompts", type=int, default=4, help="prompts of each task run one at a time")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine", default='{"dtype": "float32", "quantization": "none"}',
                   help="LLM keyword arguments as JSON (default: the float32 target)")
    p.add_argument("--output-json", default="results/speculative.json")
    args = p.parse_args()
    engine = {"kv_cache_memory": "1GiB", "max_model_len": 2048, **json.loads(args.engine)}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    llms = {m: LLM(speculative_config=METHODS[m], **engine) for m in args.methods}
    results: dict[str, dict] = {}
    for task, prompts in TASKS.items():
        for batch in args.batch_sizes:
            chosen = prompts[:args.batch1_prompts] if batch == 1 else prompts[:batch]
            key = f"{task} batch {batch}"
            results[key] = {m: {"rates": []} for m in args.methods}
            for m, llm in llms.items():
                run(llm, chosen[:1], 1, SamplingParams(temperature=0, max_tokens=8))  # warm up
            for repeat in range(args.repeats):
                for m, llm in llms.items():  # interleaved, so drifts in machine load hit every method alike
                    rate, tokens, counts = run(llm, chosen, batch, params)
                    entry = results[key][m]
                    entry["rates"].append(rate)
                    entry.update(counts, tokens=tokens)
                    print(f"[{key}] {m} run {repeat + 1}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
            for m in args.methods:
                entry = results[key][m]
                entry["median"] = statistics.median(entry["rates"])
                entry["same_greedy_output"] = entry["tokens"] == results[key][args.methods[0]]["tokens"]
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "engine": engine, "results": results}, indent=2))
    base = args.methods[0]
    head = " | ".join(f"{m} tok/s" + ("" if m == base else f" (x {base})") for m in args.methods)
    print(f"decode tokens/s, median of {args.repeats}; acceptance = draft tokens kept / verified")
    print(f"| task | {head} | acceptance | same greedy output |")
    print("|---|" + "---:|" * len(args.methods) + "---|---|")
    for key, by_method in results.items():
        cells = []
        for m in args.methods:
            r = by_method[m]
            ratio = "" if m == base else f" ({r['median'] / by_method[base]['median']:.2f}x)"
            cells.append(f"{r['median']:.1f}{ratio}")
        acceptance = ", ".join(f"{m} {r['accepted_tokens'] / r['draft_tokens']:.0%}" for m, r in by_method.items()
                               if r.get("draft_tokens"))
        same = all(r["same_greedy_output"] for r in by_method.values())
        print(f"| {key} | {' | '.join(cells)} | {acceptance or '-'} | {'yes' if same else 'NO'} |")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

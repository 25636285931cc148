"""What structured outputs cost inside tokenmill's decode step, on the default model.

    python benchmarks/structured_outputs.py [--repeats 3] [--batches 1,32] [--output results/structured_outputs.json]

For each batch size, one request with n = batch samples (temperature 0.8, engine seed 0) runs to
the end twice: constrained by a 20-field JSON schema, and unconstrained with the same number of
steps (ignore_eos, max_tokens = the constrained run's longest answer). Timed inside the
constrained run, on the step's critical path: the wait for llguidance's bitmasks (computed in a
worker thread while the model runs), the mask applied to the logits (`_mask_by_bitmask`) and the
matchers' token updates (`GrammarState.advance`); their sum per step is given against the whole
step, the issue's goal being < 5%. Also the grammar's compile
time (median of 20). benchmarks/grammar_backends.py compares llguidance with xgrammar outside
the engine. Medians over --repeats; run it on a quiet machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.executor import runner as runner_module
from tokenmill.executor import sampler as sampler_module
from tokenmill.grammar import GrammarState

SCHEMA = {  # 20 fields: strings with bounds and patterns, enums, bounded numbers, booleans, an array, a nested object
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "name": {"type": "string", "maxLength": 24},
        "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "country": {"type": "string", "maxLength": 16},
        "city": {"type": "string", "maxLength": 16},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"},
        "verified": {"type": "boolean"},
        "plan": {"enum": ["free", "pro", "team"]},
        "seats": {"type": "integer", "minimum": 1, "maximum": 50},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 20},
                                                     "number": {"type": "integer", "minimum": 1, "maximum": 999}},
                    "required": ["street", "number"]},
        "created": {"type": "string", "pattern": "^2026-[01][0-9]-[0-3][0-9]$"},
        "language": {"enum": ["en", "fr", "de", "es"]},
        "newsletter": {"type": "boolean"},
        "notes": {"type": "string", "maxLength": 20},
    },
    "required": ["id", "name", "email", "role", "active", "score", "age", "country", "city", "zip", "phone",
                 "verified", "plan", "seats", "tags", "address", "created", "language", "newsletter", "notes"],
}
PROMPT = "<|im_start|>user\nDescribe one customer account as JSON.<|im_end|>\n<|im_start|>assistant\n"


class Timers:
    """Seconds spent in the wrapped functions while installed."""

    def __init__(self):
        self.seconds = {"mask_wait": 0.0, "apply_mask": 0.0, "advance": 0.0}
        self._saved = []

    def _wrap(self, owner, name: str, key: str) -> None:
        inner = getattr(owner, name)
        if name == "_mask_pool":  # time the wait for the masks, not the worker thread's work
            self._saved.append((owner, name, inner))
            setattr(owner, name, _TimedPool(inner, self.seconds, key))
            return

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - started

        self._saved.append((owner, name, inner))
        setattr(owner, name, timed)

    def __enter__(self):
        self._wrap(runner_module, "_mask_pool", "mask_wait")
        self._wrap(sampler_module, "_mask_by_bitmask", "apply_mask")
        self._wrap(GrammarState, "advance", "advance")
        return self

    def __exit__(self, *exc):
        for owner, name, inner in self._saved:
            setattr(owner, name, inner)


class _TimedPool:
    """The runner's mask pool, whose futures add the time spent waiting on them to `seconds[key]`."""

    def __init__(self, pool, seconds: dict, key: str):
        self.pool, self.seconds, self.key = pool, seconds, key

    def submit(self, *args):
        future, seconds, key = self.pool.submit(*args), self.seconds, self.key

        class Timed:
            def result(self):
                started = time.perf_counter()
                try:
                    return future.result()
                finally:
                    seconds[key] += time.perf_counter() - started
        return Timed()


def run(llm: LLM, params: SamplingParams) -> tuple[float, int, int]:
    """Seconds, engine steps and the longest answer of one request."""
    engine = llm.engine
    engine.add_request("bench", PROMPT, params)
    steps, started, out = 0, time.perf_counter(), None
    while engine.has_unfinished_requests():
        out = engine.step() or out
        steps += 1
    seconds = time.perf_counter() - started
    return seconds, steps, max(len(o.token_ids) for o in out[0].outputs)


def measure(llm: LLM, batch: int) -> dict:
    spec = StructuredOutputsParams(json=SCHEMA)
    with Timers() as timers:
        seconds, steps, longest = run(llm, SamplingParams(n=batch, temperature=0.8, max_tokens=400,
                                                          structured_outputs=spec))
    plain_seconds, plain_steps, _ = run(llm, SamplingParams(n=batch, temperature=0.8, max_tokens=longest,
                                                            ignore_eos=True))
    grammar_ms = {key: 1000 * s / steps for key, s in timers.seconds.items()}
    step_ms = 1000 * seconds / steps
    return {"batch": batch, "steps": steps, "step_ms": step_ms, "plain_step_ms": 1000 * plain_seconds / plain_steps,
            "grammar_ms_per_step": grammar_ms, "grammar_share": sum(grammar_ms.values()) / step_ms}


def compile_ms(llm: LLM) -> float:
    engine = llm.engine
    spec = StructuredOutputsParams(json=SCHEMA)
    engine._grammar(spec)  # the compiler (llguidance's view of the vocabulary) is built once, before timing
    times = []
    for _ in range(20):
        started = time.perf_counter()
        engine._grammar_compiler.state(engine._grammar(spec))
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--output", default="results/structured_outputs.json")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    llm = LLM(seed=0)
    result = {"compile_20_fields_ms": compile_ms(llm), "batches": []}
    print(f"compile of the 20-field schema (to a ready matcher): {result['compile_20_fields_ms']:.2f} ms")
    print("| batch | steps | step ms (constrained) | step ms (plain) | mask wait ms | apply ms | advance ms | share of step |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        runs = [measure(llm, batch) for _ in range(args.repeats)]
        med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
        row = {"batch": batch, "steps": med(lambda r: r["steps"]), "step_ms": med(lambda r: r["step_ms"]),
               "plain_step_ms": med(lambda r: r["plain_step_ms"]),
               "grammar_ms_per_step": {k: med(lambda r: r["grammar_ms_per_step"][k]) for k in runs[0]["grammar_ms_per_step"]},
               "grammar_share": med(lambda r: r["grammar_share"]), "runs": runs}
        result["batches"].append(row)
        g = row["grammar_ms_per_step"]
        print(f"| {batch} | {row['steps']:.0f} | {row['step_ms']:.2f} | {row['plain_step_ms']:.2f} | "
              f"{g['mask_wait']:.3f} | {g['apply_mask']:.3f} | {g['advance']:.3f} | {100 * row['grammar_share']:.1f}% |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""tokenmill's side of the offline benchmarks: an `LLMEngine` driven step by step, timed.

Each prompt runs to exactly its output length (greedy, EOS ignored); throughput runs start
from an empty prefix cache so that repeats never measure cache hits. The accountant's report
over the measured steps (J/token, $/1M tokens, roofline fractions) goes with the result.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Callable, Sequence

from tokenmill.bench.prompts import check_fits
from tokenmill.bench.results import DecodeResult, ThroughputResult, repeat
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import InvalidParameterError, TokenmillError
from tokenmill.metering import calibrate
from tokenmill.sampling_params import SamplingParams

_request_ids = itertools.count()


def ensure_roofline(engine: LLMEngine, log: Callable[[str], None] = lambda msg: None) -> None:
    """Turn on roofline fractions: the cached `tokenmill calibrate` result, or a measurement made now."""
    if engine.roofline is None:
        log("measuring this machine's roofline once (`tokenmill calibrate`; cached)")
        engine.roofline = calibrate.roofline_for(calibrate.load_or_measure(engine.device), engine.dtype)


def generate_exact(engine: LLMEngine, prompts: Sequence[list[int]], output_lens: Sequence[int]) -> int:
    """Run every prompt to exactly its output length, greedy, all in one batch; the tokens generated."""
    ids = [f"bench-{next(_request_ids)}" for _ in prompts]
    produced: dict[str, int] = {}
    try:
        for request_id, prompt, n in zip(ids, prompts, output_lens):
            engine.add_request(request_id, list(prompt), SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        while len(produced) < len(ids):
            for out in engine.step():
                if out.finished:
                    produced[out.request_id] = len(out.outputs[0].token_ids)
            failed = {rid: why for rid, why in engine.pop_failed().items() if rid in ids}
            if failed:
                rid, error = next(iter(failed.items()))
                raise TokenmillError(f"prompt {ids.index(rid)} failed the engine step: {type(error).__name__}: {error}")
    finally:
        for request_id in ids:
            if request_id not in produced:
                engine.abort_request(request_id)
    return sum(produced.values())


def _timed_run(engine: LLMEngine, prompts: Sequence[list[int]], output_lens: Sequence[int]) -> tuple[float, int]:
    start = time.perf_counter()
    produced = generate_exact(engine, prompts, output_lens)
    return time.perf_counter() - start, produced


def measure_tokenmill(engine: LLMEngine, prompts: Sequence[list[int]], output_lens: Sequence[int], repeats: int = 3,
                      warmup: bool = True) -> ThroughputResult:
    """Run all prompts through `engine` `repeats` times; median wall time."""
    check_fits(prompts, output_lens, engine.max_model_len)
    if warmup:
        _timed_run(engine, [prompts[0][:8]], [2])
    # The accountant's per-phase totals (steps, wall time, Joules, roofline time) are not in
    # engine.stats(), which carries only running totals and fractions: the report reads them.
    accountant = engine.accountant
    since = accountant.snapshot()
    produced: list[int] = []

    def once() -> float:
        engine.reset_prefix_cache()  # every run computes every prompt: repeats must not measure cache hits
        elapsed, n = _timed_run(engine, prompts, output_lens)
        produced.append(n)
        return elapsed

    runs = repeat(once, repeats)
    expected = sum(output_lens)
    if any(n != expected for n in produced):
        raise TokenmillError(f"tokenmill produced {produced} output tokens, expected {expected} per run")
    input_tokens = sum(map(len, prompts))
    energy = accountant.report(since, input_tokens, expected, len(runs))
    return ThroughputResult("tokenmill", len(prompts), input_tokens, expected, statistics.median(runs), runs,
                            {"energy": energy})


def measure_tokenmill_decode(engine: LLMEngine, prompt: list[int], new_tokens: int = 128,
                             repeats: int = 3) -> DecodeResult:
    """Batch-1 decode tokens/s: one request, timed step by step from its first token to its last."""
    check_fits([prompt], [new_tokens], engine.max_model_len)
    if new_tokens < 2:
        raise InvalidParameterError("new_tokens", "batch-1 decode needs at least 2 new tokens")
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    _timed_run(engine, [prompt[:8]], [2])  # warm-up
    ttfts: list[float] = []

    def once() -> float:
        request_id = f"bench-decode-{next(_request_ids)}"
        engine.reset_prefix_cache()  # the TTFT of each run includes the whole prefill
        start = time.perf_counter()
        engine.add_request(request_id, list(prompt), params)
        first = last = None
        n = 0
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id != request_id:
                        continue
                    now = time.perf_counter()
                    n = len(out.outputs[0].token_ids)
                    if first is None:
                        first = now
                    last = now
        finally:
            engine.abort_request(request_id)
        if n != new_tokens or first is None or last == first:
            raise TokenmillError(f"batch-1 decode produced {n} tokens, expected {new_tokens}")
        ttfts.append(first - start)
        return (n - 1) / (last - first)

    runs = repeat(once, repeats)
    return DecodeResult("tokenmill", len(prompt), new_tokens, statistics.median(runs), runs, statistics.median(ttfts))

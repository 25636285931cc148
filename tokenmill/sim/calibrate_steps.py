"""`tokenmill calibrate --steps`: time real engine steps over a grid of shapes and fit the cost model.

For each (decode batch, context length) of the grid, that many requests of random prompts
are prefilled (those steps are timed too) and then decoded for a few steps, and one more prompt
is prefilled beside the decoding batch, so the fit sees pure prefills, pure decodes and mixed
steps. Then each batch decodes again over one shared, cached prefix, so that reading a block
once for many sequences is told apart from reading one per sequence. Each step's shape and
wall time come from `LLMEngine.stats()`. The fitted model is stored with the machine's
calibration (tokenmill/metering/calibrate.py), one per model form.
"""

from __future__ import annotations

from typing import Callable

from pathlib import Path

import numpy as np
import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.loader.checkpoint import DEFAULT_MODEL_NAME
from tokenmill.metering import calibrate
from tokenmill.sampling_params import SamplingParams
from tokenmill.sim.cost_model import LinearStepCost, fit_linear, from_dict
from tokenmill.step_plan import StepShape


BATCHES = (1, 2, 4, 8, 16, 32)
CONTEXTS = (64, 256, 1024)
SHARED_CONTEXT = 1024  # the prefix the batches decode over together
DECODE_STEPS = 6
WARMUP_STEPS = 3  # the first steps pay one-time costs (allocations, kernel selection)


def engine_label(config: EngineConfig) -> str:
    """What a step-cost model is valid for: the model and the form options it runs with (as given, so
    `tokenmill simulate` finds the model of the same flags without loading anything)."""
    source = config.model.source
    name = Path(str(source)).name if source is not None else DEFAULT_MODEL_NAME
    quant = config.quantization
    return (f"{name}|dtype {config.model.dtype}|quantization {quant.method} g{quant.group_size}"
            f"|kv {config.cache.kv_cache_dtype}")


def time_steps(engine: LLMEngine, batches=BATCHES, contexts=CONTEXTS, prefill_len: int = 128,
               say: Callable[[str], None] = lambda msg: None) -> list[tuple[StepShape, float]]:
    """(shape, seconds) of every step the grid makes the engine run."""
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    samples: list[tuple[StepShape, float]] = []
    ids = iter(range(10**9))
    limit = engine.max_model_len - DECODE_STEPS - 2

    def prompt(length: int) -> list[int]:
        return rng.integers(0, vocab, size=min(length, limit)).tolist()

    def record() -> object:
        engine.step()
        stats = engine.stats()
        samples.append((stats.last_step, stats.last_step_seconds))
        return stats

    def prefill() -> None:
        """Step until every request decodes (a step of one token per sequence, none waiting)."""
        while True:
            stats = record()
            if not stats.num_waiting and stats.last_step.num_tokens == stats.last_step.num_seqs:
                return

    def batch(prompts: list[list[int]]) -> list[str]:
        names = [f"calibrate-{next(ids)}" for _ in prompts]
        for name, ids_ in zip(names, prompts):
            engine.add_request(name, ids_, params)
        return names

    params = SamplingParams(temperature=0, max_tokens=DECODE_STEPS + 8, ignore_eos=True)
    warm = batch([prompt(32), prompt(32)])
    for _ in range(WARMUP_STEPS):
        engine.step()
    for name in warm:
        engine.abort_request(name)
    for size in batches:
        if size > engine.scheduler.max_num_seqs - 1:
            continue
        for context in contexts:
            if size * (context + DECODE_STEPS + 8) + prefill_len > engine.block_pool.num_usable_blocks * engine.kv_cache.block_size:
                continue
            say(f"decode batch {size}, context {context}")
            names = batch([prompt(context) for _ in range(size)])
            prefill()
            for _ in range(DECODE_STEPS):
                record()
            names += batch([prompt(prefill_len)])  # a prompt beside the decodes
            record()
            for name in names:
                engine.abort_request(name)
    capacity = engine.block_pool.num_usable_blocks * engine.kv_cache.block_size
    shared = prompt(SHARED_CONTEXT)[:limit - 16]
    for size in batches:
        if not 1 < size < engine.scheduler.max_num_seqs or len(shared) < 2 * engine.kv_cache.block_size \
                or len(shared) + size * (32 + DECODE_STEPS + 8) > capacity:
            continue
        say(f"decode batch {size} over one shared {len(shared)}-token prefix")
        names = batch([shared + prompt(16)])
        prefill()  # cached now: the others take its blocks
        names += batch([shared + prompt(16) for _ in range(size - 1)])
        prefill()
        for _ in range(DECODE_STEPS):
            record()
        for name in names:
            engine.abort_request(name)
    return samples


def measure(engine: LLMEngine, **grid) -> tuple[LinearStepCost, dict]:
    """The fitted model and how well it fits (relative errors of the timed steps). Its busy power is
    what the engine's energy meter read over the timed steps; idle power, the estimator's floor."""
    joules = engine.stats().energy_joules
    samples = time_steps(engine, **grid)
    shapes, seconds = [s for s, _ in samples], [t for _, t in samples]
    busy_watts = (engine.stats().energy_joules - joules) / sum(seconds)
    model = fit_linear(shapes, seconds, busy_watts=busy_watts, idle_watts=engine.config.metering.idle_watts,
                       source="measured", label=engine_label(engine.config))
    errors = np.abs(np.array([model.shape_seconds(s) for s in shapes]) / np.array(seconds) - 1)
    fit = {"steps": len(samples), "median_error": float(np.median(errors)), "p90_error": float(np.percentile(errors, 90))}
    return model, fit


def save(engine: LLMEngine, model: LinearStepCost, fit: dict):
    """Store the model in this machine's calibration entry (measured bandwidth and peaks, if any, kept);
    the file's path, or None when the cache is disabled."""
    entry = calibrate.load(engine.device) or {"key": calibrate.machine_key(engine.device)}
    entry.setdefault("step_costs", {})[model.label] = {**model.to_dict(), "fit": fit}
    return calibrate.save(entry)


def load(config: EngineConfig, device: torch.device) -> LinearStepCost | None:
    """The stored step-cost model of an engine of `config` on `device`, or None."""
    data = ((calibrate.load(device) or {}).get("step_costs") or {}).get(engine_label(config))
    if data is None:
        return None
    return from_dict({k: v for k, v in data.items() if k != "fit"})

"""`tokenmill calibrate --steps`: time real engine steps over a grid of shapes and fit the cost model.

For each (decode batch, context length) of the grid, that many requests of random prompts
are prefilled (those steps are timed too) and then decoded for a few steps, and one more prompt
is prefilled beside the decoding batch, so the fit sees pure prefills, pure decodes and mixed
steps. Each step's shape and wall time come from `LLMEngine.stats()`. The fitted model is
stored with the machine's calibration (tokenmill/metering/calibrate.py), one per model form.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from tokenmill.engine.engine import LLMEngine
from tokenmill.metering import calibrate
from tokenmill.sampling_params import SamplingParams
from tokenmill.sim.cost_model import LinearStepCost, fit_linear, from_dict
from tokenmill.step_plan import StepShape

log = logging.getLogger("tokenmill")

BATCHES = (1, 2, 4, 8, 16, 32)
CONTEXTS = (64, 256, 1024)
DECODE_STEPS = 6
WARMUP_STEPS = 3  # the first steps pay one-time costs (allocations, kernel selection)


def engine_label(engine: LLMEngine) -> str:
    """What a step-cost model is valid for: the model and the form it runs in."""
    report = engine.memory_report
    return f"{engine.model_name}|weights {report.weights}|kv {report.kv_cache_dtype}"


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
    return samples


def measure(engine: LLMEngine, busy_watts: float = 0.0, idle_watts: float = 0.0, **grid) -> tuple[LinearStepCost, dict]:
    """The fitted model and how well it fits (relative errors of the timed steps)."""
    samples = time_steps(engine, **grid)
    shapes, seconds = [s for s, _ in samples], [t for _, t in samples]
    model = fit_linear(shapes, seconds, busy_watts=busy_watts, idle_watts=idle_watts, source="measured",
                       label=engine_label(engine))
    errors = np.abs(np.array([model.shape_seconds(s) for s in shapes]) / np.array(seconds) - 1)
    fit = {"steps": len(samples), "median_error": float(np.median(errors)), "p90_error": float(np.percentile(errors, 90))}
    return model, fit


def save(engine: LLMEngine, model: LinearStepCost, fit: dict) -> None:
    """Store the model in this machine's calibration entry (measured bandwidth and peaks, if any, kept)."""
    entry = calibrate.load(engine.device) or {"key": calibrate.machine_key(engine.device)}
    entry.setdefault("step_costs", {})[engine_label(engine)] = {**model.to_dict(), "fit": fit}
    calibrate.save(entry)


def load(engine_or_label, device=None) -> LinearStepCost | None:
    """The stored step-cost model of an engine (or of a label on `device`), or None."""
    if isinstance(engine_or_label, LLMEngine):
        label, device = engine_label(engine_or_label), engine_or_label.device
    else:
        label = engine_or_label
    entry = calibrate.load(device) or {}
    data = entry.get("step_costs", {}).get(label)
    if data is None:
        return None
    data = {k: v for k, v in data.items() if k != "fit"}
    return from_dict(data)

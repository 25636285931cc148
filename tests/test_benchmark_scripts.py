"""Benchmark code that reaches into the engine's internals (so a refactor can break it unnoticed), run briefly."""

import importlib.util
from pathlib import Path

from tokenmill import LLM

REPO = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quant_speed_profile_breaks_a_decode_step_down():
    quant_speed = _script("quant_speed")
    llm = LLM()  # the default form
    profile = quant_speed.profile_decode(llm, list(range(1000, 1032)), steps=4)
    assert profile["step_ms"] > 0 and profile["model_ms"] > 0 and profile["logits_ms"] > 0
    assert profile["forward_ms"] >= profile["model_ms"]  # the runner's forward wraps the model's
    assert not llm.engine.has_unfinished_requests()  # the profiled request was ended
    assert llm.engine.block_pool.num_free_blocks == llm.engine.block_pool.num_usable_blocks

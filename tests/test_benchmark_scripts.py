"""Benchmark code that reaches into the engine's internals (so a refactor can break it unnoticed), run briefly."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

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


def test_quant_speed_prints_fractions_at_the_stored_and_this_runs_bandwidth(tmp_path, capsys):
    quant_speed = _script("quant_speed")
    out = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    try:
        assert quant_speed.main(["--smoke", "--configs", "auto", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # main sets its --threads for the whole process
    result = json.loads(out.read_text())
    before, after = result["run_bandwidth_bytes_per_s"]
    assert before > 0 and after > 0
    row = result["tokenmill"]["auto"]
    # the same decode speed over two bandwidths: the fractions scale inversely
    assert row["run_roofline_fraction"] * (before + after) / 2 == \
        pytest.approx(row["roofline_fraction"] * result["bandwidth_bytes_per_s"])
    table = capsys.readouterr().out
    assert "this run's, before and after" in table
    assert f"| {quant_speed._fractions(row)} |" in table

"""Roofline arithmetic against hand-computed numbers, and the calibration cache."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from tokenmill.config import ModelConfig
from tokenmill.metering import calibrate
from tokenmill.metering.roofline import ModelBytes, Roofline, head_params, layer_params, step_work

# The tiny Llama: hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads, vocab 256.
CFG = ModelConfig.from_hf(tiny_config("llama"))
LAYER = 2 * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128)  # q,o: 64x64; k,v: 64x32; gate, up, down
HEAD = 64 * 256
KV_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head_dim 16, float32


def test_parameter_counts():
    assert layer_params(CFG) == LAYER == 2 * (12288 + 24576)
    assert head_params(CFG) == HEAD
    assert CFG.kv_bytes_per_token(torch.float32) == KV_PER_TOKEN


def test_decode_step_of_two_sequences():
    # two decodes at positions 10 and 20: contexts of 11 and 21 keys
    work = step_work(CFG, ModelBytes.dense(CFG, torch.float32), [(10, 1), (20, 1)], num_sampled=2)
    attention = 4 * 2 * 4 * 16 * (11 + 21)
    assert work.flops == 2 * LAYER * 2 + 2 * HEAD * 2 + attention
    assert work.bytes == (LAYER + HEAD) * 4 + (11 + 1 + 21 + 1) * KV_PER_TOKEN


def test_prefill_chunk_that_does_not_sample():
    # 4 new tokens after 8 cached ones: contexts 9, 10, 11, 12; no output head
    work = step_work(CFG, ModelBytes.dense(CFG, torch.bfloat16), [(8, 4)], num_sampled=0)
    assert work.flops == 2 * LAYER * 4 + 4 * 2 * 4 * 16 * (9 + 10 + 11 + 12)
    assert work.bytes == LAYER * 2 + (8 + 2 * 4) * CFG.kv_bytes_per_token(torch.bfloat16)


def test_roofline_time_is_the_slower_bound():
    roof = Roofline(bandwidth=1e9, peak_flops=1e10)
    work = step_work(CFG, ModelBytes.dense(CFG, torch.float32), [(10, 1), (20, 1)], num_sampled=2)
    assert roof.time(work) == pytest.approx(max(work.bytes / 1e9, work.flops / 1e10))
    assert roof.time(work) == pytest.approx(work.bytes / 1e9)  # a decode step is memory-bound


def test_calibration_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    assert calibrate.load(cpu) is None
    entry = calibrate.measure(cpu, mem_bytes=2**20, matmul_n=64, repeats=1)
    assert entry["bandwidth_bytes_per_s"] > 0 and entry["peak_flops"]["float32"] > 0
    calibrate.save(entry)
    assert calibrate.load(cpu) == entry
    assert json.loads((tmp_path / "calibration.json").read_text())[calibrate.machine_key(cpu)] == entry
    roof = calibrate.roofline_for(entry, torch.float16)  # not calibrated: float32's peak
    assert roof.peak_flops == entry["peak_flops"]["float32"]


def test_calibrate_command_saves_the_cache(tmp_path, monkeypatch, capsys):
    from tokenmill.entrypoints.cli import main

    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path))
    small = calibrate.measure
    monkeypatch.setattr(calibrate, "measure", lambda device: small(device, mem_bytes=2**20, matmul_n=64, repeats=1))
    monkeypatch.setattr(calibrate, "others_busy_percent", lambda: 0.0)  # a quiet machine
    assert main(["calibrate", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "memory bandwidth" in out and "matmul float32" in out
    assert calibrate.load(torch.device("cpu"))["peak_flops"]["float32"] > 0


def test_a_calibration_taken_on_a_busy_machine_is_not_cached(tmp_path, monkeypatch, capsys):
    from tokenmill.entrypoints.cli import main

    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path))
    small = calibrate.measure
    monkeypatch.setattr(calibrate, "measure", lambda device: small(device, mem_bytes=2**20, matmul_n=64, repeats=1))
    monkeypatch.setattr(calibrate, "others_busy_percent", lambda: 90.0)  # another process keeps the CPUs busy
    assert main(["calibrate", "--device", "cpu"]) == 1
    assert "not saved" in capsys.readouterr().err
    assert calibrate.load(torch.device("cpu")) is None
    entry = calibrate.load_or_measure(torch.device("cpu"))  # the engine's path: used once, not cached
    assert entry["others_busy_percent"] == 90.0 and calibrate.load(torch.device("cpu")) is None


def test_others_busy_percent_is_a_share_of_the_cpus():
    assert 0.0 <= calibrate.others_busy_percent(interval=0.1) <= 100.0

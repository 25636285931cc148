"""Energy meters against fake counters, and per-request attribution in a real (tiny) engine."""

from __future__ import annotations

import builtins
import math

import torch

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.engine import LLMEngine
from tokenmill.config import EnergyConfig
from tokenmill.metering import EstimatedMeter, MeterUnavailable, NvmlMeter, RaplMeter, make_meter
from tokenmill.metering.accounting import StepAccountant
from tokenmill.metering.meters import EnergyMeter
from tokenmill.metering.roofline import Roofline, step_work

# ---- RAPL -------------------------------------------------------------------------------------


def rapl_zone(root, name, label, energy_uj, max_uj=1_000_000):
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


@pytest.fixture
def powercap(tmp_path):
    rapl_zone(tmp_path, "intel-rapl:0", "package-0", 100)
    rapl_zone(tmp_path, "intel-rapl:0/intel-rapl:0:0", "core", 50)  # inside the package: not counted
    rapl_zone(tmp_path, "intel-rapl:0/intel-rapl:0:1", "dram", 10)
    rapl_zone(tmp_path, "intel-rapl:1", "package-1", 200)
    return tmp_path


def set_uj(zone, value):
    (zone / "energy_uj").write_text(f"{value}\n")


def test_rapl_sums_packages_and_dram(powercap):
    meter = RaplMeter(powercap)
    assert [d.name for d in meter.domains] == ["intel-rapl:0", "intel-rapl:1", "intel-rapl:0:1"]
    assert meter.read() == 0.0 and meter.name == "rapl" and not meter.estimated
    set_uj(powercap / "intel-rapl:0", 1_000_100)  # +1 J
    set_uj(powercap / "intel-rapl:0/intel-rapl:0:0", 999_999)  # core: ignored
    set_uj(powercap / "intel-rapl:0/intel-rapl:0:1", 500_010)  # +0.5 J
    set_uj(powercap / "intel-rapl:1", 250_200)  # +0.25 J
    assert meter.read() == pytest.approx(1.75)


def test_rapl_undoes_wrap_around(powercap):
    pkg = powercap / "intel-rapl:0"
    (pkg / "max_energy_range_uj").write_text("2000000\n")
    meter = RaplMeter(powercap)
    set_uj(pkg, 1_999_100)  # +1.999 J
    assert meter.read() == pytest.approx(1.999)
    set_uj(pkg, 400)  # wrapped at 2 J: +0.0013 J
    assert meter.read() == pytest.approx(1.999 + 0.0013)


def test_rapl_unreadable_falls_back_to_the_estimator(powercap, tmp_path):
    pkg = powercap / "intel-rapl:1"
    (pkg / "energy_uj").unlink()
    (pkg / "energy_uj").mkdir()  # reading it fails as a root-only file would for a user
    with pytest.raises(MeterUnavailable):
        RaplMeter(powercap)

    def denied(path, *a, **kw):
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *a, **kw)

    (pkg / "energy_uj").rmdir()
    set_uj(pkg, 1)
    RaplMeter(powercap)  # readable again
    with pytest.raises(MeterUnavailable, match="Permission denied"):
        RaplMeter(powercap, opener=denied)
    meter = make_meter("auto", rapl_root=tmp_path / "absent")
    assert meter.estimated and meter.name == "estimated(cpu-time)"
    with pytest.raises(MeterUnavailable):
        make_meter("rapl", rapl_root=tmp_path / "absent")


# ---- NVML -------------------------------------------------------------------------------------


class FakeNvml:
    """The pynvml calls NvmlMeter makes, over two devices whose mJ counters tests set."""

    def __init__(self, mj):
        self.mj = list(mj)

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.mj)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return self.mj[handle]


def test_nvml_reads_each_device():
    nvml = FakeNvml([5_000_000, 7_000_000])
    meter = NvmlMeter(nvml)
    assert meter.read() == 0.0 and meter.name == "nvml" and not meter.estimated
    nvml.mj = [5_001_500, 7_000_250]
    assert meter.readings() == [5001.5, 7000.25]
    assert meter.read() == pytest.approx(1.75)


def test_auto_picks_the_counters_it_can_read(powercap):
    assert make_meter("auto", rapl_root=powercap).name == "rapl"
    both = make_meter("auto", cuda=True, rapl_root=powercap, nvml=FakeNvml([1000]))
    assert both.name == "rapl+nvml" and not both.estimated
    assert make_meter("auto", rapl_root=powercap, nvml=FakeNvml([1000])).name == "rapl"  # no CUDA: no GPU meter


def test_nvml_unavailable():
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    with pytest.raises(MeterUnavailable, match="Shared Library"):
        NvmlMeter(Broken([1]))
    with pytest.raises(MeterUnavailable):
        NvmlMeter(FakeNvml([]))


# ---- the estimator ----------------------------------------------------------------------------


def test_estimator_power_model():
    clock, cpu = [100.0], [3.0]
    meter = EstimatedMeter(cpu_watts_per_core=12.0, idle_watts=40.0, clock=lambda: clock[0], cpu_time=lambda: cpu[0])
    clock[0], cpu[0] = 102.0, 6.0  # 2 s of wall time, 3 s of CPU time (two busy cores)
    assert meter.read() == pytest.approx(12.0 * 3 + 40.0 * 2)
    assert meter.estimated and meter.name == "estimated(cpu-time)"
    gpu = EstimatedMeter(0.0, 0.0, gpu_utilization=lambda: 0.5, gpu_watts=300.0, clock=lambda: clock[0],
                         cpu_time=lambda: 0.0)
    clock[0] += 4.0
    assert gpu.read() == pytest.approx(0.5 * 300.0 * 4) and gpu.name == "estimated(cpu-time+gpu-util)"


def test_unknown_meter_is_refused():
    with pytest.raises(ValueError, match="energy_meter"):
        make_meter("wattmeter")
    assert make_meter("none") is None


# ---- attribution in a real engine -------------------------------------------------------------


class SteppingMeter(EnergyMeter):
    """Every step (two reads, before and after) costs exactly `per_step` Joules."""

    name = "fake"

    def __init__(self, per_step: float):
        self.per_step, self.reads = per_step, 0

    def read(self) -> float:
        self.reads += 1
        return (self.reads // 2) * self.per_step


@pytest.fixture
def llm(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="4MiB", energy_meter="none",
              price_per_hour=3.6, energy_price=0.36)
    llm.engine.accountant.meter = SteppingMeter(2.5)
    llm.engine.roofline = Roofline(bandwidth=1e9, peak_flops=1e10)
    return llm


def greedy(n_tokens, **kw):
    return SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True, **kw)


def test_a_request_alone_gets_all_of_each_steps_energy(llm):
    out = llm.generate([[5, 6, 7, 8]], greedy(6), use_tqdm=False)[0]
    m = out.metrics
    steps = 6  # one prefill step that samples, then five decodes
    assert m.energy_joules == pytest.approx(2.5 * steps)
    assert out.energy_per_output_token == pytest.approx(2.5)
    assert m.energy_meter == "fake" and m.energy_estimated is False
    acc = llm.engine.accountant
    assert acc.total_joules == pytest.approx(m.energy_joules)
    assert m.compute_time == pytest.approx(acc.total_wall_s)
    # 3.6 $/h is 0.001 $/s; 0.36 $/kWh is 1e-7 $/J
    assert m.cost_usd == pytest.approx(m.compute_time * 0.001 + m.energy_joules * 1e-7)
    cfg, sizes = llm.engine.model_config, acc.sizes
    ideal = Roofline(1e9, 1e10).time(step_work(cfg, sizes, [(0, 4)], 1)) + sum(
        Roofline(1e9, 1e10).time(step_work(cfg, sizes, [(p, 1)], 1)) for p in range(4, 9))
    assert m.idealized_time == pytest.approx(ideal)
    assert acc.phases["prefill"].steps == 1 and acc.phases["decode"].steps == 5
    assert acc.phases["decode"].fraction == pytest.approx(acc.phases["decode"].roofline_s / acc.phases["decode"].wall_s)


def test_the_split_adds_up_to_the_total(llm):
    prompts = [[3] * 5, [4] * 17, [9] * 2]
    params = [greedy(3), greedy(9), greedy(5, n=2)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    acc = llm.engine.accountant
    assert math.fsum(o.metrics.energy_joules for o in outs) == pytest.approx(acc.total_joules, rel=1e-12)
    assert acc.total_joules == pytest.approx(2.5 * (acc.phases["prefill"].steps + acc.phases["decode"].steps))
    assert math.fsum(o.metrics.compute_time for o in outs) == pytest.approx(acc.total_wall_s, rel=1e-12)
    ideal = acc.phases["prefill"].roofline_s + acc.phases["decode"].roofline_s
    assert math.fsum(o.metrics.idealized_time for o in outs) == pytest.approx(ideal, rel=1e-12)
    # the longer prompt computed more tokens in the shared steps, so it carries more energy
    assert outs[1].metrics.energy_joules > outs[0].metrics.energy_joules


def test_token_weighted_split_of_one_step():
    """Two chunks in one step, 3 and 1 tokens: 3/4 and 1/4 of the step's energy, time and cost."""
    from types import SimpleNamespace

    from tokenmill.outputs import RequestMetrics

    acc = StepAccountant(SteppingMeter(8.0), EnergyConfig(price_per_hour=36.0), None, None)
    seq = SimpleNamespace(num_prompt_tokens=3)
    chunks = [SimpleNamespace(start=0, num_tokens=3, sample=True, seq=seq),
              SimpleNamespace(start=5, num_tokens=1, sample=True, seq=seq)]
    metrics = [RequestMetrics(0.0), RequestMetrics(0.0)]
    acc.start()
    acc.end(chunks, metrics)
    assert [m.energy_joules for m in metrics] == [6.0, 2.0]
    assert metrics[0].compute_time == pytest.approx(3 * metrics[1].compute_time)
    assert metrics[0].cost_usd == pytest.approx(metrics[0].compute_time * 0.01)
    assert metrics[0].idealized_time is None  # no calibration, no roofline


def test_estimator_is_labelled_in_offline_metrics(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="4MiB", energy_meter="estimate")
    out = llm.generate([[5, 6, 7]], greedy(3), use_tqdm=False)[0]
    assert out.metrics.energy_estimated is True
    assert out.metrics.energy_meter.startswith("estimated")
    assert out.metrics.energy_joules >= 0 and out.metrics.cost_usd is None


# ---- the server -------------------------------------------------------------------------------


@pytest.mark.slow
def test_server_reports_estimated_energy_in_usage_and_metrics(tiny_chat_model, tmp_path, monkeypatch):
    import json
    import urllib.request

    import openai
    import torch

    from server_process import ServerProcess
    from tokenmill.metering import calibrate

    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path))  # the server inherits it: a known calibration
    calibrate.save({"key": calibrate.machine_key(torch.device("cpu")), "bandwidth_bytes_per_s": 1e10,
                    "peak_flops": {"float32": 1e11}})
    flags = ["--model", str(tiny_chat_model), "--dtype", "float32", "--kv-cache-memory", "8MiB",
             "--energy-meter", "estimate", "--price-per-hour", "2.0"]
    with ServerProcess(flags) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        got = client.completions.create(model=client.models.list().data[0].id, prompt="Hello", max_tokens=4,
                                        temperature=0, extra_body={"ignore_eos": True})
        usage = got.usage.model_extra
        assert usage["energy_estimated"] is True and usage["energy_meter"] == "estimated(cpu-time)"
        assert usage["energy_joules"] >= 0 and usage["cost_usd"] > 0
        assert usage["energy_joules_per_output_token"] == pytest.approx(usage["energy_joules"] / 4)
        chunks = list(client.chat.completions.create(
            model=got.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        assert chunks[-1].usage.model_extra["energy_estimated"] is True
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        labels = 'estimated="true",meter="estimated(cpu-time)"'
        assert f"tokenmill_energy_joules_total{{{labels}}}" in text
        assert 'tokenmill_roofline_fraction{phase="decode"}' in text
        assert server.metric("tokenmill_energy_per_output_token_joules_count", labels) == 2
        status, body = server.post("/v1/completions", json.dumps({"prompt": [5, 6], "max_tokens": 2}).encode())
        assert status == 200 and body["usage"]["energy_estimated"] is True


# ---- the bench report -------------------------------------------------------------------------


def test_bench_report_labels_the_estimate(tiny_models, tmp_path, monkeypatch):
    import json

    import torch

    from tokenmill.bench import report, throughput as tp
    from tokenmill.metering import calibrate

    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path))
    calibrate.save({"key": calibrate.machine_key(torch.device("cpu")), "bandwidth_bytes_per_s": 1e10,
                    "peak_flops": {"float32": 1e11}})
    result = tp.run_throughput_benchmark(
        str(tiny_models["llama"]), num_prompts=3, input_len="4:8", output_len=4, repeats=2,
        engine_args={"dtype": "float32", "kv_cache_memory": "4MiB", "energy_meter": "estimate",
                     "price_per_hour": 3.6})
    energy = result["tokenmill"]["extra"]["energy"]
    assert energy["energy_estimated"] is True and energy["energy_meter"] == "estimated(cpu-time)"
    assert energy["joules_per_output_token"] == pytest.approx(energy["energy_joules"] / 12)
    decode = energy["decode"]
    assert decode["usd_per_1m_tokens"] == pytest.approx(decode["wall_s"] * 0.001 / 12 * 1e6)
    assert 0 < decode["roofline_fraction"] and energy["prefill"]["roofline_fraction"] > 0
    for text in (report.format_text(result), report.format_markdown(result)):
        assert "J / output token, estimated(cpu-time)" in text and "decode roofline fraction" in text
    assert json.loads(report.write_json(result, tmp_path / "r.json").read_text())["tokenmill"]["extra"]["energy"] == energy


def test_a_roofline_fraction_above_1_is_a_calibration_error_not_a_figure(tiny_models, tmp_path, monkeypatch):
    import torch

    from tokenmill.bench import report, throughput as tp
    from tokenmill.metering import calibrate

    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path))
    # ceilings far below any machine's (as when calibrated on a busy one): every step beats its roofline
    calibrate.save({"key": calibrate.machine_key(torch.device("cpu")), "bandwidth_bytes_per_s": 1.0,
                    "peak_flops": {"float32": 1.0}})
    result = tp.run_throughput_benchmark(
        str(tiny_models["llama"]), num_prompts=2, input_len=4, output_len=3, repeats=1,
        engine_args={"dtype": "float32", "kv_cache_memory": "4MiB", "energy_meter": "estimate"})
    energy = result["tokenmill"]["extra"]["energy"]
    for phase in ("prefill", "decode"):
        assert energy[phase]["roofline_fraction"] is None
        assert energy[phase]["roofline_error"].startswith("calibration error: a roofline fraction of")
    text = report.format_text(result)
    assert "decode roofline fraction: calibration error" in text and "tokenmill calibrate" in text


def test_bad_energy_arguments_are_refused(tiny_models):
    for kwargs, param in (({"energy_meter": "wattmeter"}, "energy_meter"), ({"price_per_hour": -1.0}, "price_per_hour"),
                          ({"cpu_watts_per_core": -5.0}, "cpu_watts_per_core")):
        with pytest.raises(ValueError, match=param):
            LLM(str(tiny_models["llama"]), kv_cache_memory="4MiB", **kwargs)


def test_the_roofline_counts_the_weights_as_held(tiny_models):
    """A float32 model's held bytes match the dense formula (plus its norms); int8 weights are about 4x fewer."""
    from tokenmill.metering.roofline import ModelBytes

    dense = LLMEngine(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="4MiB", quantization="none")
    int8 = LLMEngine(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="4MiB", quantization="int8",
                     kv_cache_dtype="int8")
    formula = ModelBytes.dense(dense.model_config, torch.float32)
    norms = dense.model_config.num_layers * 2 * dense.model_config.hidden_size * 4
    assert dense.accountant.sizes == ModelBytes(formula.layers + norms, formula.head, formula.kv_per_token)
    assert int8.accountant.sizes.layers < formula.layers / 3 and int8.accountant.sizes.head < formula.head / 3
    assert int8.accountant.sizes.kv_per_token < formula.kv_per_token / 3

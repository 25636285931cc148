"""`tokenmill calibrate`: this machine's memory bandwidth and peak matmul FLOP/s, measured once.

The roofline needs both ceilings; measuring them takes seconds, so the result is cached as
JSON under the tokenmill cache folder, one entry per (device, CPU or GPU model, threads,
torch version), and the engine only ever loads it. A measurement taken while other processes
kept the CPUs busy is not cached: it would set the ceilings low and every roofline fraction
after it high (a prefill "at 1.09 of the roofline" came from one).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import psutil
import torch

from tokenmill.cache import cache_root
from tokenmill.metering.roofline import Roofline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BUSY_PERCENT = 20.0  # other processes' share of all CPUs above which a measurement is not trusted
log = logging.getLogger("tokenmill")


def others_busy_percent(interval: float = 0.5) -> float:
    """The share of all CPUs (0-100) that other processes used over `interval` seconds."""
    me = psutil.Process()
    psutil.cpu_percent(None)
    mine = sum(me.cpu_times()[:2])
    time.sleep(interval)
    total = psutil.cpu_percent(None)
    mine = (sum(me.cpu_times()[:2]) - mine) / interval / (psutil.cpu_count() or 1) * 100
    return max(0.0, total - mine)


def trustworthy(entry: dict) -> bool:
    """Whether a measurement was taken on a quiet machine (entries without the figure predate the check)."""
    return entry.get("others_busy_percent", 0.0) < BUSY_PERCENT


def machine_key(device: torch.device) -> str:
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = _cpu_model() or platform.processor() or platform.machine()
    return f"{device.type}|{chip}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cache_file() -> Path | None:
    root = cache_root()
    return None if root is None else root / "calibration.json"


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def measure_bandwidth(device: torch.device, mem_bytes: int = 256 * 2**20, repeats: int = 3) -> tuple[float, float]:
    """Bytes/s of summing a large float32 tensor (reads it) and of copying it (reads and writes it)."""
    src = torch.ones(mem_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return (mem_bytes / _best_seconds(lambda: src.sum(), device, repeats),
            2 * mem_bytes / _best_seconds(lambda: dst.copy_(src), device, repeats))


@torch.inference_mode()
def measure(device: torch.device, mem_bytes: int = 256 * 2**20, matmul_n: int = 1024, repeats: int = 3) -> dict:
    """Bandwidth: the faster of `measure_bandwidth`'s read and copy. Matmul: n x n x n products,
    2 n^3 FLOPs each, per dtype that runs here."""
    busy = others_busy_percent() if device.type == "cpu" else 0.0
    read_bw, copy_bw = measure_bandwidth(device, mem_bytes, repeats)
    peak = {}
    for name, dtype in DTYPES.items():
        try:
            a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
            peak[name] = 2 * matmul_n**3 / _best_seconds(lambda: a @ a, device, repeats)
        except RuntimeError:  # the dtype has no matmul kernel here
            pass
    return {"key": machine_key(device), "bandwidth_bytes_per_s": max(read_bw, copy_bw),
            "read_bandwidth_bytes_per_s": read_bw, "copy_bandwidth_bytes_per_s": copy_bw,
            "peak_flops": peak, "others_busy_percent": busy, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def load(device: torch.device, path: Path | None = None) -> dict | None:
    """The cached calibration of this machine, or None."""
    path = path or cache_file()
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get(machine_key(device))
    except (OSError, ValueError):
        return None


def save(entry: dict, path: Path | None = None) -> Path | None:
    path = path or cache_file()
    if path is None:
        return None
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        entries = {}
    entries[entry["key"]] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=2) + "\n")
    return path


def load_or_measure(device: torch.device) -> dict:
    entry = load(device)
    if entry is None:
        entry = measure(device)
        if not trustworthy(entry):
            log.warning("calibration taken while other processes used %.0f%% of the CPUs: used for this run only, "
                        "not cached; run `tokenmill calibrate` on a quiet machine", entry["others_busy_percent"])
            return entry
        try:
            save(entry)
        except OSError:
            pass  # a read-only cache only costs a new measurement next time
    return entry


def roofline_for(entry: dict, dtype: torch.dtype) -> Roofline:
    """The ceilings for `dtype`; a dtype not calibrated falls back to float32's matmul peak."""
    name = str(dtype).removeprefix("torch.")
    peak = entry["peak_flops"]
    return Roofline(entry["bandwidth_bytes_per_s"], peak.get(name, peak["float32"]))

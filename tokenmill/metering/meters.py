"""Energy meters: cumulative Joules since the meter was made, from the best counter there is.

RAPL (CPU package and DRAM counters in /sys/class/powercap) and NVML (a GPU's total-energy
counter) are measurements; when neither can be read, the estimator turns process CPU time
(and GPU utilisation, where torch can read it) into Joules with a stated power model, and says
so: its name starts with "estimated" and `estimated` is True.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from tokenmill.config import EnergyConfig
from tokenmill.errors import InvalidParameterError, TokenmillError

DEFAULT_CPU_WATTS_PER_CORE = EnergyConfig.cpu_watts_per_core  # a busy core's share of a ~200 W, 20-core package
DEFAULT_IDLE_WATTS = EnergyConfig.idle_watts  # the machine's floor per wall second; 0 charges busy cores only
DEFAULT_GPU_WATTS = 300.0  # a data-centre GPU's board power at full utilisation
POWERCAP_ROOT = Path("/sys/class/powercap")


class MeterUnavailable(TokenmillError):
    """This meter cannot read its counter here (absent, unreadable, no library)."""


class EnergyMeter:
    name = "none"
    estimated = False

    def read(self) -> float:
        """Joules since the meter was made (monotonic)."""
        raise NotImplementedError


class RaplMeter(EnergyMeter):
    """Every RAPL package zone (intel-rapl:N) plus its DRAM subzone; core/uncore subzones are
    already inside the package figure, so they are left out. Wrap-around at
    max_energy_range_uj is undone between reads, so reads must come at least once per wrap
    (minutes at full power)."""

    name = "rapl"

    def __init__(self, root: str | os.PathLike = POWERCAP_ROOT, opener: Callable = open):
        self._open = opener
        root = Path(root)
        zones = sorted(p for p in root.glob("*-rapl:*") if p.name.count(":") == 1)
        self.domains = zones + [sub for z in zones for sub in sorted(z.glob(z.name + ":*"))
                                if self._text(sub / "name").startswith("dram")]
        if not self.domains:
            raise MeterUnavailable(f"no RAPL zones under {root.name}")
        self._ranges = [int(self._text(d / "max_energy_range_uj")) for d in self.domains]
        self._last = self._raw()
        self._total_uj = 0

    def _text(self, path: Path) -> str:
        try:
            with self._open(path) as f:
                return f.read().strip()
        except OSError as e:  # PermissionError (energy_uj is root-only since 2020), missing files
            raise MeterUnavailable(f"cannot read {path.parent.name}/{path.name}: {e}") from e

    def _raw(self) -> list[int]:
        return [int(self._text(d / "energy_uj")) for d in self.domains]

    def read(self) -> float:
        now = self._raw()
        for last, value, wrap in zip(self._last, now, self._ranges):
            self._total_uj += value - last if value >= last else value - last + wrap
        self._last = now
        return self._total_uj / 1e6


class NvmlMeter(EnergyMeter):
    """nvmlDeviceGetTotalEnergyConsumption (mJ since the driver loaded) of every visible GPU."""

    name = "nvml"

    def __init__(self, nvml=None):
        try:
            if nvml is None:
                import pynvml as nvml  # the nvidia-ml-py package
            nvml.nvmlInit()
            self._nvml = nvml
            self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            if not self.handles:
                raise MeterUnavailable("NVML sees no GPU")
            self._start = self.readings()
        except MeterUnavailable:
            raise
        except Exception as e:  # ImportError, NVMLError (no driver, counter not supported)
            raise MeterUnavailable(f"NVML: {e}") from e

    def readings(self) -> list[float]:
        """Joules of each device since its driver loaded."""
        return [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3 for h in self.handles]

    def read(self) -> float:
        return sum(self.readings()) - sum(self._start)


class SumMeter(EnergyMeter):
    """CPU and GPU counters together (a CUDA engine on a machine with readable RAPL)."""

    def __init__(self, meters: list[EnergyMeter]):
        self.meters = meters
        self.name = "+".join(m.name for m in meters)

    def read(self) -> float:
        return sum(m.read() for m in self.meters)


class EstimatedMeter(EnergyMeter):
    """Joules = cpu_watts_per_core * process CPU seconds + idle_watts * wall seconds
    (+ gpu_watts * GPU utilisation * wall seconds, where utilisation is known)."""

    estimated = True

    def __init__(self, cpu_watts_per_core: float = DEFAULT_CPU_WATTS_PER_CORE,
                 idle_watts: float = DEFAULT_IDLE_WATTS, gpu_utilization: Callable[[], float] | None = None,
                 gpu_watts: float = DEFAULT_GPU_WATTS, clock: Callable[[], float] = time.monotonic,
                 cpu_time: Callable[[], float] = time.process_time):
        self.cpu_watts_per_core, self.idle_watts, self.gpu_watts = cpu_watts_per_core, idle_watts, gpu_watts
        self._gpu_utilization, self._clock, self._cpu_time = gpu_utilization, clock, cpu_time
        self.name = "estimated(cpu-time+gpu-util)" if gpu_utilization else "estimated(cpu-time)"
        self._t0, self._cpu0 = clock(), cpu_time()
        self._last_t, self._gpu_joules = self._t0, 0.0

    def read(self) -> float:
        now = self._clock()
        if self._gpu_utilization is not None:  # utilisation now, held since the last read
            self._gpu_joules += self.gpu_watts * self._gpu_utilization() * (now - self._last_t)
        self._last_t = now
        return (self.cpu_watts_per_core * (self._cpu_time() - self._cpu0)
                + self.idle_watts * (now - self._t0) + self._gpu_joules)


METERS = ("auto", "rapl", "nvml", "estimate", "none")


def make_meter(kind: str = "auto", *, cuda: bool = False, cpu_watts_per_core: float = DEFAULT_CPU_WATTS_PER_CORE,
               idle_watts: float = DEFAULT_IDLE_WATTS, rapl_root: str | os.PathLike = POWERCAP_ROOT,
               nvml=None) -> EnergyMeter | None:
    """The meter `kind` names; "auto": RAPL and (on CUDA) NVML where readable, else the estimator.
    `rapl_root` and `nvml` (the pynvml module) are there for tests."""
    if kind not in METERS:
        raise InvalidParameterError("energy_meter", f"unknown meter {kind!r}; use one of {', '.join(METERS)}")
    if kind == "none":
        return None
    if kind == "rapl":
        return RaplMeter(rapl_root)
    if kind == "nvml":
        return NvmlMeter(nvml)
    found: list[EnergyMeter] = []
    if kind == "auto":
        for make, wanted in ((lambda: RaplMeter(rapl_root), True), (lambda: NvmlMeter(nvml), cuda)):
            try:
                if wanted:
                    found.append(make())
            except MeterUnavailable:
                pass
    if found:
        return found[0] if len(found) == 1 else SumMeter(found)
    return EstimatedMeter(cpu_watts_per_core, idle_watts, _torch_gpu_utilization() if cuda else None)


def _torch_gpu_utilization() -> Callable[[], float] | None:
    """torch.cuda.utilization() as a 0..1 fraction, or None where it cannot be read."""
    import torch

    try:
        torch.cuda.utilization()
    except Exception:  # needs NVML too; without it utilisation is unknown
        return None
    return lambda: torch.cuda.utilization() / 100.0

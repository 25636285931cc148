"""Per-request energy, cost and roofline accounting around each engine step.

The engine calls `start()` before the runner and `end(chunks, metrics)` after it. The step's
energy (the meter's delta), its wall time, and its roofline time are split among the chunks
in proportion to the tokens each computed: a prefill token and a decode token weigh the same
(both pass every weight once; the attention term that differs is small next to the matmuls
on the models this targets). The shares add up to the step's figures, so per-request sums
equal the totals. Time outside steps (the engine idle) is nobody's and is not charged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from tokenmill.config import EnergyConfig, ModelConfig
from tokenmill.errors import InvalidParameterError
from tokenmill.metering import calibrate
from tokenmill.metering.meters import EnergyMeter, make_meter
from tokenmill.metering.roofline import Roofline, step_work
from tokenmill.outputs import RequestMetrics

JOULES_PER_KWH = 3.6e6
log = logging.getLogger("tokenmill")


@dataclass
class PhaseStats:
    """Steps of one kind (decode: every chunk one token past its prompt; prefill: the rest)."""

    steps: int = 0
    wall_s: float = 0.0
    roofline_s: float = 0.0
    last_fraction: float | None = None

    @property
    def fraction(self) -> float | None:
        """Achieved fraction of the roofline: the least time the work could take over the time it took."""
        return self.roofline_s / self.wall_s if self.wall_s > 0 and self.steps else None


@dataclass
class StepAccountant:
    meter: EnergyMeter | None
    config: EnergyConfig
    model_config: ModelConfig
    dtype: torch.dtype
    roofline: Roofline | None = None
    total_joules: float = 0.0
    total_wall_s: float = 0.0
    phases: dict[str, PhaseStats] = field(default_factory=lambda: {"prefill": PhaseStats(), "decode": PhaseStats()})
    _t0: float = 0.0
    _e0: float = 0.0

    @property
    def meter_name(self) -> str | None:
        return None if self.meter is None else self.meter.name

    @property
    def estimated(self) -> bool | None:
        return None if self.meter is None else self.meter.estimated

    def cost_usd(self, wall_s: float, joules: float) -> float | None:
        """Machine time at price_per_hour plus energy at energy_price; None when neither is set."""
        cfg = self.config
        if cfg.price_per_hour is None and cfg.energy_price is None:
            return None
        return (wall_s * (cfg.price_per_hour or 0.0) / 3600
                + joules * (cfg.energy_price or 0.0) / JOULES_PER_KWH)

    def start(self) -> None:
        self._e0 = self.meter.read() if self.meter is not None else 0.0
        self._t0 = time.perf_counter()

    def end(self, chunks: list, metrics: list[RequestMetrics]) -> None:
        """Split the step since start() among `chunks` (metrics[i] is chunks[i]'s request's)."""
        wall = time.perf_counter() - self._t0
        joules = self.meter.read() - self._e0 if self.meter is not None else None
        ideal = None
        if self.roofline is not None:
            work = step_work(self.model_config, self.dtype, [(c.start, c.num_tokens) for c in chunks],
                             sum(c.sample for c in chunks))
            ideal = self.roofline.time(work)
            phase = self.phases["decode" if all(c.start >= c.seq.num_prompt_tokens for c in chunks) else "prefill"]
            phase.steps += 1
            phase.wall_s += wall
            phase.roofline_s += ideal
            phase.last_fraction = ideal / wall if wall > 0 else None
        self.total_wall_s += wall
        self.total_joules += joules or 0.0
        total_tokens = sum(c.num_tokens for c in chunks)
        for chunk, m in zip(chunks, metrics):
            share = chunk.num_tokens / total_tokens
            m.compute_time = (m.compute_time or 0.0) + wall * share
            if joules is not None:
                m.energy_joules = (m.energy_joules or 0.0) + joules * share
                m.energy_meter, m.energy_estimated = self.meter.name, self.meter.estimated
            if ideal is not None:
                m.idealized_time = (m.idealized_time or 0.0) + ideal * share
            m.cost_usd = self.cost_usd(m.compute_time, m.energy_joules or 0.0)


def make_accountant(cfg: EnergyConfig, model_config: ModelConfig, dtype: torch.dtype,
                    device: torch.device) -> StepAccountant:
    """The engine's accountant: the meter `cfg` asks for, and the roofline if `tokenmill calibrate` ran here."""
    for name in ("cpu_watts_per_core", "idle_watts", "price_per_hour", "energy_price"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise InvalidParameterError(name, f"must be non-negative, got {value}")
    meter = make_meter(cfg.energy_meter, cuda=device.type == "cuda", cpu_watts_per_core=cfg.cpu_watts_per_core,
                       idle_watts=cfg.idle_watts)
    entry = calibrate.load(device)
    roofline = calibrate.roofline_for(entry, dtype) if entry is not None else None
    log.info("tokenmill: energy meter %s; roofline %s", meter.name if meter else "off",
             "from the cached calibration" if roofline else "off (run `tokenmill calibrate`)")
    return StepAccountant(meter, cfg, model_config, dtype, roofline)

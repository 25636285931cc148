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
from dataclasses import asdict, dataclass, field

import torch

from tokenmill.config import EnergyConfig, ModelConfig
from tokenmill.errors import InvalidParameterError
from tokenmill.metering import calibrate
from tokenmill.metering.meters import EnergyMeter, make_meter
from tokenmill.metering.roofline import ModelBytes, Roofline, calibration_error, step_work
from tokenmill.outputs import RequestMetrics

JOULES_PER_KWH = 3.6e6
log = logging.getLogger("tokenmill")


@dataclass
class PhaseStats:
    """Steps of one kind (decode: every chunk past its prompt; prefill: any step with prompt tokens)."""

    steps: int = 0
    wall_s: float = 0.0
    joules: float = 0.0
    roofline_s: float | None = None  # None without a calibration
    last_fraction: float | None = None

    @property
    def fraction(self) -> float | None:
        """Achieved fraction of the roofline: the least time the work could take over the time it took."""
        return self.roofline_s / self.wall_s if self.roofline_s is not None and self.wall_s > 0 else None


@dataclass
class StepAccountant:
    meter: EnergyMeter | None
    config: EnergyConfig
    model_config: ModelConfig
    sizes: ModelBytes  # the engine sets the held sizes once the weights are loaded
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

    def snapshot(self) -> dict:
        """The running totals now, for report() over what comes after."""
        return {name: asdict(p) for name, p in self.phases.items()}

    def report(self, since: dict, input_tokens: int, output_tokens: int, runs: int = 1) -> dict:
        """Energy, cost and roofline of the steps since `since`, per run: J/token, $/1M tokens, fractions.
        Prefill steps' time and energy are charged to input tokens, decode steps' to output tokens."""
        delta = {name: {k: (v or 0.0) - (since[name][k] or 0.0) for k, v in asdict(p).items()
                        if k in ("steps", "wall_s", "joules", "roofline_s")} for name, p in self.phases.items()}
        pre, dec = delta["prefill"], delta["decode"]
        joules = (pre["joules"] + dec["joules"]) / runs
        out = {"energy_meter": self.meter_name, "energy_estimated": self.estimated,
               "energy_joules": joules if self.meter else None,
               "joules_per_output_token": joules / output_tokens if self.meter else None,
               "joules_per_token": joules / (input_tokens + output_tokens) if self.meter else None}
        for name, d, tokens in (("prefill", pre, input_tokens), ("decode", dec, output_tokens)):
            cost = self.cost_usd(d["wall_s"] / runs, d["joules"] / runs)
            fraction = d["roofline_s"] / d["wall_s"] if self.roofline is not None and d["wall_s"] > 0 else None
            error = calibration_error(fraction)
            out[name] = {"steps": d["steps"] / runs, "wall_s": d["wall_s"] / runs,
                         "roofline_fraction": None if error else fraction, "roofline_error": error,
                         "usd_per_1m_tokens": cost / tokens * 1e6 if cost is not None and tokens else None}
        return out

    def start(self) -> None:
        self._e0 = self.meter.read() if self.meter is not None else 0.0
        self._t0 = time.perf_counter()

    def end(self, chunks: list, metrics: list[RequestMetrics]) -> None:
        """Split the step since start() among `chunks` (metrics[i] is chunks[i]'s request's)."""
        wall = time.perf_counter() - self._t0
        joules = self.meter.read() - self._e0 if self.meter is not None else None
        phase = self.phases["decode" if all(c.start >= c.seq.num_prompt_tokens for c in chunks) else "prefill"]
        phase.steps += 1
        phase.wall_s += wall
        phase.joules += joules or 0.0
        ideal = None
        if self.roofline is not None:
            work = step_work(self.model_config, self.sizes, [(c.start, c.num_tokens) for c in chunks],
                             sum(c.sample for c in chunks))
            ideal = self.roofline.time(work)
            phase.roofline_s = (phase.roofline_s or 0.0) + ideal
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
    return StepAccountant(meter, cfg, model_config, ModelBytes.dense(model_config, dtype), roofline)

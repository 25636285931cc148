"""What one engine step costs in seconds and Watts, for the simulator's virtual clock.

Two kinds, one interface (`step_seconds(chunks)`):

- `LinearStepCost`, "measured": fixed + per sequence (its one decode or last prompt token) + per
  further prompt token + once per step that prefills + per context token (each chunk's KV
  positions) + per attention pair of the multi-token chunks + per distinct KV block read (so
  that sequences over one cached prefix, which read its blocks together, cost what they do),
  fitted by non-negative least squares to engine steps timed here (`tokenmill calibrate
  --steps`). Prefill has terms of its own because
  it runs other kernels than decode (a batch-1 decode step is weight-bandwidth bound, a prefill
  compute bound), so one per-token rate fits neither.
- `RooflineStepCost`, "modelled": for a machine that is not here, the step's bytes over the
  achieved bandwidth or its FLOPs over the achieved peak, whichever is longer, plus a fixed
  launch overhead; the achieved shares are assumptions, stated with the figures.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tokenmill.config import ModelConfig
from tokenmill.errors import InvalidParameterError
from tokenmill.metering.roofline import ModelBytes, head_params, layer_params, step_work
from tokenmill.step_plan import ScheduledChunk, StepShape

TERMS = ("fixed", "per_seq", "per_prefill_token", "prefill_step", "per_context_token", "per_attention_pair",
         "per_kv_block")


def shape_terms(shape: StepShape) -> list[float]:
    """The multipliers of TERMS for a step of this shape."""
    prefill = shape.num_tokens - shape.num_seqs
    return [1.0, shape.num_seqs, prefill, 1.0 if prefill else 0.0, shape.num_context_tokens, shape.num_attention_pairs,
            shape.num_kv_blocks]


@dataclass
class LinearStepCost:
    coefficients: dict[str, float]  # seconds per unit of each of TERMS
    busy_watts: float = 0.0  # power while a step runs
    idle_watts: float = 0.0  # power while the replica waits for work
    source: str = "measured"  # or "synthetic" (tests, what-ifs)
    label: str = ""  # which model, form and machine

    def __post_init__(self) -> None:
        unknown = set(self.coefficients) - set(TERMS)
        if unknown:
            raise InvalidParameterError("cost_model", f"unknown terms {sorted(unknown)}; use {', '.join(TERMS)}")
        self.coefficients = {t: float(self.coefficients.get(t, 0.0)) for t in TERMS}
        self._weights = [self.coefficients[t] for t in TERMS]

    def step_seconds(self, chunks: list[ScheduledChunk]) -> float:
        return self.shape_seconds(StepShape.of(chunks))

    def shape_seconds(self, shape: StepShape) -> float:
        return sum(w * x for w, x in zip(self._weights, shape_terms(shape)))

    @property
    def reads_blocks(self) -> bool:
        """Whether `decode_run_seconds` needs the distinct KV blocks of each step."""
        return self.coefficients["per_kv_block"] > 0

    def decode_run_seconds(self, num_seqs: int, computed: int, count: int, blocks=None) -> np.ndarray:
        """Durations of `count` steps in which the same `num_seqs` sequences, `computed` KV tokens
        between them at the start, each decode one token (step i attends computed + i * num_seqs),
        reading `blocks[i]` distinct KV blocks (given when `reads_blocks`)."""
        c = self.coefficients
        i = np.arange(1, count + 1, dtype=float)
        seconds = c["fixed"] + c["per_seq"] * num_seqs + c["per_context_token"] * (computed + i * num_seqs)
        return seconds + c["per_kv_block"] * blocks if blocks is not None else seconds

    def to_dict(self) -> dict:
        return {"kind": "linear", **asdict(self)}


@dataclass
class RooflineStepCost:
    model: ModelConfig = field(repr=False)
    sizes: ModelBytes
    bandwidth: float  # bytes/s the chip can stream
    peak_flops: float  # matmul FLOP/s at the model dtype
    bandwidth_share: float = 0.8  # of `bandwidth` a decode step achieves (assumed)
    flops_share: float = 0.6  # of `peak_flops` a prefill achieves (assumed)
    overhead_seconds: float = 0.0015  # per step: launches, scheduling, sampling (assumed)
    busy_watts: float = 0.0
    idle_watts: float = 0.0
    source: str = "modelled"
    label: str = ""

    reads_blocks = False  # bytes read per context token, shared prefix or not

    def step_seconds(self, chunks: list[ScheduledChunk]) -> float:
        spans = [(c.start, c.num_tokens) for c in chunks if c.num_tokens]
        work = step_work(self.model, self.sizes, spans, sum(1 for c in chunks if c.sample))
        return self._seconds(work.bytes, work.flops)

    def decode_run_seconds(self, num_seqs: int, computed: int, count: int, blocks=None) -> np.ndarray:
        """As LinearStepCost's: step_work of one-token chunks, their contexts growing by one per step."""
        n, m = num_seqs, self.model
        i = np.arange(1, count + 1, dtype=float)
        pairs = computed + i * n  # each chunk attends its whole context
        flops = 2 * (layer_params(m) + head_params(m)) * n + 4 * m.num_layers * m.num_heads * m.head_dim * pairs
        kv_bytes = (computed + (i - 1) * n + 2 * n) * self.sizes.kv_per_token  # read the context, write the token
        return self._seconds(self.sizes.layers + self.sizes.head + kv_bytes, flops)

    def _seconds(self, bytes_, flops):
        return self.overhead_seconds + np.maximum(bytes_ / (self.bandwidth * self.bandwidth_share),
                                                  flops / (self.peak_flops * self.flops_share))

    def to_dict(self) -> dict:
        return {"kind": "roofline", "label": self.label, "source": self.source, "sizes": asdict(self.sizes),
                **{k: getattr(self, k) for k in ("bandwidth", "peak_flops", "bandwidth_share", "flops_share",
                                                 "overhead_seconds", "busy_watts", "idle_watts")}}


def fit_linear(shapes: list[StepShape], seconds: list[float], **kwargs) -> LinearStepCost:
    """The non-negative coefficients that best fit the timed steps (least squares on relative error,
    so that the short decode steps weigh as much as the long prefills)."""
    if len(shapes) < len(TERMS):
        raise InvalidParameterError("steps", f"need at least {len(TERMS)} timed steps to fit, got {len(shapes)}")
    y = np.asarray(seconds, dtype=float)
    x = np.asarray([shape_terms(s) for s in shapes], dtype=float) / y[:, None]
    coefficients = _nnls(x, np.ones_like(y))
    return LinearStepCost(dict(zip(TERMS, coefficients.tolist())), **kwargs)


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min |a x - b| with x >= 0 (Lawson and Hanson's active set; a handful of terms)."""
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    n = a.shape[1]
    active = np.zeros(n, dtype=bool)
    x = np.zeros(n)
    for _ in range(3 * n):
        gradient = a.T @ (b - a @ x)
        candidates = np.where(~active & (gradient > 1e-12))[0]
        if not len(candidates):
            break
        active[candidates[np.argmax(gradient[candidates])]] = True
        while True:
            z = np.zeros(n)
            z[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
            if (z[active] > 0).all():
                x = z
                break
            negative = active & (z <= 0)
            alpha = np.min(x[negative] / (x[negative] - z[negative]))
            x = x + alpha * (z - x)
            active &= x > 1e-15
    return x / scale


# Published figures of chips that are not here (SXM parts): HBM bandwidth, dense bf16 matmul peak, board
# power and memory; the price per GPU-hour is an assumed on-demand rate (pass --price-per-hour for yours).
CHIPS = {
    "h100": {"bandwidth": 3.35e12, "peak_flops": 989e12, "busy_watts": 700.0, "idle_watts": 100.0,
             "memory_bytes": 80e9, "price_per_hour": 2.5},
    "h200": {"bandwidth": 4.8e12, "peak_flops": 989e12, "busy_watts": 700.0, "idle_watts": 100.0,
             "memory_bytes": 141e9, "price_per_hour": 3.5},
}


def modelled(chip: str, model: ModelConfig, dtype: torch.dtype = torch.bfloat16, **overrides) -> RooflineStepCost:
    """The roofline cost model of `model` in `dtype` on a chip of CHIPS."""
    if chip not in CHIPS:
        raise InvalidParameterError("chip", f"unknown chip {chip!r}; use {', '.join(CHIPS)}")
    spec = {k: v for k, v in CHIPS[chip].items() if k not in ("price_per_hour", "memory_bytes")}
    return RooflineStepCost(model, ModelBytes.dense(model, dtype), label=f"{model.architecture} {chip}",
                            **{**spec, **overrides})


def from_dict(data: dict, model: ModelConfig | None = None):
    """A cost model as `to_dict` wrote it (a roofline one needs the model's shape back)."""
    data = dict(data)
    kind = data.pop("kind", "linear")
    if kind == "linear":
        return LinearStepCost(**data)
    if model is None:
        raise InvalidParameterError("cost_model", "a roofline cost model needs the model's shape")
    sizes = ModelBytes(**data.pop("sizes"))
    return RooflineStepCost(model, sizes, **data)


def load_file(path: str | Path, model: ModelConfig | None = None):
    """A cost model from a JSON file (what `tokenmill simulate --output-json` writes under "cost_model")."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return from_dict(data.get("cost_model", data), model)
    except OSError as e:
        raise InvalidParameterError("cost_model", f"{path.name}: cannot read it ({e.strerror})") from None
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise InvalidParameterError("cost_model", f"{path.name}: not a cost model ({e})") from None


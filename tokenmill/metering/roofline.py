"""Model-shape arithmetic: the bytes and FLOPs one engine step must move and compute.

Pure functions of a ModelConfig and the step's chunks (context start, new tokens), so tests
can check them against hand-computed numbers. What counts:

- weights: every matmul weight is read once per step (the embedding table is only indexed,
  so it is left out); the output head runs only for the rows that sample.
- FLOPs: 2 per weight per token through the layers, 2 * hidden * vocab per sampled row, and
  attention: 4 * heads * head_dim per (query, key) pair (QK^T and AV), each new token at
  position p attending over p + 1 keys (sliding windows ignored: an upper bound).
- KV cache: each chunk reads its whole context (start + new tokens) and writes its new
  tokens, in every layer.
Activations and norms are left out: small next to the above for any real model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.config import ModelConfig


def calibration_error(fraction: float | None) -> str | None:
    """Why a roofline fraction above 1 is no figure (no step beats the machine's ceilings: the cached
    ones are too low), or None for a fraction that can be."""
    if fraction is None or fraction <= 1:
        return None
    return (f"calibration error: a roofline fraction of {fraction:.2f} cannot be; the cached ceilings are below "
            "what this run achieved (measured while the machine was busy?): run `tokenmill calibrate` again on a "
            "quiet machine")


def layer_params(cfg: ModelConfig) -> int:
    """Matmul weights of all decoder layers (q, k, v, o, gate, up, down)."""
    attn = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * (attn + mlp)


def head_params(cfg: ModelConfig) -> int:
    return cfg.hidden_size * cfg.vocab_size


@dataclass(frozen=True)
class ModelBytes:
    """The bytes a step reads per pass over the weights, and per token of KV, as the engine holds them
    (quantized weights and an 8-bit cache are smaller than `dense` says)."""

    layers: int  # all decoder layers' weights
    head: int  # the output projection
    kv_per_token: int  # all layers, K and V

    @classmethod
    def dense(cls, cfg: ModelConfig, dtype: torch.dtype) -> "ModelBytes":
        return cls(layer_params(cfg) * dtype.itemsize, head_params(cfg) * dtype.itemsize, cfg.kv_bytes_per_token(dtype))


@dataclass(frozen=True)
class StepWork:
    flops: float
    bytes: float


def step_work(cfg: ModelConfig, sizes: ModelBytes, chunks: list[tuple[int, int]], num_sampled: int) -> StepWork:
    """FLOPs and bytes of one step; `chunks` are (start position, new tokens) pairs."""
    tokens = sum(n for _, n in chunks)
    # sum over each chunk's new tokens of its context length p + 1, p = start .. start + n - 1
    pairs = sum(n * start + n * (n + 1) // 2 for start, n in chunks)
    flops = (2 * layer_params(cfg) * tokens + 2 * head_params(cfg) * num_sampled
             + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs)
    kv_tokens = sum(start + 2 * n for start, n in chunks)  # read start + n, write n
    weight_bytes = sizes.layers + (sizes.head if num_sampled else 0)
    return StepWork(float(flops), float(weight_bytes + kv_tokens * sizes.kv_per_token))


@dataclass(frozen=True)
class Roofline:
    """A machine's ceilings: memory bandwidth (bytes/s) and peak matmul throughput (FLOP/s)."""

    bandwidth: float
    peak_flops: float

    def time(self, work: StepWork) -> float:
        """The least time the work can take: bound by memory or by compute, whichever is slower."""
        return max(work.bytes / self.bandwidth, work.flops / self.peak_flops)

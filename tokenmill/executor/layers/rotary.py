"""Rotary position embedding in Hugging Face's half-split (`rotate_half`) layout.

The inverse frequencies come from transformers' own RoPE functions, so every scaling type
a config can name (llama3, linear, dynamic, yarn, ...) matches the reference exactly.
"""

from __future__ import annotations

import torch

from tokenmill.config import ModelConfig


class RotaryEmbedding:
    def __init__(self, cfg: ModelConfig, max_positions: int):
        with torch.device("cpu"):  # real tables even when the model is built on the meta device
            inv_freq, scaling = _inv_freq(cfg)
            t = torch.arange(max_positions, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos = emb.cos() * scaling
            self.sin = emb.sin() * scaling

    def to(self, device: torch.device, dtype: torch.dtype) -> "RotaryEmbedding":
        self.cos, self.sin = self.cos.to(device, dtype), self.sin.to(device, dtype)
        return self

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions][:, None, :], self.sin[positions][:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos_sin) -> torch.Tensor:
        """Rotate x [tokens, heads, head_dim] (queries and keys alike) to its tokens' positions."""
        cos, sin = cos_sin
        return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = cfg.hf_config
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        dim = cfg.head_dim
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv, 1.0
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    return inv.float(), float(scaling)

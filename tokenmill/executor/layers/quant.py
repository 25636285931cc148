"""Weight quantization for the low-bit linear layers, and PyTorch's weight-only kernels.

int8: symmetric, one scale per output channel (w = q * scale) or per block of 32 inputs
(`Int8Blocks`). int4: asymmetric groups of `group` weights along the input axis (`Int4Groups`);
both forms are described in weight_formats.py. PyTorch's int4 kernels read w = (q - 8) * scale + zero, so
their scale/zero pairs are made from (d, m) when they are packed.

The kernels take [out, in] codes and bfloat16 activations and scales: on x86 CPUs only their
bfloat16 variants are vectorized (float32 runs a scalar loop, docs/architecture.md) and CUDA's int4
kernel takes nothing else. So the kernel calls here cast activations to bfloat16 and back.
"""

from __future__ import annotations

import torch

from tokenmill.config import INT4_GROUP_SIZES
from tokenmill.weight_formats import Int4Groups, Int8Blocks

COMPUTE_DTYPE = torch.bfloat16


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: codes [rows, in] and float32 scales [rows] (w ~ q * scale)."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def quantize_q8_blocks(w: torch.Tensor) -> Int8Blocks:
    """Symmetric int8 in blocks of 32 inputs with float16 scales, as llama.cpp's Q8_0. A Q8_0 tensor's
    dequantized values come back as its own blocks."""
    rows, cols = w.shape
    g = w.float().view(rows, cols // 32, 32)
    d = g.abs().amax(dim=-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(g * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return Int8Blocks(q.view(rows, cols), d.half())


def quantize_int4(w: torch.Tensor, group: int) -> Int4Groups:
    """Asymmetric int4 groups of `group` along the input axis, spanning each group's min..max."""
    rows, cols = w.shape
    g = w.float().view(rows, cols // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return Int4Groups(q.view(rows, cols), scale, lo)


def int8_fits(in_features: int) -> bool:
    """The int8 kernel reads rows with aligned 8- or 16-value vector loads (a ragged width crashes it);
    whole 32-value blocks satisfy every CPU variant."""
    return in_features % 32 == 0


def int4_group_for(in_features: int, out_features: int, group: int) -> int | None:
    """The group an int4 layer of this shape uses: `group` if it divides the input width, else the
    largest smaller kernel group that does; None if the kernels cannot take the shape at all
    (they need output rows in blocks of 16 and whole groups)."""
    if out_features % 16:
        return None
    return next((g for g in sorted(INT4_GROUP_SIZES, reverse=True) if g <= group and in_features % g == 0), None)


def pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Codes [out, in] (uint8, 0..15) in the layout the device's int4 kernel reads."""
    if device.type == "cuda":
        q = q.to(device)
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # even input index in the high nibble
        return torch.ops.aten._convert_weight_to_int4pack(pairs, _inner_k_tiles(q.shape[1]))
    # The CPU packer takes one int32 per code; its inner-k-tiles argument is unused.
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(device, torch.int32), 2)


def int4_scale_zero(groups: Int4Groups, device: torch.device) -> torch.Tensor:
    """Scales and zeros as PyTorch's int4 kernels read them (w = (q - 8) * scale + zero, so scale = d and
    zero = m + 8d): [in // group, out, 2] in COMPUTE_DTYPE."""
    d, m = groups.d.float(), groups.m.float()
    return torch.stack([d.t(), (m + 8 * d).t()], dim=-1).to(device, COMPUTE_DTYPE).contiguous()


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scale_zero: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] @ the int4 weight's transpose -> [tokens, out], in x's dtype."""
    mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    return mm(x.to(COMPUTE_DTYPE), packed, group, scale_zero).to(x.dtype)


def int8_scale(scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-channel scales [out] as the int8 kernel reads them."""
    return scale.to(device, COMPUTE_DTYPE)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] @ (q * scale)' -> [tokens, out], in x's dtype; one kernel on CPU and CUDA."""
    return torch.ops.aten._weight_int8pack_mm(x.to(COMPUTE_DTYPE), q, scale).to(x.dtype)


def _inner_k_tiles(in_features: int) -> int:
    """CUDA's tile depth: the input width must be a multiple of 16 x inner_k_tiles."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)

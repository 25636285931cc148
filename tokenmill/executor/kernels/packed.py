"""Weights in the layouts lowbit.cpp reads, and the calls that multiply by them.

A `PackedWeight` is [out, in] codes in groups of 32 along the input, output rows interleaved
in groups of 8 (see lowbit.cpp): 4-bit codes with w = d * q + m, or 8-bit codes with w = d * q.
Scales are kept in float16 where that holds them exactly (GGUF's own d and m are float16) and in
float32 otherwise, so packing never changes a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.executor.kernels import lowbit

GROUP = 32


@dataclass
class PackedWeight:
    bits: int  # 4 or 8
    out_features: int
    in_features: int
    codes: torch.Tensor  # uint8 [ceil(out / 8), in / 32 * (128 or 256)]
    scales: torch.Tensor  # float16 or float32 [ceil(out / 8), in / 32, 2, 8] (4 bits) or [.., in / 32, 8] (8 bits)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, in] @ W' -> [tokens, out] in float32."""
        ops = lowbit()
        mm = ops.q4_mm if self.bits == 4 else ops.q8_mm
        return mm(x.float(), self.codes, self.scales, self.out_features)

    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in float32, as the kernel sees it (d * q + m, or d * q)."""
        groups, nb = self.codes.shape[0], self.in_features // GROUP
        if self.bits == 4:
            b = self.codes.view(groups, nb, 4, 8, 4)  # (g, block, step, row, j)
            q = torch.stack([b & 0x0F, b >> 4], dim=2)  # (g, block, half, step, row, j)
            q = q.permute(0, 4, 1, 2, 3, 5).reshape(groups * 8, nb, GROUP).float()
            s = self.scales.float().view(groups, nb, 2, 8).permute(0, 3, 1, 2).reshape(groups * 8, nb, 2)
            w = q * s[..., :1] + s[..., 1:]
        else:
            b = self.codes.view(groups, nb, 8, 8, 4)
            q = b.permute(0, 3, 1, 2, 4).reshape(groups * 8, nb, GROUP).to(torch.int16) - 128
            s = self.scales.float().view(groups, nb, 8).permute(0, 2, 1).reshape(groups * 8, nb, 1)
            w = q.float() * s
        return w.reshape(groups * 8, self.in_features)[: self.out_features]


def kernels_fit(in_features: int) -> bool:
    """Whether the packed kernels can take a layer of this input width (whole groups of 32)."""
    return in_features % GROUP == 0 and lowbit() is not None


def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> PackedWeight:
    """Codes q [out, in] (0..15) with w = d * q + m, d and m [out, in / 32]."""
    out_features, in_features = q.shape
    groups, nb = -(-out_features // 8), in_features // GROUP
    q = _pad_rows(q.to(torch.uint8), groups * 8).view(groups, 8, nb, 2, 4, 4)  # (g, row, block, half, step, j)
    codes = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # (g, block, step, row, j)
    scales = torch.stack([_pad_rows(d, groups * 8), _pad_rows(m, groups * 8)], dim=-1)  # (row, block, 2)
    scales = _exact_half(scales.view(groups, 8, nb, 2).permute(0, 2, 3, 1))
    return PackedWeight(4, out_features, in_features, codes.reshape(groups, -1).contiguous(), scales.contiguous())


def pack_q8(q: torch.Tensor, d: torch.Tensor) -> PackedWeight:
    """Signed codes q [out, in] (int8) with w = d * q, d [out, in / 32] (or [out] for one scale a row)."""
    out_features, in_features = q.shape
    groups, nb = -(-out_features // 8), in_features // GROUP
    if d.dim() == 1:
        d = d[:, None].expand(out_features, nb)
    offset = (q.to(torch.int16) + 128).to(torch.uint8)
    codes = _pad_rows(offset, groups * 8, fill=128).view(groups, 8, nb, 8, 4).permute(0, 2, 3, 1, 4)
    scales = _exact_half(_pad_rows(d, groups * 8).view(groups, 8, nb).permute(0, 2, 1))
    return PackedWeight(8, out_features, in_features, codes.reshape(groups, -1).contiguous(), scales.contiguous())


def _pad_rows(t: torch.Tensor, rows: int, fill: int = 0) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = torch.full((rows - t.shape[0], *t.shape[1:]), fill, dtype=t.dtype)
    return torch.cat([t, pad])


def _exact_half(scales: torch.Tensor) -> torch.Tensor:
    """float16 if every scale survives the round trip, else float32."""
    scales = scales.float()
    half = scales.half()
    return half if torch.equal(half.float(), scales) else scales

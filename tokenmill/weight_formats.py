"""How a checkpoint's low-bit weights are held, independent of the kernels that multiply them.

int8 blocks (`Int8Blocks`, llama.cpp's Q8_0): w = d * q per block of 32 inputs. int4 groups
(`Int4Groups`): codes q in 0..15 and w = d * q + m per group along the input axis, llama.cpp's
convention, which holds Q4_0, Q4_1 and Q4_K's sub-blocks exactly. The loader produces these and
the executor's linear layers consume them, so they sit below both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch


@dataclass
class Int4Groups:
    """An int4 weight [out, in]: codes q (uint8, 0..15) and per-group d and m [out, in // group], w = d * q + m."""

    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.d.shape[1]

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.q.shape
        w = self.q.view(rows, -1, self.group).float() * self.d.float()[..., None] + self.m.float()[..., None]
        return w.view(rows, cols)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Int4Groups":
        """The same weight with `fn` (a reordering of rows) applied to codes and scales alike."""
        return Int4Groups(fn(self.q), fn(self.d), fn(self.m))


@dataclass
class Int8Blocks:
    """An int8 weight [out, in]: codes q (int8) and one scale d per block of 32 inputs [out, in // 32], w = d * q."""

    q: torch.Tensor
    d: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.q.shape
        return (self.q.view(rows, -1, 32).float() * self.d.float()[..., None]).view(rows, cols)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Int8Blocks":
        return Int8Blocks(fn(self.q), fn(self.d))


LowBit = Int4Groups | Int8Blocks  # a checkpoint's low-bit tensor as it was stored


def dense(weight: torch.Tensor | LowBit) -> torch.Tensor:
    """The weight as a plain tensor (low-bit forms dequantized to float32)."""
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize()


def part(weight: torch.Tensor | LowBit, dim: int, index: int, parts: int) -> torch.Tensor | LowBit:
    """Part `index` of `parts` equal parts of a weight [out, in] (or a bias [out]) along `dim`: 0 cuts
    output rows (a low-bit weight's scales go with their rows), 1 cuts inputs (a low-bit weight's
    groups go whole with them, so a cut inside a group is refused)."""
    size = weight.shape[dim] // parts
    cut = slice(index * size, (index + 1) * size)
    if isinstance(weight, torch.Tensor):
        return (weight[cut] if dim == 0 else weight[:, cut]).contiguous()
    if dim == 0:
        return weight.map_rows(lambda t: t[cut].contiguous())
    group = weight.q.shape[1] // weight.d.shape[1]
    if size % group:
        raise ValueError(f"a part of {size} inputs would cut the weight's groups of {group}")
    groups = slice(cut.start // group, cut.stop // group)
    return type(weight)(*(getattr(weight, f.name)[:, cut if f.name == "q" else groups].contiguous()
                          for f in fields(weight)))

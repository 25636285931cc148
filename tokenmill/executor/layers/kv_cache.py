"""One layer's paged KV cache: [slots, 2, kv_heads, head_dim] (K then V), in the model dtype or 8 bits.

An 8-bit cache (int8 or fp8 e4m3) also keeps a float32 scale per slot, K/V and head
([slots, 2, kv_heads]): each head vector of a new token is scaled by its absolute maximum as it
is written, and reads multiply the scale back, so attention always sees the model dtype.
"""

from __future__ import annotations

import torch

# Largest code of each 8-bit cache dtype (config.KV_CACHE_DTYPES): a head vector's absolute maximum maps to it.
_CODE_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


class KVCache:
    def __init__(self, num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 cache_dtype: torch.dtype, device: torch.device):
        self.dtype = dtype  # what reads return
        # Zeroed, so every page is committed now: the memory is taken at start, not under traffic (and
        # the null block, where padded reads land, is finite).
        self.data = torch.empty(num_slots, 2, kv_heads, head_dim, dtype=cache_dtype, device=device).zero_()
        self.scale = (torch.empty(num_slots, 2, kv_heads, dtype=torch.float32, device=device).zero_()
                      if cache_dtype in _CODE_MAX else None)

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def write(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Store kv [T, 2, kv_heads, head_dim] into `slots` [T]."""
        if self.scale is None:
            self.data.index_copy_(0, slots, kv)
            return
        code_max = _CODE_MAX[self.data.dtype]
        scale = kv.abs().amax(dim=-1).float().clamp(min=1e-12) / code_max
        codes = (kv / scale[..., None]).clamp(-code_max, code_max)
        codes = codes.round().to(torch.int8) if self.data.dtype == torch.int8 else codes.to(self.data.dtype)
        # As bytes: index_copy_ has no CPU kernel for float8.
        self.data.view(torch.uint8).index_copy_(0, slots, codes.view(torch.uint8))
        self.scale.index_copy_(0, slots, scale)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots src -> dst (codes and scales); every source is read before any destination is written."""
        data = self.data.view(torch.uint8)  # as bytes: index_copy_ has no CPU kernel for float8
        data.index_copy_(0, dst, data.index_select(0, src))
        if self.scale is not None:
            self.scale.index_copy_(0, dst, self.scale.index_select(0, src))

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """The K/V of `slots` [n] as [n, 2, kv_heads, head_dim] in the model dtype."""
        data = self.data.index_select(0, slots)
        if self.scale is None:
            return data
        return (data.float() * self.scale.index_select(0, slots)[..., None]).to(self.dtype)

"""Linear layers in three forms behind one interface: float, int8 and int4 weight-only.

`Linear` stores its weight input-major ([in, out]) and computes x @ W: on CPU, MKL runs the
single-row products of batch-1 decode about 1.3-2x faster in this layout than in nn.Linear's
[out, in], and as fast for large batches. `Int8Linear` and `Int4Linear` keep [out, in] codes
in the layouts of PyTorch's weight-only kernels (quant.py).

On CPU, where tokenmill's own kernels are built (executor/kernels), both quantized layers hold
their weights packed for those kernels instead: integer dot products with int8 activations,
faster than PyTorch's kernels at every batch size and the same bits for a row whatever the
batch, so one form serves prefill and decode alike.

All three load the same way: `load("weight", [out, in] tensor, offset)` fills output rows
offset.., so fused projections (QKV, gate/up) load shard by shard. Quantized layers quantize
each shard as it arrives (scales never span rows) and build their kernel tensors once every
row is in, so a model never exists in float32 while it loads.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.config import WeightQuant
from tokenmill.errors import InvalidParameterError
from tokenmill.executor.kernels.packed import PackedWeight, kernels_fit, pack_q4, pack_q8
from tokenmill.executor.layers.quant import (
    int4_group_for, int4_mm, int4_scale_zero, int8_fits, int8_mm, int8_scale, pack_int4, quantize_int4, quantize_int8,
    quantize_q8_blocks,
)
from tokenmill.weight_formats import Int4Groups, Int8Blocks, LowBit, dense


def make_linear(in_features: int, out_features: int, bias: bool = False, quant: WeightQuant | None = None,
                names: tuple[str, ...] = (), split: str | None = None, world: int = 1):
    """The layer `quant` asks for the checkpoint weights `names` (the shards of a fused projection);
    float where the kernels cannot take the shape.

    Under tensor parallelism the layer is one rank's share of a `world` times larger one: `split`
    "column" holds out_features of its output rows, "row" in_features of its inputs. The share takes
    the form the whole layer would (a column share computes each of its outputs as the whole layer
    does; a row share holds whole groups); a share that cannot hold that form (int4 groups or int8
    blocks cut between ranks, int4 rows not in blocks of 16) is refused. PyTorch's per-channel int8
    (no tokenmill kernels) scales a row share's rows by the share's own maximum."""
    form = _form(in_features, out_features, quant, names)
    if split is not None and world > 1:
        whole = (in_features, out_features * world) if split == "column" else (in_features * world, out_features)
        if (whole_form := _form(*whole, quant, names)) != form:
            axis = "output rows" if split == "column" else "inputs"
            raise InvalidParameterError(
                "tensor_parallel_size", f"{names[0] if names else 'a projection'} ({whole[1]} x {whole[0]}) is "
                                        f"{_form_name(whole_form)} as a whole, but its share of {axis} on each of "
                                        f"{world} ranks ({out_features} x {in_features}) can only be "
                                        f"{_form_name(form)}; use a size whose shares hold whole groups")
    cls, group = form
    return cls(in_features, out_features, bias) if group is None else cls(in_features, out_features, bias, group)


def _form(in_features: int, out_features: int, quant: WeightQuant | None,
          names: tuple[str, ...]) -> tuple[type, int | None]:
    """(layer class, int4 group or None) of a layer of this shape."""
    method = quant.method_for(names) if quant is not None else None
    if method == "int8" and int8_fits(in_features):
        return Int8Linear, None
    if method == "int4":
        group = int4_group_for(in_features, out_features, quant.group_size)
        if group is not None:
            return Int4Linear, group
    return Linear, None


def _form_name(form: tuple[type, int | None]) -> str:
    cls, group = form
    return {Linear: "float", Int8Linear: "int8", Int4Linear: f"int4 in groups of {group}"}[cls]


class LinearBase(nn.Module):
    """The shared interface: an optional float bias and `load`, which checks shapes for every form."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load(self, kind: str, tensor: torch.Tensor | LowBit, offset: int = 0) -> None:
        """Copy a checkpoint tensor ("weight" [out, in] or "bias" [out]) into output rows offset..."""
        rows = tensor.shape[0]
        if kind == "bias":
            self.bias.data[offset:offset + rows].copy_(tensor)
            return
        if tensor.shape[1] != self.in_features or offset + rows > self.out_features:
            raise ValueError(f"weight of shape {tuple(tensor.shape)} does not fit a "
                             f"({self.out_features}, {self.in_features}) projection")
        self._load_weight(tensor, offset)

    def _load_weight(self, weight: torch.Tensor | LowBit, offset: int) -> None:
        raise NotImplementedError


class Linear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.weight = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x, self.weight)

    def _load_weight(self, weight, offset):
        self.weight.data[:, offset:offset + weight.shape[0]].copy_(dense(weight).t())


class _QuantizedLinear(LinearBase):
    """Stages quantized rows while loading; `_pack` builds the kernel tensors when all are in."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias)
        self._rows_loaded = 0
        self.kernel_weight: PackedWeight | None = None  # set by _pack where tokenmill's kernels run it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        return y if self.bias is None else y + self.bias

    def _load_weight(self, weight, offset):
        self._stage(weight, offset)
        self._rows_loaded += weight.shape[0]
        if self._rows_loaded == self.out_features:
            self._pack()


class Int8Linear(_QuantizedLinear):
    """int8 codes [out, in]: with tokenmill's kernels, one scale per block of 32 inputs (as GGUF's Q8_0;
    Int8Blocks, from Q8_0 and Q5_0 files, are kept exactly); with PyTorch's, one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(0))  # set once loaded
        self._staged_scale: torch.Tensor | None = None

    def _stage(self, weight, offset):
        if _use_kernels(self):
            blocks = weight if isinstance(weight, Int8Blocks) else quantize_q8_blocks(dense(weight))
            q, scale = blocks.q, blocks.d
        else:
            q, scale = quantize_int8(dense(weight))
        if self._staged_scale is None:
            self._staged_scale = torch.empty(self.out_features, *scale.shape[1:])
        self.weight[offset:offset + q.shape[0]] = q
        self._staged_scale[offset:offset + q.shape[0]] = scale

    def _pack(self):
        if _use_kernels(self):
            self.kernel_weight = pack_q8(self.weight, self._staged_scale)
            self.weight, self.scale = self.kernel_weight.codes, self.kernel_weight.scales
        else:
            self.scale = int8_scale(self._staged_scale, self.weight.device)
        self._staged_scale = None

    def _matmul(self, x):
        if self.kernel_weight is not None:
            return self.kernel_weight.matmul(x).to(x.dtype)
        return int8_mm(x, self.weight, self.scale)


class Int4Linear(_QuantizedLinear):
    """int4 codes in the kernel's packed layout, with a scale and zero per group of `group` inputs.

    GGUF Q4_0/Q4_1/Q4_K tensors arrive as Int4Groups of 32 and are kept as they are when the
    layer's group is 32; anything else is (re)quantized to the layer's group.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group: int = 32):
        super().__init__(in_features, out_features, bias)
        self.group = group
        # Empty until loaded; they are on the model's device, where the packed tensors go.
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("scale_zero", torch.empty(0))
        self._staged: Int4Groups | None = None

    def _stage(self, weight, offset):
        if not (isinstance(weight, Int4Groups) and weight.group == self.group):
            weight = quantize_int4(dense(weight), self.group)
        if self._staged is None:
            groups = (self.out_features, self.in_features // self.group)
            self._staged = Int4Groups(torch.empty(self.out_features, self.in_features, dtype=torch.uint8),
                                      torch.empty(groups), torch.empty(groups))
        rows = slice(offset, offset + weight.shape[0])
        for staged, part in zip((self._staged.q, self._staged.d, self._staged.m), (weight.q, weight.d, weight.m)):
            staged[rows] = part

    def _pack(self):
        device = self.packed.device
        if _use_kernels(self):
            repeat = self.group // 32  # the kernels' groups are 32: a larger group repeats its scales
            d, m = (t.repeat_interleave(repeat, dim=1) for t in (self._staged.d, self._staged.m))
            self.kernel_weight = pack_q4(self._staged.q, d, m)
            self.packed, self.scale_zero = self.kernel_weight.codes, self.kernel_weight.scales
        else:
            self.packed = pack_int4(self._staged.q, device)
            self.scale_zero = int4_scale_zero(self._staged, device)
        self._staged = None

    def _matmul(self, x):
        if self.kernel_weight is not None:
            return self.kernel_weight.matmul(x).to(x.dtype)
        return int4_mm(x, self.packed, self.group, self.scale_zero)


def _use_kernels(layer: LinearBase) -> bool:
    """tokenmill's packed kernels run the layer: on CPU, where they are built, for whole groups of 32."""
    device = next(layer.buffers()).device
    return device.type == "cpu" and kernels_fit(layer.in_features)

"""GGUF checkpoints (llama.cpp's format) read into Hugging Face terms.

A GGUF file carries the model's shape as metadata, the tokenizer and chat template, and tensors under
llama.cpp's names, often block-quantized. `load_gguf` turns the metadata into a transformers config
(so `ModelConfig.from_hf` and the RoPE code work unchanged) and the tokenizer into a fast tokenizer;
`GGUFCheckpoint.weights` then dequantizes one tensor at a time, under Hugging Face's names and layout,
so a quantized file never has to be expanded to float32 all at once. With `packed=True`, tensors
whose blocks the low-bit layers hold exactly come as they are instead: Q4_0, Q4_1 and Q4_K as
int4 groups of 32 (w = d q + m), Q8_0 and Q5_0 as int8 blocks of 32 (w = d q). `native_forms`
says which form each projection runs in by default: int4 for those 4-bit types, int8 for every
other quantized type (Q5_1, Q6_K, Q5_K, Q3_K, Q2_K are requantized to 8-bit blocks: closer to the
file's values than 4 bits, see benchmarks/quant_quality.py).

Parsing a GGUF's metadata (a string per vocabulary entry), converting its tokenizer and
importing transformers' model configs take seconds; what they produce (config, tokenizer,
chat template, each tensor's place in the file) is saved under the tokenmill cache folder,
keyed by the file's path, size and modification time, and the next load reads that and maps
the file's tensors without parsing it (`_load_indexed`).
"""

from __future__ import annotations

import hashlib

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import json
from typing import NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from tokenmill.cache import cache_root
from tokenmill.errors import ModelLoadError
from tokenmill.weight_formats import Int4Groups, Int8Blocks, LowBit

Q = GGMLQuantizationType
# Tensor types `weights` can dequantize; every other type is refused before any data is read.
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
})

# Q4_0 / Q4_1 block layout: fp16 d (and fp16 m for Q4_1), then 16 bytes of 4-bit codes; byte j holds
# element j in its low nibble and element j + 16 in its high one. Values: Q4_0 d * (q - 8), Q4_1 d * q + m.
_INT4_BLOCKS = {Q.Q4_0: 18, Q.Q4_1: 20}  # bytes per block of 32
_INT4_TYPES = frozenset({*_INT4_BLOCKS, Q.Q4_K})  # held exactly by int4 groups of 32
_INT8_EXACT = frozenset({Q.Q8_0, Q.Q5_0})  # held exactly by int8 blocks of 32
_FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})

# general.architecture -> (transformers config class, HF architecture name, whether llama.cpp permuted
# attn_q/attn_k). Classes by name: importing one takes seconds, and a cached load needs none.
_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", True),
    "mistral": ("MistralConfig", "MistralForCausalLM", True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", False),
}
INDEX_FORMAT = 1  # of the cached index (_save_index); a change makes every old index a miss

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BIASED = {"attn_q", "attn_k", "attn_v", "attn_output"}
_QWEN3_ONLY = {"attn_q_norm", "attn_k_norm"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp's encoding of Llama 3.1-style RoPE scaling: per-frequency divisors instead of metadata.
_ROPE_FREQS = "rope_freqs.weight"


class _Tensor(NamedTuple):
    """What weights() needs of a GGUF tensor: its raw data, a view of the mapped file."""

    name: str
    tensor_type: GGMLQuantizationType
    data: np.ndarray


@dataclass
class GGUFCheckpoint:
    """A parsed GGUF file: config, tokenizer and chat template now; weights on demand."""

    hf_config: object  # a transformers PretrainedConfig
    tokenizer: object | None  # a transformers PreTrainedTokenizerFast
    chat_template: str | None
    _mapped: np.ndarray = field(repr=False)  # the file, mapped (the tensors' data are views of it)
    # (HF name, GGUF tensor, head count to un-permute the rows by, or None)
    _plan: list[tuple[str, _Tensor, int | None]] = field(repr=False)

    def weights(self, packed: bool = False) -> Iterator[tuple[str, torch.Tensor | LowBit]]:
        """Yield (HF name, float32 tensor in HF shape) one at a time, so only one tensor is expanded at once.

        With `packed`, Q4_0/Q4_1/Q4_K tensors are yielded as Int4Groups and Q8_0/Q5_0 ones as Int8Blocks.
        """
        for name, tensor, n_head in self._plan:
            if packed and tensor.tensor_type in _INT4_TYPES:
                weight = int4_groups(tensor.data, tensor.tensor_type)
            elif packed and tensor.tensor_type in _INT8_EXACT:
                weight = int8_blocks(tensor.data, tensor.tensor_type)
            else:
                array = dequantize(tensor.data, tensor.tensor_type)
                # F32 data comes back as a view of the read-only memory map; torch wants memory it may write.
                weight = torch.from_numpy(array if array.flags.writeable else array.copy())
            if n_head is not None:
                weight = _unpermute(weight, n_head) if isinstance(weight, torch.Tensor) \
                    else weight.map_rows(lambda t, n=n_head: _unpermute(t, n))
            yield name, weight

    @property
    def native_forms(self) -> dict[str, str]:
        """Each layer projection weight's low-bit form ("int4" or "int8", see the module docstring); empty
        unless every projection is quantized (a file with float projections runs as float by default)."""
        projections = [(name, tensor.tensor_type) for name, tensor, _ in self._plan
                       if name.startswith("model.layers.") and name.endswith("proj.weight")]
        if not projections or any(qtype in _FLOAT_TYPES for _, qtype in projections):
            return {}
        return {name: "int4" if qtype in _INT4_TYPES else "int8" for name, qtype in projections}


def int4_groups(raw: np.ndarray, qtype: GGMLQuantizationType) -> Int4Groups:
    """A Q4_0/Q4_1/Q4_K tensor's raw blocks [rows, bytes] as Int4Groups (w = d q + m), exactly:
    Q4_0 is m = -8d, Q4_1 its own m, Q4_K's sub-blocks d = d_super * scale and m = -dmin * min."""
    if qtype == Q.Q4_K:
        return _q4_k_groups(raw)
    rows = raw.shape[0]
    blocks = torch.from_numpy(np.array(raw)).view(rows, -1, _INT4_BLOCKS[qtype])  # a copy: the map is read-only
    d = _half(blocks[..., 0:2])
    codes = blocks[..., -16:]
    q = torch.cat([codes & 0x0F, codes >> 4], dim=-1).reshape(rows, -1)
    m = -8 * d if qtype == Q.Q4_0 else _half(blocks[..., 2:4])
    return Int4Groups(q, d, m)


def _q4_k_groups(raw: np.ndarray) -> Int4Groups:
    """Q4_K: super-blocks of 256 (144 bytes: fp16 d and dmin, 12 bytes of 6-bit scales and mins for eight
    sub-blocks of 32, 128 bytes of codes; 64 elements per 32 bytes, low nibbles first). Values are
    (d * scale) * q - dmin * min in float32, as llama.cpp and the gguf package compute them."""
    rows = raw.shape[0]
    blocks = torch.from_numpy(np.array(raw)).view(rows, -1, 144).to(torch.int32)
    d, dmin = _half(blocks[..., 0:2]), _half(blocks[..., 2:4])
    s = blocks[..., 4:16]
    low = s[..., 0:4] & 63, s[..., 4:8] & 63  # scales and mins of sub-blocks 0-3
    high = ((s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4), (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4))
    scale, minimum = (torch.cat([lo, hi], dim=-1).float() for lo, hi in zip(low, high))
    codes = blocks[..., 16:].view(rows, -1, 4, 1, 32)
    q = torch.cat([codes & 0x0F, codes >> 4], dim=-2).reshape(rows, -1).to(torch.uint8)
    return Int4Groups(q, (d[..., None] * scale).reshape(rows, -1), (-(dmin[..., None] * minimum)).reshape(rows, -1))


def int8_blocks(raw: np.ndarray, qtype: GGMLQuantizationType) -> Int8Blocks:
    """A Q8_0 (fp16 d, 32 int8 codes) or Q5_0 tensor's raw blocks as Int8Blocks, exactly. Q5_0 (22 bytes:
    fp16 d, 32 high bits, 16 bytes of low nibbles as Q4_0's) is d * (q - 16), a code in -16..15."""
    rows = raw.shape[0]
    blocks = torch.from_numpy(np.array(raw)).view(rows, -1, 34 if qtype == Q.Q8_0 else 22)
    d = _half(blocks[..., 0:2])
    if qtype == Q.Q8_0:
        return Int8Blocks(blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, -1), d)
    high = blocks[..., 2:6].contiguous().view(torch.int32)  # little-endian: bit j is element j's fifth bit
    bits = (high >> torch.arange(32, dtype=torch.int32)) & 1
    codes = blocks[..., 6:].to(torch.int32)
    low = torch.cat([codes & 0x0F, codes >> 4], dim=-1)
    return Int8Blocks((low | (bits << 4)).sub(16).to(torch.int8).reshape(rows, -1), d)


def _half(two_bytes: torch.Tensor) -> torch.Tensor:
    """float16 values stored as [..., 2] bytes, in float32."""
    return two_bytes.to(torch.uint8).contiguous().view(torch.float16).squeeze(-1).float()


def load_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a GGUF file's metadata, tokenizer and tensor index; tensor data is left in the memory map.

    Everything that can make loading fail (architecture, tensor names and types, tokenizer) is checked
    here, so iterating `weights()` later cannot fail halfway through a model. A file loaded before
    comes from its cached index (see the module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    cache = _cache_dir(path)
    if cache is not None and (cache / "index.json").is_file():
        try:
            return _load_indexed(path, cache)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable or outdated index: parse the file again
    ckpt = _parse(path, cache)
    if cache is not None:
        _save_index(ckpt, cache)
    return ckpt


def _parse(path: Path, cache: Path | None) -> GGUFCheckpoint:
    try:
        reader = FastGGUFReader(path)
    except (ValueError, IndexError, OSError) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from exc

    arch = _meta(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{path.name}: unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHITECTURES)}")
    _check_types(reader)
    tensors = {t.name: t for t in reader.tensors}
    hf_config = _build_config(reader, arch, tensors)
    chat_template = _meta(reader, "tokenizer.chat_template", None)
    plan = [(name, _Tensor(t.name, t.tensor_type, t.data), n_head)
            for name, t, n_head in _plan_tensors(tensors, arch, hf_config)]
    # A plain config of the same attributes, as a cached load makes: both loads give the same object.
    return GGUFCheckpoint(
        hf_config=_plain_config(hf_config.to_dict()),
        tokenizer=_load_tokenizer(reader, path, chat_template, cache),
        chat_template=chat_template,
        _mapped=reader.data,
        _plan=plan,
    )


def _save_index(ckpt: GGUFCheckpoint, cache: Path) -> None:
    """Write what _load_indexed needs (the tokenizer is already saved there); a read-only cache only
    costs the parse next time."""
    base = ckpt._mapped.__array_interface__["data"][0]
    plan = [[name, t.name, int(t.tensor_type), t.data.dtype.str, list(t.data.shape),
             t.data.__array_interface__["data"][0] - base, n_head] for name, t, n_head in ckpt._plan]
    index = {"format": INDEX_FORMAT, "config": ckpt.hf_config.to_dict(), "chat_template": ckpt.chat_template,
             "tokenizer": ckpt.tokenizer is not None, "plan": plan}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f"index.json.{os.getpid()}"
        partial.write_text(json.dumps(index))
        partial.replace(cache / "index.json")  # whole or absent, even with two loads at once
    except OSError:
        pass


def _load_indexed(path: Path, cache: Path) -> GGUFCheckpoint:
    index = json.loads((cache / "index.json").read_text())
    if index["format"] != INDEX_FORMAT:
        raise ValueError("index of another format")
    mapped = np.memmap(path, mode="r")
    plain = mapped.view(np.ndarray)  # slicing a plain view skips np.memmap's per-slice hooks
    plan = []
    for name, tensor_name, qtype, dtype, shape, offset, n_head in index["plan"]:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if offset + nbytes > len(plain):
            raise ValueError("the file is shorter than its index says")
        data = plain[offset:offset + nbytes].view(dtype).reshape(shape)
        plan.append((name, _Tensor(tensor_name, Q(qtype), data), n_head))
    tokenizer = None
    if index["tokenizer"]:
        from transformers import PreTrainedTokenizerFast  # not AutoTokenizer: half the import time

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(cache))
        tokenizer.chat_template = index["chat_template"]
    return GGUFCheckpoint(_plain_config(index["config"]), tokenizer, index["chat_template"], mapped, plan)


def _plain_config(values: dict):
    """A transformers PretrainedConfig holding `values` as attributes (model_type included): all the
    engine reads, without importing the model's own config class."""
    from transformers import PretrainedConfig

    config = PretrainedConfig(**values)
    config.model_type = values["model_type"]
    return config


class FastGGUFReader(GGUFReader):
    """The gguf package's reader, its many small reads (one per vocabulary string: 49K for
    SmolLM2) slicing a plain ndarray view of the mapped file instead of the np.memmap itself,
    whose per-slice Python hooks took three quarters of the 4 s parse. Same bytes, same fields."""

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


_REQUIRED = object()


def _meta(reader: GGUFReader, key: str, default=_REQUIRED):
    """A metadata value, or `default`; a missing required key is a load error naming it."""
    value = reader.get_field(key)
    if value is None:
        if default is _REQUIRED:
            raise ModelLoadError(f"GGUF metadata key {key!r} is missing")
        return default
    return value.contents()


def _check_types(reader: GGUFReader) -> None:
    """Refuse the file up front if any tensor has a type we cannot dequantize."""
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise ModelLoadError(
                f"GGUF tensor {tensor.name!r} has unsupported type {tensor.tensor_type.name}; "
                f"supported types: {supported}")


def _build_config(reader: GGUFReader, arch: str, tensors: dict[str, ReaderTensor]):
    """The transformers config llama.cpp's metadata describes, so the rest of tokenmill sees an HF model."""
    import transformers

    class_name, hf_arch, _ = _ARCHITECTURES[arch]
    config_class = getattr(transformers, class_name)
    if "token_embd.weight" not in tensors:
        raise ModelLoadError("GGUF file has no token_embd.weight tensor")
    embedding_rows = int(tensors["token_embd.weight"].shape[-1])  # ggml order: (hidden, vocab)
    tokens = _meta(reader, "tokenizer.ggml.tokens", None)
    vocab_size = len(tokens) if tokens is not None else embedding_rows
    if vocab_size != embedding_rows:
        raise ModelLoadError(
            f"GGUF tokenizer has {vocab_size} tokens but token_embd.weight has {embedding_rows} rows")

    kwargs = dict(
        architectures=[hf_arch],
        vocab_size=vocab_size,
        num_hidden_layers=_meta(reader, f"{arch}.block_count"),
        max_position_embeddings=_meta(reader, f"{arch}.context_length"),
        hidden_size=_meta(reader, f"{arch}.embedding_length"),
        intermediate_size=_meta(reader, f"{arch}.feed_forward_length"),
        num_attention_heads=_meta(reader, f"{arch}.attention.head_count"),
        num_key_value_heads=_meta(reader, f"{arch}.attention.head_count_kv"),
        rms_norm_eps=_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=_meta(reader, "tokenizer.ggml.eos_token_id", None),
    )
    head_dim = _meta(reader, f"{arch}.attention.key_length", None)
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if arch != "qwen2":  # Qwen2 always has q/k/v biases; the others only when the file has them
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if arch == "mistral":
        kwargs["sliding_window"] = _meta(reader, f"{arch}.attention.sliding_window", None)
    head_dim = head_dim or kwargs["hidden_size"] // kwargs["num_attention_heads"]
    kwargs["rope_parameters"] = _rope_parameters(reader, arch, tensors, head_dim)
    return config_class(**kwargs)


def _rope_parameters(reader: GGUFReader, arch: str, tensors: dict[str, ReaderTensor], head_dim: int) -> dict:
    """HF `rope_parameters` from `{arch}.rope.*` metadata, or from a rope_freqs tensor (Llama 3.1 style)."""
    theta = float(_meta(reader, f"{arch}.rope.freq_base", 10000.0))
    scaling = _meta(reader, f"{arch}.rope.scaling.type", "none")
    if _ROPE_FREQS in tensors:
        if scaling != "none":
            raise ModelLoadError(f"GGUF file has both {_ROPE_FREQS} and rope scaling type {scaling!r}")
        rope_dim = _meta(reader, f"{arch}.rope.dimension_count", head_dim)
        return _llama3_rope(tensors[_ROPE_FREQS], theta, rope_dim)
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": theta}
    factor = float(_meta(reader, f"{arch}.rope.scaling.factor"))
    if scaling == "linear":
        return {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    if scaling == "yarn":
        original = _meta(reader, f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                "rope_theta": theta}
    raise ModelLoadError(f"unsupported GGUF rope scaling type {scaling!r}")


def _llama3_rope(tensor: ReaderTensor, theta: float, rope_dim: int) -> dict:
    """Recover HF's llama3 rope parameters from llama.cpp's per-frequency divisors.

    llama.cpp stores only the divisors f_i. In the transition band they satisfy
    1/f_i = (1-s_i)/factor + s_i with s_i = (old_ctx * inv_freq_i / 2pi - low) / (high - low), a line in
    inv_freq_i; only its slope and intercept are identifiable, so low_freq_factor is taken as 1 (as in
    every Llama 3.x release). The parameters are accepted only if they reproduce the stored divisors.
    """
    divisors = dequantize(tensor.data, tensor.tensor_type).astype(np.float64).reshape(-1)
    if np.allclose(divisors, 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    inv_freq = 1.0 / theta ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    factor = float(divisors.max())
    band = (divisors > 1.0 + 1e-4) & (divisors < factor * (1.0 - 1e-4))
    unrecognised = ModelLoadError(f"GGUF {tensor.name} does not match Llama 3-style rope scaling")
    if band.sum() < 2 or len(divisors) != len(inv_freq):
        raise unrecognised
    smooth = (1.0 / divisors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
    slope, intercept = np.polyfit(inv_freq[band], smooth, 1)
    if intercept >= 0:
        raise unrecognised
    old_ctx = round(-2 * np.pi * slope / intercept)
    high = round(1.0 - 1.0 / intercept, 4)
    if not np.allclose(_llama3_divisors(inv_freq, factor, high, old_ctx), divisors, rtol=1e-3):
        raise unrecognised
    return {"rope_type": "llama3", "factor": round(factor, 4), "low_freq_factor": 1.0, "high_freq_factor": high,
            "original_max_position_embeddings": old_ctx, "rope_theta": theta}


def _llama3_divisors(inv_freq: np.ndarray, factor: float, high: float, old_ctx: int) -> np.ndarray:
    """The divisors llama.cpp's converter (and HF's llama3 RoPE) apply to each inverse frequency, low_freq_factor 1."""
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_ctx / wavelen - 1.0) / (high - 1.0)
    divisors = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx, factor, divisors))


def _plan_tensors(tensors: dict[str, ReaderTensor], arch: str, config) -> list[tuple[str, ReaderTensor, int | None]]:
    """Map every GGUF tensor to its HF name (and un-permute head count); unknown tensors are an error."""
    permuted = _ARCHITECTURES[arch][2]
    plan, unknown = [], []
    for name, tensor in tensors.items():
        if name == _ROPE_FREQS:  # folded into config.rope_parameters
            continue
        n_head = None
        if name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[name]
        else:
            match = _LAYER_TENSOR.fullmatch(name)
            if match is None:
                unknown.append(name)
                continue
            layer, part, kind = match.groups()
            if (part not in _LAYER_NAMES or int(layer) >= config.num_hidden_layers
                    or (kind == "bias" and part not in _BIASED)
                    or (part in _QWEN3_ONLY and arch != "qwen3")):
                unknown.append(name)
                continue
            hf_name = f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
            if permuted and part in ("attn_q", "attn_k"):
                n_head = config.num_attention_heads if part == "attn_q" else config.num_key_value_heads
                rows = int(tensor.shape[-1])  # ggml order: the output dimension is last
                if rows % (2 * n_head):
                    raise ModelLoadError(f"GGUF tensor {name} has {rows} rows, not a multiple of 2 x {n_head} heads")
        plan.append((hf_name, tensor, n_head))
    if unknown:
        raise ModelLoadError(f"unknown tensors in {arch} GGUF file: {', '.join(unknown)}")
    return plan


def _unpermute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's half-split rotate_half)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _load_tokenizer(reader: GGUFReader, path: Path, chat_template: str | None, cache: Path | None):
    """transformers' own GGUF tokenizer conversion, saved into `cache`; None when the file embeds no
    tokenizer. (The conversion parses the whole file again: seconds for a 49k-token vocabulary.)"""
    from transformers import AutoTokenizer

    if reader.get_field("tokenizer.ggml.model") is None:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises assorted types for a vocabulary it cannot convert
        raise ModelLoadError(f"cannot build a tokenizer from {path.name}: {exc}") from exc
    if cache is not None:
        try:
            tokenizer.save_pretrained(str(cache))
        except OSError:
            pass  # a read-only cache only costs the conversion next time
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _cache_dir(path: Path) -> Path | None:
    """<cache_root()>/gguf/<key of this file>; None if the cache is disabled."""
    root = cache_root()
    if root is None:
        return None
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    return root / "gguf" / key

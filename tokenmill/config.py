"""Configuration: the model's shape (from a Hugging Face config) and the engine's knobs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from tokenmill.errors import InvalidParameterError


@dataclass
class ModelConfig:
    """The shape facts the runner needs, read from a transformers PretrainedConfig."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    sliding_window: int | None
    hf_config: object  # the transformers config, kept for RoPE parameters

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        architecture = architecture_of(hf)
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        window = getattr(hf, "sliding_window", None)
        if hf.model_type in ("qwen2", "qwen3") and not getattr(hf, "use_sliding_window", False):
            window = None
        return cls(
            architecture=architecture,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", False)) or hf.model_type == "qwen2",
            qk_norm=hf.model_type == "qwen3",
            sliding_window=window,
            hf_config=hf,
        )

    def kv_bytes_per_token(self, kv_dtype: torch.dtype) -> int:
        """Cache bytes of one token over all layers, the scales of an 8-bit cache included."""
        per_head = self.head_dim * kv_dtype.itemsize + (KV_SCALE_BYTES if kv_dtype in KV_CACHE_DTYPES.values() else 0)
        return 2 * self.num_layers * self.num_kv_heads * per_head


def architecture_of(hf) -> str:
    """The model class name a transformers config asks for ("LlamaForCausalLM", ...)."""
    archs = getattr(hf, "architectures", None) or []
    if archs:
        return archs[0]
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(hf.model_type, hf.model_type)


# 8-bit KV cache dtypes; each keeps a float32 scale per token, K/V and KV head.
KV_CACHE_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
KV_SCALE_BYTES = 4


def resolve_kv_cache_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """"auto" caches K/V in the model dtype; "int8" and "fp8_e4m3" in 8 bits with scales."""
    if name == "auto":
        return dtype
    if name not in KV_CACHE_DTYPES:
        raise InvalidParameterError("kv_cache_dtype", f"unknown KV cache dtype {name!r}; use auto, int8 or fp8_e4m3")
    return KV_CACHE_DTYPES[name]


@dataclass(frozen=True)
class WeightQuant:
    """How the linear layers hold their weights: "int8" or "int4" (in groups), or "native": each as the
    checkpoint stores it (`forms`: checkpoint weight name -> "int4" / "int8", for a GGUF of mixed types)."""

    method: str
    group_size: int = 32
    forms: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def method_for(self, names: Iterable[str]) -> str:
        """The form of a projection made of these checkpoint weights. Under "native" it is their own:
        int8 when any fused shard is int8 (8-bit blocks hold a 4-bit shard closely, the reverse loses
        bits), else int4."""
        if self.method != "native":
            return self.method
        return "int4" if all(self.forms.get(name) == "int4" for name in names) else "int8"


QUANTIZATIONS = ("auto", "none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's int4 kernels accept


def resolve_quantization(name: str | None, native: Mapping[str, str], group_size: int) -> WeightQuant | None:
    """The weight form to run: "auto" keeps the checkpoint's own low-bit forms (`native`: projection
    weight name -> "int4" or "int8", every projection of a quantized GGUF; empty for float checkpoints).
    A checkpoint of one form runs as that form; one of mixed types (Q4_K_M) runs each projection in its own.
    """

    name = "auto" if name is None else name
    if name not in QUANTIZATIONS:
        raise InvalidParameterError("quantization", f"unknown quantization {name!r}; use {', '.join(QUANTIZATIONS)}")
    if group_size not in INT4_GROUP_SIZES:
        raise InvalidParameterError("quantization_group_size",
                                    f"{group_size} is not one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    if name == "auto":
        forms = set(native.values())
        name = "none" if not forms else forms.pop() if len(forms) == 1 else "native"
    return None if name == "none" else WeightQuant(name, group_size, native if name == "native" else {})


def parse_memory(value: int | float | str | None, param: str = "kv_cache_memory") -> int | None:
    """Bytes from 2147483648, 2.5e9, "2GiB", "512MiB" or "4GB"; None stays None; `param` names it in errors."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    text = value.strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    unit = next((u for u in units if text.endswith(u)), "")
    try:
        size = float(text[: len(text) - len(unit)]) * units.get(unit, 1)
    except ValueError:
        raise InvalidParameterError(param, f"{value!r} is not a size: write bytes or a number with "
                                                       "a unit, like 2GiB, 512MiB or 4e9") from None
    if not 0 < size < float("inf"):
        raise InvalidParameterError(param, f"{value!r} must be a positive size")
    return int(size)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 on CPU.

    Not bfloat16 on CPUs with native bf16 either: measured on one with AVX512-BF16 (SmolLM2-135M),
    bf16 activations ran no faster with int4 or int8 weights (whose kernels take bf16 inputs
    anyway) and 25-30% slower at batch 1 with float weights, and their extra rounding broke a
    first-token near-tie, so the greedy answer to "What is the capital of France?" lost "Paris".
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise InvalidParameterError("dtype", f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


@dataclass
class EngineConfig:
    """Knobs of the engine loop, the KV pool and the scheduler (vLLM's names)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: what max_num_seqs full contexts need, capped below
    kv_cache_fraction: float = 0.05  # the default pool's cap: this share of the machine's (or GPU's) total memory
    enable_prefix_caching: bool = True


@dataclass
class EnergyConfig:
    """How the engine meters energy and prices time (see tokenmill.metering)."""

    energy_meter: str = "auto"  # auto, rapl, nvml, estimate or none
    cpu_watts_per_core: float = 10.0  # the estimator's power model (used only when no counter is readable)
    idle_watts: float = 0.0
    price_per_hour: float | None = None  # USD per hour of machine time
    energy_price: float | None = None  # USD per kWh

"""Configuration: the model's shape (from a Hugging Face config) and the engine's knobs.

`EngineConfig` holds every engine option, nested by concern (model, cache, scheduler,
quantization, speculation, metering). Each option is declared once, by `option(...)`: its
default, its help and what argparse needs besides; the CLI's engine flags are generated from
these declarations and `LLMEngine(**options)` / `LLM(**options)` take the same flat names
(`EngineConfig.from_kwargs`).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, ClassVar

import torch

from tokenmill.errors import InvalidParameterError, UnknownOptionError


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

    def tensor_parallel_share(self, size: int) -> "ModelConfig":
        """The shape one of `size` tensor-parallel ranks holds: its share of the query heads, the KV heads
        and the MLP's width (the vocabulary stays whole here: the embedding and output head split it
        themselves). A size that does not divide each of them, and the vocabulary, is refused."""
        for count, what in ((self.num_heads, "attention heads"), (self.num_kv_heads, "KV heads"),
                            (self.intermediate_size, "MLP width"), (self.vocab_size, "vocabulary")):
            if count % size:
                raise InvalidParameterError(
                    "tensor_parallel_size", f"{size} does not divide the model's {what} ({count}): every rank "
                                            f"must hold an equal share of them")
        return replace(self, num_heads=self.num_heads // size, num_kv_heads=self.num_kv_heads // size,
                       intermediate_size=self.intermediate_size // size)

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



# ---- engine options ---------------------------------------------------------------------------
#
# A leaf field is declared with `option(...)`; a nested sub-config with `section(...)`. The CLI
# (entrypoints/cli.py) turns every leaf into a flag: --<flag name with dashes>, its help followed
# by "(default: ...)", argparse's type taken from the default (int, float; a bool is a
# --x/--no-x pair) unless `type` says otherwise.


def option(default: Any = MISSING, help: str = "", *, factory: Any = None, flag: str | None = None,
           default_text: str | None = None, note: str | None = None, group: str | None = None, **cli) -> Any:
    """A config field declared once. `flag`: its flat name (LLMEngine's keyword, the CLI flag) when
    not the field's own; `default_text`: how help shows the default, when not the value itself;
    `note`: said after the default; `group`: the CLI's flag group, when not the section's; `cli`:
    more argparse arguments (type, choices, metavar)."""
    meta = {"help": help, "flag": flag, "default_text": default_text, "note": note, "group": group, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type) -> Any:
    """A nested sub-config (its options keep their flat names)."""
    return field(default_factory=cls, metadata={"section": cls})


def memory_size(text: str) -> str:
    """A size option's value as written ("2GiB", "512MiB", 4e9), checked here and parsed by the config."""
    parse_memory(text)
    return text


@dataclass(frozen=True)
class EngineOption:
    """One leaf of EngineConfig: its flat name, where it sits, and its declaration."""

    name: str  # the flat name: LLMEngine's keyword argument, the CLI flag with dashes
    path: tuple[str, ...]  # attribute path inside EngineConfig, e.g. ("scheduler", "policy", "name")
    field: Any  # the dataclasses.Field
    group: str  # the CLI's flag group

    @property
    def default(self) -> Any:
        return None if self.field.default is MISSING else self.field.default

    @property
    def help(self) -> str:
        """The help with its default, as `--help` shows it."""
        meta = self.field.metadata
        shown = meta["default_text"]
        if shown is None and self.field.default not in (MISSING, None):
            shown = _shown(self.field.default)
        if meta["note"]:
            shown = f"{shown}, {meta['note']}" if shown else meta["note"]
        return f"{meta['help']} (default: {shown})" if shown else meta["help"]


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _options(cls: type, path: tuple[str, ...] = ()) -> Iterable[EngineOption]:
    for f in fields(cls):
        if "section" in f.metadata:
            yield from _options(f.metadata["section"], (*path, f.name))
        elif "help" in f.metadata:
            yield EngineOption(f.metadata["flag"] or f.name, (*path, f.name), f, f.metadata["group"] or cls.GROUP)


def engine_options() -> list[EngineOption]:
    """Every engine option, in the order the CLI lists them."""
    return list(_options(EngineConfig))


def _check_at_least_one(config: object, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise InvalidParameterError(name, f"must be at least 1, got {getattr(config, name)}")


@dataclass
class ModelOptions:
    """Which model, in what dtype, on what device."""

    GROUP: ClassVar[str] = "engine"

    source: Any = option(None, "Hugging Face folder, .gguf file or hub id", flag="model",
                         default_text="the embedded SmolLM2-135M-Instruct")  # or a loaded Checkpoint
    dtype: str | torch.dtype = option("auto", "auto, float32, bfloat16 or float16")
    device: str | None = option(None, "cpu or cuda", default_text="cuda if available")
    seed: int | None = option(None, "random seed (sampling; bench prompt sets)", type=int)
    max_model_len: int | None = option(None, "context length", default_text="the model's, as fits", type=int)
    chat_template: str | None = option(
        None, "a jinja chat template, or the path of a file holding one, to use instead of the checkpoint's; one "
              "that does not parse stops the start", default_text="the checkpoint's", metavar="FILE_OR_TEMPLATE")
    tensor_parallel_size: int = option(
        1, "split the model over this many processes on this machine (tensor parallel; CPU: gloo, CUDA: NCCL, "
           "one GPU a rank); it must divide the attention heads, KV heads, MLP width and vocabulary")

    def __post_init__(self):
        _check_at_least_one(self, "tensor_parallel_size")


@dataclass
class CacheConfig:
    """The paged KV cache: block size, the pool's bytes, prefix caching, the cache's dtype."""

    GROUP: ClassVar[str] = "engine"

    block_size: int = option(16, "tokens per KV block")
    kv_cache_memory: int | None = option(None, 'KV cache size, e.g. "2GiB"', default_text="a share of free memory",
                                         type=memory_size)  # bytes once checked; None: sized by max_num_seqs
    kv_cache_fraction: float = option(0.05, "the default pool's cap: this share of the machine's (or GPU's) total "
                                            "memory")
    enable_prefix_caching: bool = option(True, "reuse the KV of prompt prefixes computed before")
    kv_cache_dtype: str = option("auto", "KV cache: auto (the model dtype), int8 or fp8_e4m3, with per-token, "
                                         "per-head scales", choices=("auto", *KV_CACHE_DTYPES))

    def __post_init__(self):
        self.kv_cache_memory = parse_memory(self.kv_cache_memory)
        _check_at_least_one(self, "block_size")
        if not 0 < self.kv_cache_fraction <= 1:
            raise InvalidParameterError("kv_cache_fraction", f"must be in (0, 1], got {self.kv_cache_fraction}")


POLICIES = ("fcfs", "priority", "aging", "sjf", "fair")


@dataclass
class PolicyConfig:
    """The knobs of every scheduling policy (engine/policy.py), each policy reading its own; checked when made."""

    GROUP: ClassVar[str] = "scheduling"

    name: str = option(
        "fcfs", "who runs first: fcfs (arrival), priority (the request's priority, lower first; preempts), aging "
                "(priority improving with waiting; preempts), sjf (shortest predicted remaining work first), fair "
                "(weighted fair share of tokens per tenant, the request's user)",
        flag="scheduling_policy", choices=POLICIES)
    aging_seconds: float = option(10.0, "aging: seconds of waiting worth one priority level",
                                  flag="priority_aging_seconds")
    sjf_seconds_per_token: float = option(
        0.1, "sjf: seconds of waiting worth one predicted output token, which bounds how long a long request can "
             "be overtaken")
    sjf_prompt_token_weight: float = option(0.5, "sjf: work of one prompt token still to prefill, in output tokens",
                                            note="measured on CPU; prefill is relatively cheaper on a GPU")
    sjf_long_prefill_tokens: int = option(
        512, "sjf: a prompt with this many tokens still to prefill waits while a decoding request ranked ahead of "
             "it runs, instead of stalling it")
    tenant_weights: dict[str, float] = option(
        help='fair: tenant weights, e.g. "alice=2,bob=1"; tenants not named weigh 1', factory=dict)

    def __post_init__(self):
        if self.name not in POLICIES:
            raise InvalidParameterError("scheduling_policy", f"unknown policy {self.name!r}; known: {', '.join(POLICIES)}")
        for name in ("aging_seconds", "sjf_seconds_per_token"):
            if not getattr(self, name) > 0:
                raise InvalidParameterError(name, f"must be positive, got {getattr(self, name)}")
        if not self.sjf_long_prefill_tokens >= 1:
            raise InvalidParameterError("sjf_long_prefill_tokens", f"must be at least 1, got {self.sjf_long_prefill_tokens}")
        if not self.sjf_prompt_token_weight >= 0:
            raise InvalidParameterError("sjf_prompt_token_weight", f"must be >= 0, got {self.sjf_prompt_token_weight}")
        self.tenant_weights = parse_tenant_weights(self.tenant_weights)
        for tenant, weight in self.tenant_weights.items():
            if not weight > 0:
                raise InvalidParameterError("tenant_weights", f"tenant {tenant!r}: weights must be positive, got {weight}")


def parse_tenant_weights(spec: str | dict[str, float] | None) -> dict[str, float]:
    """{"alice": 2.0, "bob": 1.0} from "alice=2,bob=1" (a dict passes through)."""
    if spec is None or isinstance(spec, dict):
        return dict(spec or {})
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        tenant, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if weight is None or not tenant.strip():
            raise InvalidParameterError("tenant_weights", f"{item!r}: need TENANT=WEIGHT, e.g. alice=2")
        weights[tenant.strip()] = weight
    return weights


@dataclass
class SchedulerConfig:
    """How much one step runs, and who runs first."""

    GROUP: ClassVar[str] = "engine"

    max_num_seqs: int = option(64, "most sequences in one step")
    max_num_batched_tokens: int = option(2048, "most tokens in one step")
    policy: PolicyConfig = section(PolicyConfig)

    def __post_init__(self):
        _check_at_least_one(self, "max_num_seqs", "max_num_batched_tokens")


@dataclass
class QuantizationConfig:
    """The weights' form (the checkpoint's own low-bit forms, or int8 / int4 made at load)."""

    GROUP: ClassVar[str] = "engine"

    method: str | None = option(
        "auto", "weights: int8 (per channel) or int4 (groups); auto keeps a GGUF's Q4_0/Q4_1 as int4 and Q8_0 as "
                "int8, none dequantizes to --dtype", flag="quantization", choices=QUANTIZATIONS)
    group_size: int = option(32, "int4 group size along the input axis", flag="quantization_group_size",
                             choices=INT4_GROUP_SIZES)


SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass
class SpeculativeConfig:
    """What speculative decoding to do: `LLM(speculative_config={...})`, `--speculative-config JSON` (vLLM's keys).

    method "ngram": prompt lookup, no second model; "draft": a smaller model with the same vocabulary."""

    method: str = "ngram"
    num_speculative_tokens: int = 4  # the most drafts per step; the controller may propose fewer, or none
    prompt_lookup_max: int = 4  # ngram: the longest suffix of the context looked up
    prompt_lookup_min: int = 1  # ngram: the shortest
    model: str | None = None  # draft: a Hugging Face folder, .gguf file or hub id (None: the default model)
    # draft: the checkpoint's layers to keep, in order: N (the first N) or a list of indices (e.g. the
    # first and last few: a self-speculative draft that skips the middle of the target)
    draft_layers: int | list[int] | None = None
    draft_dtype: str | None = None  # draft: its own dtype (None: the target's), e.g. bfloat16 under a float32 target
    draft_quantization: str | None = None  # draft: its own weights (None: the target's setting), e.g. int4
    adaptive: bool = True  # choose k per request from its acceptance and the measured step costs

    def __post_init__(self):
        if self.method not in SPECULATIVE_METHODS:
            raise InvalidParameterError("speculative_config.method", f"must be one of {', '.join(SPECULATIVE_METHODS)}, "
                                                                     f"got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"speculative_config.{name}", f"must be an integer >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise InvalidParameterError("speculative_config.prompt_lookup_min",
                                        f"{self.prompt_lookup_min} is above prompt_lookup_max {self.prompt_lookup_max}")
        layers = self.draft_layers
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = list(range(layers))
        if layers is not None and (not isinstance(layers, list) or not layers
                                   or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
                                   or len(set(layers)) < len(layers)):
            raise InvalidParameterError("speculative_config.draft_layers", "must be a number of layers >= 1 or a list "
                                        f"of distinct layer indices, got {self.draft_layers!r}")
        self.draft_layers = layers

    @classmethod
    def of(cls, value: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        """From a config, a dict, or a JSON object string (the CLI flag); None stays None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidParameterError("speculative_config", f"not a JSON object: {e}") from None
        if not isinstance(value, dict):
            raise InvalidParameterError("speculative_config", f"must be an object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidParameterError("speculative_config", f"unknown keys {unknown}; known: {sorted(known)}")
        return cls(**value)


@dataclass
class EnergyConfig:
    """How the engine meters energy and prices time (see tokenmill.metering)."""

    GROUP: ClassVar[str] = "energy and cost"

    energy_meter: str = option("auto", "auto, rapl, nvml, estimate or none; auto: RAPL and (on CUDA) NVML counters "
                                       "where readable, else estimated from CPU time")
    # the estimator's power model (used only when no counter is readable)
    cpu_watts_per_core: float = option(10.0, "estimator: Watts per busy core, charged per CPU second")
    idle_watts: float = option(0.0, "estimator: the machine's floor in Watts, charged per second of step time")
    price_per_hour: float | None = option(None, "machine cost in USD per hour", default_text="none", type=float)
    energy_price: float | None = option(None, "energy cost in USD per kWh", default_text="none", type=float)


@dataclass
class EngineConfig:
    """Every engine option, nested by concern; `from_kwargs` builds it from the flat names LLMEngine takes."""

    GROUP: ClassVar[str] = "engine"

    model: ModelOptions = section(ModelOptions)
    cache: CacheConfig = section(CacheConfig)
    scheduler: SchedulerConfig = section(SchedulerConfig)
    quantization: QuantizationConfig = section(QuantizationConfig)
    speculation: SpeculativeConfig | None = option(
        None, """e.g. '{"method": "ngram", "num_speculative_tokens": 4}' (prompt lookup) or '{"method": "draft", """
              """"model": PATH, "draft_layers": 8}'; keys: """ + ", ".join(f.name for f in fields(SpeculativeConfig)),
        flag="speculative_config", default_text="off", group="speculative decoding", metavar="JSON")
    metering: EnergyConfig = section(EnergyConfig)

    def __post_init__(self):
        self.speculation = SpeculativeConfig.of(self.speculation)

    @classmethod
    def from_kwargs(cls, **options: Any) -> "EngineConfig":
        """The config from flat option names (LLMEngine's keyword arguments); options left out keep their
        defaults, and a name no option has raises UnknownOptionError."""
        known = {o.name for o in engine_options()}
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else "`tokenmill serve --help` lists them"
                raise UnknownOptionError(name, f"not an engine option; {hint}")
        return _build(cls, options)

    def to_kwargs(self) -> dict[str, Any]:
        """The flat options (`from_kwargs(**config.to_kwargs())` equals the config)."""
        out = {}
        for o in engine_options():
            value = self
            for attr in o.path:
                value = getattr(value, attr)
            out[o.name] = value
        return out


def _build(cls: type, options: Mapping[str, Any]) -> Any:
    kwargs = {}
    for f in fields(cls):
        if "section" in f.metadata:
            kwargs[f.name] = _build(f.metadata["section"], options)
        elif (name := f.metadata.get("flag") or f.name) in options:
            kwargs[f.name] = options[name]
    return cls(**kwargs)

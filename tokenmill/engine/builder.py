"""Building an engine from its EngineConfig: the model, its sizing and the parts around it.

`build_engine(config)` loads the checkpoint, decides the KV pool's size and the context
length, and makes the tokenizer, accountant, block pool, KV manager, scheduler, output
processor, runner and speculator (with its draft model) that LLMEngine then drives.
`load_model` + `build_runner` are the one path from a checkpoint to a ModelRunner, taken by
the engine's model, by a draft model and by each tensor-parallel worker alike. With
tensor_parallel_size N, the engine's runner is rank 0 of N and the workers are started here.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass

import torch

from tokenmill.config import (
    EngineConfig, ModelConfig, SpeculativeConfig, WeightQuant, architecture_of, resolve_dtype, resolve_kv_cache_dtype,
    resolve_quantization,
)
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.policy import make_policy
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.tensor_parallel import TensorParallelWorkers, start_workers
from tokenmill.errors import InvalidParameterError
from tokenmill.executor.models.registry import model_class
from tokenmill.executor.parallel import TensorParallel
from tokenmill.executor.runner import ModelRunner
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.kv_cache_manager import KVCacheManager
from tokenmill.loader import Checkpoint, load_checkpoint
from tokenmill.metering.accounting import StepAccountant, make_accountant
from tokenmill.metering.roofline import ModelBytes
from tokenmill.sampling_params import SamplingParams, generation_defaults
from tokenmill.spec.draft_model import DraftModel
from tokenmill.spec.speculator import NoSpeculation, Speculator
from tokenmill.tokenizer import Tokenizer, custom_chat_template

log = logging.getLogger("tokenmill")

_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class MemoryReport:
    """What the loaded weights and the KV cache take, in bytes."""

    weights: str  # their form: "float32", "int8", "int4 g32", ...
    weight_bytes: int  # parameters and buffers, the float embedding included
    kv_cache_dtype: str
    kv_bytes_per_token: int  # all layers, K and V, scales of an 8-bit cache included
    kv_cache_tokens: int  # what the pool holds (the null block not counted)

    def __str__(self) -> str:
        kv_bytes = self.kv_bytes_per_token * self.kv_cache_tokens
        return (f"weights {self.weights} {self.weight_bytes / 2**20:.1f} MiB, KV cache {kv_bytes / 2**20:.1f} MiB "
                f"committed ({kv_bytes} bytes: {self.kv_cache_dtype}, {self.kv_bytes_per_token / 1024:.2f} KiB/token "
                f"x {self.kv_cache_tokens} tokens)")


@dataclass
class EngineParts:
    """What LLMEngine is made of (each becomes the engine attribute of the same name)."""

    config: EngineConfig
    model_name: str
    model_config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    quant: WeightQuant | None
    kv_cache_dtype: torch.dtype
    eos_token_ids: list[int]
    # generation_config.json's sampling fields: the defaults of what a request leaves out (vLLM's
    # --generation-config auto); checked at build, so that a bad file fails the start, not each request
    generation_defaults: dict
    tokenizer: Tokenizer | None
    accountant: StepAccountant
    max_model_len: int
    block_pool: BlockPool
    kv_cache: KVCacheManager
    scheduler: Scheduler
    output_processor: OutputProcessor
    runner: ModelRunner
    model_bytes: ModelBytes  # what a step reads, for metering and benchmarks
    speculator: Speculator | NoSpeculation
    memory_report: MemoryReport
    workers: TensorParallelWorkers | None  # the other tensor-parallel ranks' processes (None: one rank)


@dataclass
class LoadedModel:
    """A checkpoint with its shape and weight form decided: what build_runner makes a runner of."""

    ckpt: Checkpoint
    name: str
    model_config: ModelConfig
    dtype: torch.dtype
    quant: WeightQuant | None
    layers: list[int] | None = None  # the checkpoint's layers kept, in order (None: all)


def build_engine(config: EngineConfig) -> EngineParts:
    opts, cache, sched = config.model, config.cache, config.scheduler
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    target = load_model(opts.source, opts.dtype, device, config.quantization.method, config.quantization.group_size)
    ckpt, model_config, dtype = target.ckpt, target.model_config, target.dtype
    kv_cache_dtype = resolve_kv_cache_dtype(cache.kv_cache_dtype, dtype)
    eos_token_ids = _eos_ids(ckpt)
    defaults = generation_defaults(ckpt.generation_config)
    SamplingParams(**defaults)
    if defaults:
        log.info("tokenmill: defaults from the model's generation_config.json: %s", defaults)
    template = (ckpt.chat_template if opts.chat_template is None
                else custom_chat_template(ckpt.tokenizer, opts.chat_template))
    tokenizer = Tokenizer(ckpt.tokenizer, template, eos_token_ids) if ckpt.tokenizer else None
    accountant = make_accountant(config.metering, model_config, dtype, device)

    num_blocks, max_model_len = pool_size(config, model_config, kv_cache_dtype, device)
    capacity = (num_blocks - 1) * cache.block_size
    block_pool = BlockPool(num_blocks)
    kv_cache = KVCacheManager(block_pool, cache.block_size, cache.enable_prefix_caching)
    scheduler = Scheduler(kv_cache, make_policy(sched.policy, max_model_len), sched.max_num_seqs,
                          sched.max_num_batched_tokens, eos_token_ids, max_model_len)
    output_processor = OutputProcessor(tokenizer, eos_token_ids)
    runner, workers = _build_ranks(config, target, device, num_blocks, max_model_len, kv_cache_dtype)
    model_bytes = ModelBytes(*runner.byte_sizes())
    accountant.sizes = model_bytes
    speculator: Speculator | NoSpeculation = NoSpeculation()
    if config.speculation is not None:
        draft = None
        if config.speculation.method == "draft":
            draft = build_draft(config, target, device, num_blocks + 2 * sched.max_num_seqs, max_model_len)
        speculator = Speculator(config.speculation, max_model_len, sched.max_num_batched_tokens, draft)
    # This rank's (rank 0's) weights and cache: under tensor parallelism each rank holds its share.
    memory_report = MemoryReport(_weights_name(target.quant, dtype), runner.weight_bytes(), _dtype_name(kv_cache_dtype),
                                 runner.cfg.kv_bytes_per_token(kv_cache_dtype), capacity)
    return EngineParts(config, target.name, model_config, device, dtype, target.quant, kv_cache_dtype, eos_token_ids,
                       defaults, tokenizer, accountant, max_model_len, block_pool, kv_cache, scheduler,
                       output_processor, runner, model_bytes, speculator, memory_report, workers)


def _build_ranks(config: EngineConfig, target: LoadedModel, device: torch.device, num_blocks: int, max_model_len: int,
                 kv_cache_dtype: torch.dtype) -> tuple[ModelRunner, TensorParallelWorkers | None]:
    """The engine's runner and, with tensor_parallel_size N > 1, the processes of ranks 1..N-1: each loads its
    share while this one (rank 0) loads its own. Every KV pool has the same blocks, of each rank's KV heads."""
    size, cache = config.model.tensor_parallel_size, config.cache
    tp, workers = TensorParallel(), None
    if size > 1:
        target.model_config.tensor_parallel_share(size)  # a size that does not divide the heads fails before any start
        tp, workers = start_workers(config, device, num_blocks, max_model_len)
    try:
        runner = build_runner(target, device, num_blocks, cache.block_size, max_model_len, config.model.seed,
                              kv_cache_dtype, tp)
        if workers is not None:
            workers.ready()
    except BaseException:
        if workers is not None:
            workers.kill()
        raise
    return runner, workers


# ---- model -> runner --------------------------------------------------------------------------


def load_model(source, dtype: str | torch.dtype, device: torch.device, quantization: str | None,
               group_size: int, layers: list[int] | None = None) -> LoadedModel:
    """Load a checkpoint and decide its shape, dtype and weight form; with `layers`, only those layers
    (a draft's `draft_layers`: a truncated copy of a model needs no second file)."""
    ckpt = load_checkpoint(source)
    hf = ckpt.hf_config
    model_class(architecture_of(hf))  # unsupported architectures fail before anything else
    forms = ckpt.native_forms
    if layers is not None:
        if max(layers) >= hf.num_hidden_layers:
            raise InvalidParameterError("speculative_config.draft_layers",
                                        f"layer {max(layers)} is beyond the draft's {hf.num_hidden_layers} layers")
        hf = copy.deepcopy(hf)
        hf.num_hidden_layers = len(layers)
        forms = dict(_renumbered(forms.items(), layers))
    model_config = ModelConfig.from_hf(hf)
    dtype = resolve_dtype(dtype, device)
    quant = resolve_quantization(quantization, forms, group_size)
    name = ckpt.name if layers is None else f"{ckpt.name} (layers {layers})"
    return LoadedModel(ckpt, name, model_config, dtype, quant, layers)


def build_runner(model: LoadedModel, device: torch.device, num_blocks: int, block_size: int, max_model_len: int,
                 seed: int | None = None, kv_cache_dtype: torch.dtype | None = None,
                 tp: TensorParallel | None = None) -> ModelRunner:
    """The runner of a loaded model (with `tp`, of this rank's share of it) with a paged KV cache of
    `num_blocks` blocks. Quantized layers take a GGUF's low-bit blocks as they are (converting only
    where their form differs)."""
    weights = model.ckpt.weights(packed=model.quant is not None)
    if model.layers is not None:
        weights = _renumbered(weights, model.layers)
    return ModelRunner(model.model_config, weights, model.dtype, device, num_blocks, block_size, max_model_len,
                       seed, model.quant, kv_cache_dtype, tp)


def build_draft(config: EngineConfig, target: LoadedModel, device: torch.device, num_blocks: int,
                max_model_len: int) -> DraftModel:
    """The draft model of `speculative_config` (method "draft"): its own weights, runner and KV pool."""
    spec: SpeculativeConfig = config.speculation
    quant = config.quantization
    draft = load_model(spec.model, spec.draft_dtype or target.dtype, device, spec.draft_quantization or quant.method,
                       quant.group_size, spec.draft_layers)
    vocab = target.model_config.vocab_size
    if draft.model_config.vocab_size != vocab:
        raise InvalidParameterError("speculative_config.model", f"the draft's vocabulary has "
                                    f"{draft.model_config.vocab_size} tokens, the target's {vocab}: they must "
                                    "share one tokenizer")
    block_size = config.cache.block_size
    runner = build_runner(draft, device, num_blocks, block_size, max_model_len, config.model.seed)
    return DraftModel(runner, draft.name, num_blocks, block_size)


def _renumbered(weights, keep: list[int]):
    """The (name, value) pairs of the kept layers, renamed to their place in the model; other layers' dropped."""
    new_index = {old: new for new, old in enumerate(keep)}
    for name, tensor in weights:
        match = _LAYER.search(name)
        if match is None:
            yield name, tensor
        elif int(match.group(1)) in new_index:
            yield f"{name[:match.start()]}layers.{new_index[int(match.group(1))]}.{name[match.end():]}", tensor


# ---- sizing -----------------------------------------------------------------------------------


def pool_size(config: EngineConfig, model_config: ModelConfig, kv_cache_dtype: torch.dtype,
              device: torch.device) -> tuple[int, int]:
    """(KV blocks, the null block included; max_model_len) of an engine of `config` on `device`
    (the simulator sizes its replicas with it)."""
    num_blocks = _num_blocks(config, model_config, kv_cache_dtype, device)
    return num_blocks, _max_model_len(config.model.max_model_len, (num_blocks - 1) * config.cache.block_size,
                                      model_config)


def _num_blocks(config: EngineConfig, model_config: ModelConfig, kv_cache_dtype: torch.dtype,
                device: torch.device) -> int:
    per_block = model_config.kv_bytes_per_token(kv_cache_dtype) * config.cache.block_size
    return max(2, _kv_budget(config, model_config, kv_cache_dtype, device) // per_block + 1)  # +1: the null block


def _kv_budget(config: EngineConfig, model_config: ModelConfig, kv_cache_dtype: torch.dtype,
               device: torch.device) -> int:
    """The KV pool's bytes, decided here once and committed by the runner: kv_cache_memory, else
    what max_num_seqs full contexts need, at most kv_cache_fraction of the total memory (not of
    the free memory, which differs from one start to the next)."""
    total, available = _memory(device)
    budget = config.cache.kv_cache_memory
    if budget is not None:
        if budget > available:
            raise InvalidParameterError("kv_cache_memory", f"{budget / 2**30:.2f} GiB asked for the KV cache but "
                                                           f"only {available / 2**30:.2f} GiB is free")
        return budget
    context = config.model.max_model_len or model_config.max_position_embeddings
    need = config.scheduler.max_num_seqs * context * model_config.kv_bytes_per_token(kv_cache_dtype)
    budget = min(need, int(config.cache.kv_cache_fraction * total))
    if budget > available // 2:
        log.warning("the KV cache gets %.2f GiB, half the free memory, instead of %.2f GiB; set --kv-cache-memory "
                    "to choose", available / 2**31, budget / 2**30)
        budget = available // 2
    return budget


def _max_model_len(requested: int | None, capacity: int, model_config: ModelConfig) -> int:
    model_max = model_config.max_position_embeddings
    if requested is not None:
        if requested > capacity:
            raise InvalidParameterError(
                "max_model_len", f"{requested} tokens do not fit in the KV cache ({capacity} tokens); "
                                 "raise kv_cache_memory or lower max_model_len")
        return requested
    if capacity < model_max:
        log.warning("max_model_len lowered from %d to %d to fit the KV cache", model_max, capacity)
    return min(model_max, capacity)


def _memory(device: torch.device) -> tuple[int, int]:
    """(total, available) bytes of the memory the KV cache lives in."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    import psutil
    memory = psutil.virtual_memory()
    return memory.total, memory.available


# ---- names ------------------------------------------------------------------------------------


def _eos_ids(ckpt) -> list[int]:
    ids: list[int] = []
    for source in (ckpt.generation_config.get("eos_token_id"), getattr(ckpt.hf_config, "eos_token_id", None),
                   getattr(ckpt.tokenizer, "eos_token_id", None)):
        for i in source if isinstance(source, list) else [source]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _weights_name(quant: WeightQuant | None, dtype: torch.dtype) -> str:
    if quant is None:
        return _dtype_name(dtype)
    if quant.method == "native":
        return "int4 + int8 as the file stores them"
    return quant.method + (f" g{quant.group_size}" if quant.method == "int4" else "")

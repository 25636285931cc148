"""LLMEngine: the synchronous engine loop (add_request / step / abort_request).

Each step asks the scheduler what to run, has the runner make the plan's copy-on-write
block copies and compute and sample the chunks, registers newly full blocks in the prefix
cache, then appends tokens, detokenizes incrementally, applies stop conditions and frees the
KV blocks of finished sequences. Everything above it (the offline LLM, the CLI, the server)
drives this loop.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, replace
from numbers import Integral

import torch

from tokenmill.config import (
    EnergyConfig, EngineConfig, ModelConfig, WeightQuant, architecture_of, parse_memory, resolve_dtype, resolve_kv_cache_dtype,
    resolve_quantization,
)
from tokenmill.engine.policy import PolicyConfig, make_policy
from tokenmill.engine.output_processor import OutputProcessor, Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.stats import EngineStats, PhaseRoofline, PolicyStats
from tokenmill.errors import InvalidParameterError, require_unicode
from tokenmill.executor.models.registry import model_class
from tokenmill.executor.runner import ModelRunner
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.kv_cache_manager import KVCacheManager
from tokenmill.loader import load_checkpoint
from tokenmill.metering.accounting import make_accountant
from tokenmill.metering.roofline import ModelBytes, Roofline
from tokenmill.outputs import RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams, generation_defaults
from tokenmill.sequence import Sequence
from tokenmill.spec.config import SpeculativeConfig
from tokenmill.spec.draft_model import DraftModel
from tokenmill.spec.speculator import NoSpeculation, Speculator
from tokenmill.step_plan import ScheduledChunk, StepResult
from tokenmill.tokenizer import Tokenizer, custom_chat_template

log = logging.getLogger("tokenmill")


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


class LLMEngine:
    def __init__(self, model: str | None = None, *, dtype: str | torch.dtype = "auto", device: str | None = None,
                 seed: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, block_size: int = 16,
                 kv_cache_memory: int | float | str | None = None,
                 kv_cache_fraction: float = EngineConfig.kv_cache_fraction,
                 scheduling_policy: str = "fcfs", priority_aging_seconds: float = PolicyConfig.aging_seconds,
                 sjf_seconds_per_token: float = PolicyConfig.sjf_seconds_per_token,
                 sjf_prompt_token_weight: float = PolicyConfig.sjf_prompt_token_weight,
                 sjf_long_prefill_tokens: int = PolicyConfig.sjf_long_prefill_tokens,
                 tenant_weights: dict[str, float] | str | None = None, enable_prefix_caching: bool = True,
                 quantization: str | None = "auto", quantization_group_size: int = 32, kv_cache_dtype: str = "auto",
                 energy_meter: str = EnergyConfig.energy_meter,
                 cpu_watts_per_core: float = EnergyConfig.cpu_watts_per_core, idle_watts: float = EnergyConfig.idle_watts,
                 price_per_hour: float | None = None, energy_price: float | None = None,
                 speculative_config: SpeculativeConfig | dict | str | None = None, chat_template: str | None = None):
        self.config = EngineConfig(max_num_seqs, max_num_batched_tokens, max_model_len, block_size,
                                   parse_memory(kv_cache_memory), kv_cache_fraction, enable_prefix_caching)
        _check_engine_args(self.config)
        policy_config = PolicyConfig(scheduling_policy, priority_aging_seconds, sjf_seconds_per_token,
                                     sjf_prompt_token_weight, sjf_long_prefill_tokens, tenant_weights or {})
        spec_config = SpeculativeConfig.of(speculative_config)
        ckpt = load_checkpoint(model)
        self.model_name = ckpt.name
        model_class(architecture_of(ckpt.hf_config))  # unsupported architectures fail before anything else
        self.model_config = ModelConfig.from_hf(ckpt.hf_config)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device)
        self.quant = resolve_quantization(quantization, ckpt.native_forms, quantization_group_size)
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype)
        self.eos_token_ids = _eos_ids(ckpt)
        # generation_config.json's sampling fields: the defaults of what a request leaves out (vLLM's
        # --generation-config auto); checked now, so that a bad file fails the start, not each request
        self.generation_defaults = generation_defaults(ckpt.generation_config)
        SamplingParams(**self.generation_defaults)
        if self.generation_defaults:
            log.info("tokenmill: defaults from the model's generation_config.json: %s", self.generation_defaults)
        template = ckpt.chat_template if chat_template is None else custom_chat_template(ckpt.tokenizer, chat_template)
        self.tokenizer = Tokenizer(ckpt.tokenizer, template, self.eos_token_ids) if ckpt.tokenizer else None
        self.accountant = make_accountant(
            EnergyConfig(energy_meter, cpu_watts_per_core, idle_watts, price_per_hour, energy_price),
            self.model_config, self.dtype, self.device)

        num_blocks = self._num_blocks()
        capacity = (num_blocks - 1) * block_size
        self.max_model_len = self._max_model_len(max_model_len, capacity)
        self.block_pool = BlockPool(num_blocks)
        self.kv_cache = KVCacheManager(self.block_pool, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache, make_policy(policy_config, self.max_model_len), max_num_seqs,
                                   max_num_batched_tokens, self.eos_token_ids, self.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids)
        # Quantized layers take a GGUF's low-bit blocks as they are (converting only where their form differs).
        self.runner = ModelRunner(self.model_config, ckpt.weights(packed=self.quant is not None), self.dtype, self.device,
                                  num_blocks, block_size, self.max_model_len, seed, self.quant, self.kv_cache_dtype)
        self.model_bytes = ModelBytes(*self.runner.byte_sizes())  # what a step reads, for metering and benchmarks
        self.accountant.sizes = self.model_bytes
        self._grammar_compiler = None  # made by the first request with structured outputs
        self.speculator = NoSpeculation()
        if spec_config is not None:
            draft = None
            if spec_config.method == "draft":
                draft = DraftModel(spec_config, vocab_size=self.model_config.vocab_size, dtype=self.dtype,
                                   device=self.device, num_blocks=num_blocks + 2 * max_num_seqs, block_size=block_size,
                                   max_model_len=self.max_model_len, quantization=quantization,
                                   quantization_group_size=quantization_group_size, seed=seed)
            self.speculator = Speculator(spec_config, self.max_model_len, max_num_batched_tokens, draft)
        self._failed: dict[str, Exception] = {}  # request id -> why it failed a step by itself
        self._stats = self._snapshot()
        self.memory_report = MemoryReport(
            _weights_name(self.quant, self.dtype), self.runner.weight_bytes(), _dtype_name(self.kv_cache_dtype),
            self.model_config.kv_bytes_per_token(self.kv_cache_dtype), capacity)
        log.info("tokenmill: %s, %s on %s, %s, %d KV blocks of %d tokens, max_model_len %d, prefix caching %s; "
                 "linear layers on %s", self.model_name, self.dtype, self.device, self.memory_report, num_blocks - 1,
                 block_size, self.max_model_len, "on" if enable_prefix_caching else "off", self.runner.kernels_in_use())
        # What loading made lives as long as the engine: frozen, the collector no longer walks it on each
        # full collection (a pause of 150-200 ms every few hundred steps with transformers imported).
        gc.collect()
        gc.freeze()

    # ---- sizing -------------------------------------------------------------------------
    def _num_blocks(self) -> int:
        per_block = self.model_config.kv_bytes_per_token(self.kv_cache_dtype) * self.config.block_size
        return max(2, self._kv_budget() // per_block + 1)  # +1: the null block

    def _kv_budget(self) -> int:
        """The KV pool's bytes, decided here once and committed by the runner: kv_cache_memory, else
        what max_num_seqs full contexts need, at most kv_cache_fraction of the total memory (not of
        the free memory, which differs from one start to the next)."""
        total, available = _memory(self.device)
        budget = self.config.kv_cache_memory
        if budget is not None:
            if budget > available:
                raise InvalidParameterError("kv_cache_memory", f"{budget / 2**30:.2f} GiB asked for the KV cache but "
                                                               f"only {available / 2**30:.2f} GiB is free")
            return budget
        context = self.config.max_model_len or self.model_config.max_position_embeddings
        need = self.config.max_num_seqs * context * self.model_config.kv_bytes_per_token(self.kv_cache_dtype)
        budget = min(need, int(self.config.kv_cache_fraction * total))
        if budget > available // 2:
            log.warning("the KV cache gets %.2f GiB, half the free memory, instead of %.2f GiB; set --kv-cache-memory "
                        "to choose", available / 2**31, budget / 2**30)
            budget = available // 2
        return budget

    def _max_model_len(self, requested: int | None, capacity: int) -> int:
        model_max = self.model_config.max_position_embeddings
        if requested is not None:
            if requested > capacity:
                raise InvalidParameterError(
                    "max_model_len", f"{requested} tokens do not fit in the KV cache ({capacity} tokens); "
                                     "raise kv_cache_memory or lower max_model_len")
            return requested
        if capacity < model_max:
            log.warning("max_model_len lowered from %d to %d to fit the KV cache", model_max, capacity)
        return min(model_max, capacity)

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, prompt_text: str | None = None,
                    cache_salt: str | None = None, priority: int = 0, tenant: str | None = None) -> None:
        """Queue a request; only requests with equal `cache_salt` share prefix-cache blocks.

        `priority` (lower runs first) matters to the priority and aging policies, `tenant`
        (who sent it: the OpenAI `user` field) to the fair policy and sjf's length estimates.
        """
        params = params or SamplingParams(**self.generation_defaults)
        if request_id in self.requests:
            raise InvalidParameterError("request_id", f"request {request_id!r} already exists")
        token_ids, text = self._tokenize(prompt, params.truncate_prompt_tokens)
        if prompt_text is not None:
            text = prompt_text
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidParameterError("priority", f"must be an integer, got {priority!r}")
        if (params.stop) and self.tokenizer is None:
            raise InvalidParameterError("stop", "stop strings need a tokenizer; this model has none")
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidParameterError("stop_token_ids", f"token ids {[t for t in params.stop_token_ids if t >= vocab][:5]} "
                                                          f"are outside the vocabulary (size {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise InvalidParameterError("logit_bias", f"token ids {[t for t in params.logit_bias if t >= vocab][:5]} "
                                                      f"are outside the vocabulary (size {vocab})")
        if params.min_tokens and len(set(self.eos_token_ids) | set(params.stop_token_ids)) >= vocab:
            raise InvalidParameterError("stop_token_ids", "with EOS they cover the whole vocabulary, so no token "
                                                          f"is left to sample before min_tokens ({params.min_tokens})")
        grammar = self._grammar(params.structured_outputs) if params.structured_outputs is not None else None
        arrival = time.time() if arrival_time is None else arrival_time
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device="cpu").manual_seed(params.seed + i)
            seq = Sequence(request_id, i, token_ids, params, arrival, generator=gen, cache_salt=cache_salt,
                           priority=priority, tenant=tenant or "")
            if grammar is not None:
                seq.grammar = self._grammar_compiler.state(grammar)
            seqs.append(seq)
        self.output_processor.add(Request(request_id, text, token_ids, params, seqs, RequestMetrics(arrival)))
        self.scheduler.add(seqs[0], forks=seqs[1:])  # the prompt is computed once, for all n
        self._stats = self._snapshot()

    def _tokenize(self, prompt: str | list[int], keep_last: int | None = None) -> tuple[list[int], str | None]:
        """Token ids and text of the prompt; with `keep_last` (truncate_prompt_tokens), only its last
        tokens, and no text (the text of the kept tokens is their decoding)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameterError("prompt", "the prompt is empty")
            if self.tokenizer is None:
                raise InvalidParameterError("prompt", "this model has no tokenizer; pass token ids")
            require_unicode("prompt", prompt)
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            ids, text = self._token_ids("prompt", prompt, "the prompt is empty"), None
        if keep_last is not None and len(ids) > keep_last:
            ids, text = ids[-keep_last:], None
        if len(ids) >= self.max_model_len:
            raise InvalidParameterError(
                "prompt", f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                          "which must leave room for at least one generated token")
        return ids, text

    @property
    def speculative(self) -> bool:
        return not isinstance(self.speculator, NoSpeculation)

    @property
    def requests(self) -> dict[str, Request]:
        """The unfinished requests by id (read-only: add_request and abort_request change them)."""
        return self.output_processor.requests

    def abort_request(self, request_id: str) -> None:
        request = self.output_processor.pop(request_id)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self._finish(seq)
        self._stats = self._snapshot()

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.speculator.release(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- prefix cache -------------------------------------------------------------------
    def reset_prefix_cache(self) -> bool:
        """Drop every cached block so that the next requests miss; False (nothing dropped) while requests hold blocks."""
        return self.block_pool.reset_cache()

    # ---- stats --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """The engine's state after its latest step or request change; safe to read from another thread."""
        return self._stats

    def _snapshot(self) -> EngineStats:
        sched, pool, accountant = self.scheduler, self.block_pool, self.accountant
        return EngineStats(
            num_requests=len(self.requests), num_running=len(sched.running), num_waiting=len(sched.waiting),
            max_num_seqs=sched.max_num_seqs, num_preemptions=sched.num_preemptions,
            kv_total_blocks=pool.num_usable_blocks, kv_free_blocks=pool.num_free_blocks,
            prefix_cache=replace(self.kv_cache.stats),
            spec=replace(self.speculator.stats) if self.speculative else None,
            policy=PolicyStats(sched.policy.name, **sched.policy.stats()),
            energy_joules=accountant.total_joules, energy_meter=accountant.meter_name,
            energy_estimated=accountant.estimated,
            roofline={name: PhaseRoofline(phase.fraction, phase.last_fraction) for name, phase in accountant.phases.items()}
            if accountant.roofline is not None else {})

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the outputs of the requests that sampled."""
        outputs = self._step()
        self._stats = self._snapshot()
        return outputs

    def _step(self) -> list[RequestOutput]:
        self.speculator.propose(self.scheduler.running)
        plan = self.scheduler.schedule()
        if plan.copies:
            self.runner.copy_blocks(plan.copies)
        if not plan.chunks:
            return []
        scheduled_at = time.time()
        self.accountant.start()
        started = time.perf_counter()
        plan.chunks, result = self._execute(plan.chunks)
        self.speculator.record_step(plan.chunks, time.perf_counter() - started, result)
        self.accountant.end(plan.chunks, [self.requests[c.seq.request_id].metrics for c in plan.chunks])
        if not plan.chunks:
            return []
        updates = self.scheduler.update_from_output(plan, result)
        now = time.time()
        failed = self.output_processor.process(plan.chunks, result, updates, scheduled_at, now)
        for update in updates:
            if update.seq.finish_reason is not None and not update.seq.is_finished:  # a stop string or grammar
                self.scheduler.finish(update.seq)
        self.speculator.update(updates)
        for request_id, error in failed.items():
            self._failed[request_id] = error
            self.abort_request(request_id)
        return self.output_processor.outputs(updates, now)

    def _execute(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], StepResult | None]:
        """Run the step's chunks. If that fails with several requests in the step, each request's
        chunks run alone (its generators put back after) to find the requests that fail by
        themselves: those end (`pop_failed` says why) and the rest run again, so one request's
        bad input fails no other. A failure no single request reproduces is raised."""
        draft_probs = self.speculator.draft_probs
        try:
            return chunks, self.runner.execute(chunks, self._blocked(chunks), draft_probs)
        except Exception:
            by_request: dict[str, list[ScheduledChunk]] = {}
            for chunk in chunks:  # a fork's chunk samples from its parent's: a request's chunks go together
                by_request.setdefault(chunk.seq.request_id, []).append(chunk)
            if len(by_request) == 1:
                raise
            culprits = {rid: error for rid, alone in by_request.items()
                        if (error := self._fails_alone(alone, draft_probs))}
            if not culprits:
                raise
        for request_id, error in culprits.items():
            log.error("request %s failed the engine step by itself (%s: %s); ending it, the others go on",
                      request_id, type(error).__name__, error)
            self._failed[request_id] = error
            self.abort_request(request_id)
        chunks = [c for c in chunks if c.seq.request_id not in culprits]
        if not chunks:
            return [], None
        return chunks, self.runner.execute(chunks, self._blocked(chunks), draft_probs)

    def _fails_alone(self, chunks: list[ScheduledChunk], draft_probs) -> Exception | None:
        generators = {id(c.seq.generator): c.seq.generator for c in chunks if c.seq.generator is not None}
        states = {key: g.get_state() for key, g in generators.items()}
        try:
            self.runner.execute(chunks, self._blocked(chunks), draft_probs)
            return None
        except Exception as e:
            return e
        finally:
            for key, g in generators.items():
                g.set_state(states[key])

    def _blocked(self, chunks: list[ScheduledChunk]) -> list[list[list[int]]]:
        return [[self._blocked_tokens(c.seq, j) for j in range(len(c.draft) + 1)] for c in chunks if c.sample]

    def pop_failed(self) -> dict[str, Exception]:
        """Requests that failed a step by themselves since the last call, and why (already ended)."""
        failed, self._failed = self._failed, {}
        return failed

    def _grammar(self, spec) -> str:
        """The request's grammar, compiled (an InvalidParameterError naming its field if it does not)."""
        if self.tokenizer is None:
            raise InvalidParameterError(spec.field, "structured outputs need a tokenizer; this model has none")
        if self._grammar_compiler is None:
            from tokenmill.grammar import GrammarCompiler  # llguidance loads with the first constrained request

            self._grammar_compiler = GrammarCompiler(self.tokenizer.hf, self.model_config.vocab_size,
                                                     self.eos_token_ids)
        return self._grammar_compiler.compile(spec)

    def _blocked_tokens(self, seq: Sequence, drafts_before: int = 0) -> list[int]:
        """Tokens the sampler must not pick for `seq`'s next token after `drafts_before` draft tokens."""
        if seq.num_output_tokens + drafts_before < seq.params.min_tokens:
            return self.eos_token_ids + seq.params.stop_token_ids
        return []

    # ---- scoring and the roofline, for benchmarks and tests -----------------------------
    def score(self, prompt_ids: list[int]) -> torch.Tensor:
        """Teacher-forced log-probabilities [len(prompt_ids), vocab] in float32: row i is the raw
        (unprocessed) next-token distribution after prompt_ids[:i + 1], so row i - 1 at prompt_ids[i]
        is what a request's prompt_logprobs report for token i. One prefill through the runner, in
        blocks taken from the KV manager under a sequence id of its own and given back after; no
        request, step or prefix-cache entry is made. Call it between steps, on the engine's thread.
        """
        ids = self._token_ids("prompt_ids", prompt_ids, "nothing to score: the list is empty")
        if len(ids) > self.max_model_len:
            raise InvalidParameterError("prompt_ids", f"{len(ids)} tokens; max_model_len is {self.max_model_len}")
        # A Sequence draws its seq_id from the process-wide counter: never one a request holds.
        seq = Sequence("score", 0, ids, SamplingParams(), 0.0)
        try:
            if not self.kv_cache.grow(seq.seq_id, 0, len(ids)):
                raise InvalidParameterError(
                    "prompt_ids", f"the KV cache has no room for {len(ids)} tokens now "
                                  f"({self.block_pool.num_free_blocks} free blocks of {self.config.block_size})")
            chunk = ScheduledChunk(seq, 0, len(ids), self.kv_cache.block_table(seq.seq_id))
            return torch.log_softmax(self.runner.logits_for([chunk]).float(), dim=-1).cpu()
        finally:
            self.kv_cache.free(seq.seq_id)

    def _token_ids(self, param: str, ids, empty: str) -> list[int]:
        """`ids` as a list of ints, each an id of this vocabulary; InvalidParameterError(param) if not, or if empty."""
        ids = list(ids)
        if not ids:
            raise InvalidParameterError(param, empty)
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < vocab]
        if bad:
            raise InvalidParameterError(param, f"token ids {bad[:5]} are outside the vocabulary (size {vocab})")
        return [int(t) for t in ids]

    @property
    def roofline(self) -> Roofline | None:
        """The machine's ceilings the accountant measures steps against (None: roofline fractions off).
        The cached `tokenmill calibrate` result sets it at start; a benchmark may set one it measured."""
        return self.accountant.roofline

    @roofline.setter
    def roofline(self, value: Roofline | None) -> None:
        self.accountant.roofline = value
        self._stats = self._snapshot()

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


def _memory(device: torch.device) -> tuple[int, int]:
    """(total, available) bytes of the memory the KV cache lives in."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    import psutil
    memory = psutil.virtual_memory()
    return memory.total, memory.available


def _check_engine_args(cfg: EngineConfig) -> None:
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
        if getattr(cfg, name) < 1:
            raise InvalidParameterError(name, f"must be at least 1, got {getattr(cfg, name)}")
    if not 0 < cfg.kv_cache_fraction <= 1:
        raise InvalidParameterError("kv_cache_fraction", f"must be in (0, 1], got {cfg.kv_cache_fraction}")


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
from dataclasses import dataclass
from numbers import Integral

import torch

from tokenmill.config import (
    EnergyConfig, EngineConfig, ModelConfig, WeightQuant, architecture_of, parse_memory, resolve_dtype, resolve_kv_cache_dtype,
    resolve_quantization,
)
from tokenmill.engine.policy import PolicyConfig, make_policy
from tokenmill.engine.scheduler import ScheduledChunk, Scheduler
from tokenmill.errors import InvalidParameterError, require_unicode
from tokenmill.executor.models.registry import model_class
from tokenmill.executor.runner import ModelRunner, StepResult
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.kv_cache_manager import KVCacheManager, PrefixCacheStats
from tokenmill.loader import load_checkpoint
from tokenmill.metering.accounting import make_accountant
from tokenmill.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams, generation_defaults
from tokenmill.sequence import Sequence
from tokenmill.spec.config import SpeculativeConfig
from tokenmill.spec.draft_model import DraftModel
from tokenmill.spec.speculator import Speculator
from tokenmill.tokenizer import IncrementalDetokenizer, Tokenizer, custom_chat_template

log = logging.getLogger("tokenmill")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    finished_seqs: int = 0

    @property
    def finished(self) -> bool:
        return self.finished_seqs == len(self.seqs)


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
        self.scheduler = Scheduler(self.kv_cache, make_policy(policy_config, self.max_model_len), max_num_seqs, max_num_batched_tokens)
        # Quantized layers take a GGUF's low-bit blocks as they are (converting only where their form differs).
        self.runner = ModelRunner(self.model_config, ckpt.weights(packed=self.quant is not None), self.dtype, self.device,
                                  num_blocks, block_size, self.max_model_len, seed, self.quant, self.kv_cache_dtype)
        self.accountant.sizes = self.runner.model_bytes()
        self._grammar_compiler = None  # made by the first request with structured outputs
        self.speculator = None
        if spec_config is not None:
            draft = None
            if spec_config.method == "draft":
                draft = DraftModel(spec_config, vocab_size=self.model_config.vocab_size, dtype=self.dtype,
                                   device=self.device, num_blocks=num_blocks + 2 * max_num_seqs, block_size=block_size,
                                   max_model_len=self.max_model_len, quantization=quantization,
                                   quantization_group_size=quantization_group_size, seed=seed)
            self.speculator = Speculator(spec_config, self.max_model_len, max_num_batched_tokens, draft)
        self.requests: dict[str, Request] = {}
        self._failed: dict[str, Exception] = {}  # request id -> why it failed a step by itself
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
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            if grammar is not None:
                seq.grammar = self._grammar_compiler.state(grammar)
            seqs.append(seq)
        self.requests[request_id] = Request(request_id, text, token_ids, params, seqs, RequestMetrics(arrival))
        self.scheduler.add(seqs[0], forks=seqs[1:])  # the prompt is computed once, for all n

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
            ids, text = list(prompt), None
            if not ids:
                raise InvalidParameterError("prompt", "the prompt is empty")
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < vocab]
            if bad:
                raise InvalidParameterError("prompt", f"token ids {bad[:5]} are outside the vocabulary (size {vocab})")
            ids = [int(t) for t in ids]
        if keep_last is not None and len(ids) > keep_last:
            ids, text = ids[-keep_last:], None
        if len(ids) >= self.max_model_len:
            raise InvalidParameterError(
                "prompt", f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                          "which must leave room for at least one generated token")
        return ids, text

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if self.speculator is not None:
            self.speculator.release(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- prefix cache -------------------------------------------------------------------
    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Queried and hit prompt tokens since start (counters only grow; reset_prefix_cache keeps them)."""
        return self.kv_cache.stats

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block so that the next requests miss; False (nothing dropped) while requests hold blocks."""
        return self.block_pool.reset_cache()

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the outputs of the requests that progressed."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        plan = self.scheduler.schedule()
        if plan.copies:
            self.runner.copy_blocks(plan.copies)
        if not plan.chunks:
            return []
        now = time.time()
        self.accountant.start()
        started = time.perf_counter()
        chunks, result = self._execute(plan.chunks)
        chunk_metrics = [self.requests[c.seq.request_id].metrics for c in chunks]
        if self.speculator is not None and chunks:
            self.speculator.record_step(chunks, time.perf_counter() - started, sum(result.counts))
        self.accountant.end(chunks, chunk_metrics)
        if not chunks:
            return []
        for chunk, metrics in zip(chunks, chunk_metrics):
            if not chunk.draft:  # a verified chunk's computed tokens are known once the sampler decided
                chunk.seq.num_computed_tokens += chunk.num_tokens
                self.kv_cache.cache_full_blocks(chunk.seq)
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        now = time.time()
        for seq, logprobs in result.prompt_logprobs:
            seq.prompt_logprobs += [_logprob_entry(logprobs, i) for i in range(len(logprobs.token_ids))]
        touched: dict[str, Request] = {}
        samples = result.samples
        row = 0
        for chunk, count in zip(result.sampled, result.counts):
            seq = chunk.seq
            request = self.requests[seq.request_id]
            if chunk.draft:
                self.speculator.observe(seq, len(chunk.draft), count - 1)
                request.metrics.spec_draft_tokens += len(chunk.draft)
                request.metrics.spec_accepted_tokens += count - 1
            elif self.speculator is not None:
                self.speculator.observe_token(seq, samples.token_ids[row])
            for i in range(count):
                self._append_token(seq, row + i, samples, now)
                if seq.is_finished:
                    break
            if chunk.draft and not seq.is_finished:
                self._keep_accepted(chunk, count - 1)
            if self.speculator is not None:
                self.speculator.after_step(seq)
            row += count
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            if seq.is_finished:
                request.finished_seqs += 1
            touched[request.request_id] = request
        for request_id in [r for r in touched if r in self._failed]:  # ended by their grammar above
            self.abort_request(request_id)
            del touched[request_id]
        outputs = []
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
            outputs.append(self._output(request))
        return outputs

    def _execute(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], StepResult | None]:
        """Run the step's chunks. If that fails with several requests in the step, each request's
        chunks run alone (its generators put back after) to find the requests that fail by
        themselves: those end (`pop_failed` says why) and the rest run again, so one request's
        bad input fails no other. A failure no single request reproduces is raised."""
        draft_probs = self.speculator.draft_probs if self.speculator else None
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

    def _keep_accepted(self, chunk, accepted: int) -> None:
        """After a verification (its tokens appended): the known tokens and the accepted drafts are
        computed; the blocks that held only rejected drafts go back to the pool."""
        seq = chunk.seq
        seq.num_computed_tokens += chunk.num_known + accepted
        self.kv_cache.trim(seq)
        self.kv_cache.cache_full_blocks(seq)

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

    def _append_token(self, seq: Sequence, row: int, samples, now: float) -> None:
        token = samples.token_ids[row]
        seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if seq.logprobs is not None:
            seq.logprobs.append(_logprob_entry(samples, row))
            seq.cumulative_logprob += samples.logprobs[row]
        params = seq.params
        delta = seq.detokenizer.step(token) if seq.detokenizer is not None else ""
        seq.text += delta
        reason = None
        if seq.grammar is not None and token not in self.eos_token_ids and not seq.grammar.advance(token):
            # the grammar hit llguidance's work limits (a schema that recurses without end, say): its fault
            self._failed[seq.request_id] = InvalidParameterError(params.structured_outputs.field, (
                f"the grammar failed at output token {seq.num_output_tokens}: {seq.grammar.error}"))
            seq.finish_reason = "abort"
            self._finish(seq)
            return
        if not params.ignore_eos and token in self.eos_token_ids:
            reason, seq.stop_reason = "stop", None
        elif token in params.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        elif params.stop and delta and seq.num_output_tokens >= params.min_tokens \
                and self._cut_stop_string(seq, len(delta)):
            reason = "stop"  # as in vLLM, stop strings wait for min_tokens too
        elif seq.grammar is not None and seq.grammar.done:
            reason, seq.stop_reason = "stop", None  # the grammar is complete: nothing may follow
        elif (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            seq.finish_reason = reason
            self._finish(seq)

    @staticmethod
    def _cut_stop_string(seq: Sequence, delta_len: int) -> bool:
        """Find a stop string that the newest text completes (it ends inside the newest `delta_len`
        characters: one met before min_tokens stays text); cut the text there."""
        text = seq.text
        hits = [(text.find(s, max(0, len(text) - delta_len - len(s) + 1)), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i != -1]
        if not hits:
            return False
        index, stop = min(hits)
        seq.text = text[: index + len(stop)] if seq.params.include_stop_str_in_output else text[:index]
        seq.stop_reason = stop
        return True

    def _output(self, request: Request) -> RequestOutput:
        outputs = []
        for seq in request.seqs:
            text = seq.text if seq.is_finished else seq.text[: len(seq.text) - _stop_holdback(seq.text, seq.params.stop)]
            outputs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=seq.output_token_ids,
                logprobs=seq.logprobs, cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs,
                             request.finished, request.metrics, request.seqs[0].num_cached_tokens or 0,
                             request.seqs[0].prompt_logprobs)


def _logprob_entry(samples, row: int) -> dict[int, Logprob]:
    """Row `row`'s token and top tokens, token id -> Logprob (rank 1 = most likely)."""
    entry = {tid: Logprob(lp, rank + 1) for rank, (tid, lp) in enumerate(samples.top_logprobs[row])}
    entry[samples.token_ids[row]] = Logprob(samples.logprobs[row], samples.ranks[row])
    return entry


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        tail = text[len(text) - min(len(stop) - 1, len(text)):] if len(stop) > 1 else ""
        start = tail.find(stop[0])  # only tails that begin with the stop's first character can grow into it
        while start != -1 and len(tail) - start > best:
            if stop.startswith(tail[start:]):
                best = len(tail) - start
                break
            start = tail.find(stop[0], start + 1)
    return best


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

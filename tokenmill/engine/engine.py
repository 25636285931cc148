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
from dataclasses import fields, replace
from numbers import Integral

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.builder import EngineParts, build_engine
from tokenmill.engine.output_processor import Request
from tokenmill.engine.stats import EngineStats, PhaseRoofline, PolicyStats
from tokenmill.errors import InvalidParameterError, TensorParallelError, require_unicode
from tokenmill.metering.roofline import Roofline
from tokenmill.outputs import RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.sequence import Sequence
from tokenmill.spec.speculator import NoSpeculation
from tokenmill.step_plan import ScheduledChunk, StepResult

log = logging.getLogger("tokenmill")


class LLMEngine:
    def __init__(self, model=None, **options):
        """`model`: a Hugging Face folder, .gguf file or hub id (None: the embedded default model);
        `options`: EngineConfig's, by their flat names (dtype, max_num_seqs, kv_cache_memory, ...,
        as `tokenmill serve --help` lists them); a name it has not raises UnknownOptionError."""
        self._build(EngineConfig.from_kwargs(model=model, **options))

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        engine = cls.__new__(cls)
        engine._build(config)
        return engine

    def _build(self, config: EngineConfig) -> None:
        parts = build_engine(config)  # the attributes of EngineParts: config, model_config, tokenizer, runner, ...
        for f in fields(EngineParts):
            setattr(self, f.name, getattr(parts, f.name))
        self._grammar_compiler = None  # made by the first request with structured outputs
        self._failed: dict[str, Exception] = {}  # request id -> why it failed a step by itself
        self._last_step: tuple = (None, None)  # (shape, wall seconds) of the latest step that computed tokens
        self._step_shape = None  # the running step's, once planned
        self._stats = self._snapshot()
        log.info("tokenmill: %s, %s on %s, tensor parallel %d, %s, %d KV blocks of %d tokens, max_model_len %d, "
                 "prefix caching %s; linear layers on %s", self.model_name, self.dtype, self.device,
                 config.model.tensor_parallel_size, self.memory_report,
                 self.block_pool.num_usable_blocks, config.cache.block_size, self.max_model_len,
                 "on" if config.cache.enable_prefix_caching else "off", self.runner.kernels_in_use())
        # What loading made lives as long as the engine: frozen, the collector no longer walks it on each
        # full collection (a pause of 150-200 ms every few hundred steps with transformers imported).
        gc.collect()
        gc.freeze()

    def shutdown(self) -> None:
        """End the tensor-parallel worker processes (nothing to do with one rank; done anyway when the
        engine is collected or the interpreter exits). The engine cannot step after."""
        if self.workers is not None:
            self.workers.shutdown()

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
            if accountant.roofline is not None else {},
            last_step=self._last_step[0], last_step_seconds=self._last_step[1])

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the outputs of the requests that sampled."""
        started = time.perf_counter()
        self._step_shape = None
        outputs = self._step()
        if self._step_shape is not None:
            self._last_step = (self._step_shape, time.perf_counter() - started)
        self._stats = self._snapshot()
        return outputs

    def _step(self) -> list[RequestOutput]:
        self.speculator.propose(self.scheduler.running)
        plan = self.scheduler.schedule()
        if plan.copies:
            self.runner.copy_blocks(plan.copies)
        if not plan.chunks:
            return []
        self._step_shape = plan.shape()
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
        except TensorParallelError:
            raise  # a rank is gone: no request could run alone either
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
                                  f"({self.block_pool.num_free_blocks} free blocks of {self.config.cache.block_size})")
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

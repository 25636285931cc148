"""The model runner: one step's scheduled chunks -> one flat batch -> model -> sampled tokens.

Owns the model weights and the KV cache tensors. It makes no scheduling decision: it runs
exactly the chunks it is handed, and samples for the chunks that end a sequence's known tokens.

Everything that touches the model or the cache goes through one `ForwardPlan`: block copies, the
spans to compute, the rows whose logits are wanted. Under tensor parallelism rank 0's runner
broadcasts each plan before running it and the other ranks' runners (`serve`) run the same plan
on their share of the weights and KV heads; only rank 0 samples.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from tokenmill.config import ModelConfig, WeightQuant
from tokenmill.executor.kernels import lowbit
from tokenmill.executor.layers.attention import build_metadata
from tokenmill.executor.layers.kv_cache import KVCache
from tokenmill.executor.models.registry import model_class
from tokenmill.executor.parallel import TensorParallel
from tokenmill.executor.rejection_sampler import verify
from tokenmill.executor.sampler import Sampler, SamplingBatch, token_logprobs
from tokenmill.grammar import fill_bitmask
from tokenmill.sequence import Sequence
from tokenmill.step_plan import ScheduledChunk, StepResult

_mask_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-grammar")  # masks while the model runs
PROMPT_LOGITS_ROWS = 256  # prompt logprobs take the logits of this many positions at a time (memory: rows x vocab)

Span = tuple[list[int], int, list[int]]  # token ids, first position, block table


@dataclass
class ForwardPlan:
    """One call into the model, in plain lists (what rank 0 broadcasts): copy KV blocks (source,
    destination), compute the spans as one flat batch, then take the logits of each group of rows of
    that batch, in order."""

    copies: list[tuple[int, int]] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    logit_rows: list[list[int]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, weights, dtype: torch.dtype, device: torch.device,
                 num_blocks: int, block_size: int, max_model_len: int, seed: int | None = None,
                 quant: WeightQuant | None = None, kv_cache_dtype: torch.dtype | None = None,
                 tp: TensorParallel | None = None):
        self.tp = tp or TensorParallel()
        self.cfg = cfg.tensor_parallel_share(self.tp.world)  # this rank's heads and MLP width
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.model = _build_model(self.cfg, weights, dtype, device, max_model_len, quant, self.tp)
        self.kv_cache_dtype = kv_cache_dtype or dtype
        # Decodes attend row by row in tokenmill's C++ kernels where they run (float32 model and cache on CPU).
        self.row_attention = (device.type == "cpu" and dtype == torch.float32 and self.kv_cache_dtype == torch.float32
                              and lowbit() is not None)
        self.kv_caches = [KVCache(num_blocks * block_size, self.cfg.num_kv_heads, self.cfg.head_dim, dtype,
                                  self.kv_cache_dtype, device)
                          for _ in range(self.cfg.num_layers)]
        self.sampler = Sampler(seed)
        self.num_computed_tokens = 0  # tokens run through the model since start (prefill + decode)
        self.num_copied_blocks = 0  # copy-on-write block copies since start

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk], blocked_token_ids: list[list[list[int]]],
                draft_probs: dict[int, torch.Tensor] | None = None) -> StepResult:
        """Run the chunks and sample (verify, for chunks with drafts). `blocked_token_ids` has, per
        sampling chunk in order, one list per row: len(draft) + 1 rows. `draft_probs` holds the
        proposer's distributions [k, vocab] by seq_id, for drafts a model sampled."""
        sampled = [c for c in chunks if c.sample]
        grammars = [c.seq.grammar for c in sampled if c.seq.grammar is not None]  # such sequences never draft
        masks = _mask_pool.submit(fill_bitmask, grammars, self.cfg.vocab_size) if grammars else None
        prompt_parts = self._prompt_logprob_parts(chunks)
        ends = [end for end, c in zip(chunks_ends(chunks), chunks) if c.sample]
        rows = [r for end, c in zip(ends, sampled) for r in range(end - len(c.draft), end + 1)]
        # The logits are taken in the plan's order: each prompt-logprobs part's rows, then the sampled rows.
        plan = ForwardPlan(spans=_spans(chunks), logit_rows=[part for _, part, _ in prompt_parts] + ([rows] if rows else []))
        hidden = self._run(plan)
        prompt_logprobs = []
        for seq, part, targets in prompt_parts:
            logprobs = token_logprobs(self._logits(hidden, part), torch.tensor(targets, device=self.device),
                                      [seq.params.prompt_logprobs] * len(targets))
            prompt_logprobs.append((seq, logprobs))
        if not sampled:
            return StepResult([], None, [], prompt_logprobs)
        logits = self._logits(hidden, rows).float()
        positions = [(c, j) for c in sampled for j in range(len(c.draft) + 1)]
        batch = SamplingBatch(
            params=[c.seq.params for c, _ in positions],
            generators=[c.seq.generator for c, _ in positions],
            prompt_token_ids=[c.seq.prompt_token_ids for c, _ in positions],
            output_token_ids=[c.seq.output_token_ids + c.draft[:j] for c, j in positions],
            blocked_token_ids=[row for chunk_rows in blocked_token_ids for row in chunk_rows],
        )
        if masks is not None:  # computed by llguidance while the model ran
            batch.grammar_rows = [i for i, (c, _) in enumerate(positions) if c.seq.grammar is not None]
            batch.grammar_bitmask = masks.result().to(logits.device)
        if len(rows) == len(sampled):  # no drafts: one token per chunk
            return StepResult(sampled, self.sampler(logits, batch), [1] * len(sampled), prompt_logprobs)
        probs = draft_probs or {}
        counts, samples = verify(self.sampler, logits, batch, [c.draft for c in sampled],
                                 [probs.get(c.seq.seq_id) for c in sampled])
        return StepResult(sampled, samples, counts, prompt_logprobs)

    def _prompt_logprob_parts(self, chunks: list[ScheduledChunk]) -> list[tuple[Sequence, list[int], list[int]]]:
        """For sequences that asked for prompt logprobs, (sequence, flat rows, the prompt tokens that follow
        them) for each prompt token of the chunk after the tokens before it: every position's logits, where
        sampling needs only the last, at most PROMPT_LOGITS_ROWS rows a part. Positions already recorded (a
        sequence recomputed after a preemption) are skipped."""
        parts = []
        for chunk, end in zip(chunks, chunks_ends(chunks)):
            seq = chunk.seq
            if not chunk.num_known or not seq.needs_prompt_logits:
                continue
            first_row = end - chunk.num_tokens + 1 - chunk.start  # the flat row of position 0
            stop = min(chunk.start + chunk.num_known, seq.num_prompt_tokens - 1)
            for begin in range(max(chunk.start, len(seq.prompt_logprobs) - 1), stop, PROMPT_LOGITS_ROWS):
                end_pos = min(begin + PROMPT_LOGITS_ROWS, stop)
                parts.append((seq, list(range(first_row + begin, first_row + end_pos)),
                              seq.prompt_token_ids[begin + 1:end_pos + 1]))
        return parts

    @torch.inference_mode()
    def logits_for(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits of every token of the chunks (for tests against a reference); writes the KV cache."""
        rows = list(range(sum(c.num_tokens for c in chunks)))
        return self._logits(self._run(ForwardPlan(spans=_spans(chunks), logit_rows=[rows])), rows).float()

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks' K/V (source, destination) in every layer; all sources are read before any
        destination is written, so a block freed as a source may already be another copy's destination."""
        self._run(ForwardPlan(copies=copies))

    @torch.inference_mode()
    def serve(self) -> None:
        """A tensor-parallel worker's loop: run each plan rank 0 broadcasts, logits included (rank 0
        gathers them), until it broadcasts None."""
        while (plan := self.tp.receive()) is not None:
            hidden = self._run(plan)
            for rows in plan.logit_rows:
                self._logits(hidden, rows)

    def _run(self, plan: ForwardPlan) -> torch.Tensor | None:
        """Copy the plan's blocks and compute its spans (rank 0 of several broadcasts it first); the hidden
        states [tokens, hidden], None without spans. The caller then takes the logits of each of
        plan.logit_rows in order: under tensor parallelism every rank takes part in each."""
        if self.tp.driver:
            self.tp.send(plan)
        if plan.copies:
            self._copy_blocks(plan.copies)
        return self.forward(plan.spans) if plan.spans else None

    def _logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        offsets = torch.arange(self.block_size)
        src = (torch.tensor([s for s, _ in copies])[:, None] * self.block_size + offsets).view(-1).to(self.device)
        dst = (torch.tensor([d for _, d in copies])[:, None] * self.block_size + offsets).view(-1).to(self.device)
        for cache in self.kv_caches:
            cache.copy_slots(src, dst)
        self.num_copied_blocks += len(copies)

    def byte_sizes(self) -> tuple[int, int, int]:
        """What a step reads, in bytes: decoder-layer weights and output-head weights as held, KV per token."""
        return (_held_bytes(self.model.layers), _held_bytes(self.model.lm_head),
                self.cfg.kv_bytes_per_token(self.kv_cache_dtype))

    def kernels_in_use(self) -> str:
        """Which kernels run the quantized linear layers, for the start-up log."""
        layers = [m for m in self.model.modules() if hasattr(m, "kernel_weight")]
        if not layers:
            return "float matmuls"
        if all(m.kernel_weight is not None for m in layers):
            return f"tokenmill's packed kernels ({lowbit().isa()}, int8 activations in two terms)"
        return "PyTorch's weight-only kernels"

    def weight_bytes(self) -> int:
        """Bytes of the model's weights as held: parameters and buffers (packed codes, scales)."""
        return _held_bytes(self.model)

    def forward(self, spans: list[Span]) -> torch.Tensor:
        """Hidden states [tokens, hidden] of spans (token ids, first position, block table), flat. On this
        rank alone: a tensor-parallel rank 0 runs plans (`_run`), a draft model's runner calls this."""
        ids: list[int] = []
        positions: list[int] = []
        for tokens, start, _ in spans:
            ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
        meta = build_metadata(
            [table for _, _, table in spans], [start for _, start, _ in spans], [len(t) for t, _, _ in spans],
            self.block_size, self.cfg.num_heads // self.cfg.num_kv_heads, self.cfg.sliding_window, self.device,
            row_attention=self.row_attention,
        )
        self.num_computed_tokens += len(ids)
        return self.model(torch.tensor(ids, dtype=torch.long, device=self.device),
                          torch.tensor(positions, dtype=torch.long, device=self.device), meta, self.kv_caches)


def _spans(chunks: list[ScheduledChunk]) -> list[Span]:
    """The chunks that compute tokens, as spans (a fork's empty chunk has none)."""
    return [(c.token_ids, c.start, c.block_table) for c in chunks if c.num_tokens]


def _held_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def chunks_ends(chunks: list[ScheduledChunk]) -> list[int]:
    """Row of each chunk's last token in the flat batch (a fork's empty chunk: the row before it)."""
    ends, total = [], 0
    for c in chunks:
        total += c.num_tokens
        ends.append(total - 1)
    return ends


def _build_model(cfg: ModelConfig, weights, dtype, device, max_model_len, quant, tp):
    cls = model_class(cfg.architecture)
    with torch.device("meta"):
        model = cls(cfg, max_model_len, quant, tp)
    # In the final dtype before loading: weights are converted one tensor at a time, and the
    # quantized layers' kernel tensors (created while loading) keep their own dtype.
    model.to(dtype)
    # to_empty() but with the factory: empty_like on meta tensors runs Python reference code that
    # imports sympy (0.7 s of start-up).
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.load_weights(weights)
    model.rotary.to(device, dtype)
    return model.eval()

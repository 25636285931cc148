"""Quality of low-bit weights and KV caches, measured as llama.cpp measures its quants.

A fixed text is cut into chunks of `chunk_tokens` tokens; each chunk is run teacher-forced as
one prefill, and the logits of every position are compared with the reference engine's: the
mean KL divergence KL(reference || candidate) of the next-token distributions, the share of
positions whose top-1 token agrees, and the perplexity of the text itself.

    chunks = text_chunks(tokenizer, text, chunk_tokens=512, num_chunks=4)
    reference = chunk_logits(LLMEngine(ckpt, dtype="float32", quantization="none"), chunks)
    row = compare(reference, chunk_logits(LLMEngine(ckpt, dtype="float32", quantization="int4"), chunks), chunks)

`run_quality` does all of it for a set of configurations and returns a JSON-ready dict.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import InvalidParameterError

# name -> LLMEngine keyword arguments; the reference is float32 weights and KV cache.
REFERENCE = {"dtype": "float32", "quantization": "none"}
CONFIGS = {
    "auto (the file's own forms)": {"quantization": "auto"},
    "int8": {"quantization": "int8"},
    "int4 g32": {"quantization": "int4", "quantization_group_size": 32},
    "int4 g128": {"quantization": "int4", "quantization_group_size": 128},
    "KV int8": {"kv_cache_dtype": "int8"},
    "KV fp8_e4m3": {"kv_cache_dtype": "fp8_e4m3"},
}


@dataclass
class QualityRow:
    name: str
    kl_mean: float  # nats per position
    kl_p99: float
    top1_agreement: float  # share of positions whose argmax equals the reference's
    perplexity: float  # of the text under this configuration
    weight_bytes: int
    kv_bytes_per_token: int


def text_chunks(tokenizer, text: str, chunk_tokens: int = 512, num_chunks: int = 4) -> list[list[int]]:
    """The text's tokens cut into `num_chunks` chunks of `chunk_tokens` (the text must be long enough)."""
    ids = tokenizer.encode(text)
    if len(ids) < chunk_tokens * num_chunks:
        raise InvalidParameterError("text", f"{len(ids)} tokens, {chunk_tokens * num_chunks} needed")
    return [ids[i * chunk_tokens:(i + 1) * chunk_tokens] for i in range(num_chunks)]


def chunk_logits(engine: LLMEngine, chunks: list[list[int]]) -> torch.Tensor:
    """Log-probabilities [positions, vocab] of every position of every chunk, each chunk one prefill."""
    return torch.cat([engine.score(ids) for ids in chunks])


def compare(name: str, reference: torch.Tensor, logprobs: torch.Tensor, chunks: list[list[int]],
            engine: LLMEngine) -> QualityRow:
    kl = (reference.exp() * (reference - logprobs)).sum(-1)
    top1 = (reference.argmax(-1) == logprobs.argmax(-1)).float().mean()
    report = engine.memory_report
    return QualityRow(name, kl.mean().item(), kl.quantile(0.99).item(), top1.item(),
                      perplexity(logprobs, chunks), report.weight_bytes, report.kv_bytes_per_token)


def perplexity(logprobs: torch.Tensor, chunks: list[list[int]]) -> float:
    """exp of the mean negative log-likelihood of each chunk's tokens after its first."""
    nll, start = [], 0
    for ids in chunks:
        rows = logprobs[start:start + len(ids) - 1]
        nll.append(-rows.gather(1, torch.tensor(ids[1:])[:, None]))
        start += len(ids)
    return torch.cat(nll).mean().exp().item()


def run_quality(text: str, model=None, configs: dict[str, dict] | None = None, chunk_tokens: int = 512,
                num_chunks: int = 4, log=lambda msg: None) -> dict:
    """The reference and every configuration over the same chunks; a JSON-ready dict of rows."""
    from tokenmill.loader import load_checkpoint

    configs = CONFIGS if configs is None else configs
    ckpt = load_checkpoint(model)  # parsed once, shared by every engine
    kv_memory = {"kv_cache_memory": "64MiB", "max_model_len": chunk_tokens}
    reference_engine = LLMEngine(ckpt, **REFERENCE, **kv_memory)
    chunks = text_chunks(reference_engine.tokenizer, text, chunk_tokens, num_chunks)
    reference = chunk_logits(reference_engine, chunks)
    rows = [compare("float32 (reference)", reference, reference, chunks, reference_engine)]
    del reference_engine
    for name, kwargs in configs.items():
        start = time.perf_counter()
        engine = LLMEngine(ckpt, **{**REFERENCE, **kwargs, **kv_memory})
        rows.append(compare(name, reference, chunk_logits(engine, chunks), chunks, engine))
        log(f"{name}: {time.perf_counter() - start:.1f} s")
    return {"model": ckpt.name, "positions": sum(map(len, chunks)), "chunk_tokens": chunk_tokens,
            "rows": [asdict(r) for r in rows]}


def format_table(result: dict) -> str:
    lines = [f"{result['model']}: {result['positions']} positions in chunks of {result['chunk_tokens']}",
             "| config | mean KL | KL p99 | top-1 agree | PPL | weights MiB | KV bytes/token |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {100 * r['top1_agreement']:.2f}% "
                     f"| {r['perplexity']:.3f} | {r['weight_bytes'] / 2**20:.1f} | {r['kv_bytes_per_token']} |")
    return "\n".join(lines)

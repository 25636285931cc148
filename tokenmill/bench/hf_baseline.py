"""The Hugging Face transformers baseline: `generate` over the same token ids, greedy, exact lengths.

Static batches, left-padded; the tokens a batch generates past a prompt's requested length are
what static batching wastes and do not count as output. Batch-1 decode speed is timed with a
streamer, from the first generated token to the last.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from tokenmill.bench.results import DecodeResult, ThroughputResult, repeat
from tokenmill.errors import InvalidParameterError, TokenmillError


def load_hf_model(model: str | None, dtype: torch.dtype = torch.float32):
    """The transformers model for what tokenmill calls `model` (None: the embedded default GGUF)."""
    from transformers import AutoModelForCausalLM

    from tokenmill.loader.checkpoint import default_model_path

    kwargs: dict = {"dtype": dtype}
    if model is None:
        path = default_model_path()
        source, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        path = Path(str(model)).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            source, kwargs["gguf_file"] = str(path.parent), path.name
        else:
            source = str(path) if path.is_dir() else str(model)
    try:
        hf = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as e:  # transformers raises many types for "cannot load this"
        raise TokenmillError(f"transformers could not load the model for --compare hf: {e}") from e
    return hf.eval()


def _hf_pad_id(hf_model) -> int:
    for cfg in (hf_model.generation_config, hf_model.config):
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(cfg, name, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


def _left_pad(batch: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def _hf_generate(hf_model, batch: Sequence[list[int]], new_tokens: int, pad_id: int, streamer=None) -> int:
    ids, mask = _left_pad(batch, pad_id)
    out = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, pad_token_id=pad_id, streamer=streamer,
                            temperature=None, top_p=None, top_k=None)
    return (out.shape[1] - ids.shape[1]) * out.shape[0]


def measure_hf(hf_model, prompts: Sequence[list[int]], output_lens: Sequence[int], batch_size: int | None = None,
               repeats: int = 3, warmup: bool = True) -> ThroughputResult:
    """transformers `generate` over the same prompts: static batches of `batch_size` (default: all), left-padded.

    A batch generates the largest output length among its prompts; only the requested
    tokens count as output (the rest is what static batching wastes).
    """
    batch_size = batch_size or len(prompts)
    if batch_size < 1:
        raise InvalidParameterError("hf_batch_size", f"must be at least 1, got {batch_size}")
    pad_id = _hf_pad_id(hf_model)
    batches = [(list(prompts[i:i + batch_size]), max(output_lens[i:i + batch_size]))
               for i in range(0, len(prompts), batch_size)]
    if warmup:
        _hf_generate(hf_model, [prompts[0][:8]], 2, pad_id)

    def once() -> float:
        start = time.perf_counter()
        for batch, new_tokens in batches:
            produced = _hf_generate(hf_model, batch, new_tokens, pad_id)
            if produced != new_tokens * len(batch):
                raise TokenmillError(f"transformers generated {produced} tokens, expected {new_tokens * len(batch)}")
        return time.perf_counter() - start

    runs = repeat(once, repeats)
    return ThroughputResult("hf", len(prompts), sum(map(len, prompts)), sum(output_lens),
                            statistics.median(runs), runs, {"batch_size": batch_size})


class _TimingStreamer:
    """A transformers streamer that notes when each generated token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def measure_hf_decode(hf_model, prompt: list[int], new_tokens: int = 128, repeats: int = 3) -> DecodeResult:
    if new_tokens < 2:
        raise InvalidParameterError("new_tokens", "batch-1 decode needs at least 2 new tokens")
    pad_id = _hf_pad_id(hf_model)
    _hf_generate(hf_model, [prompt[:8]], 2, pad_id)  # warm-up
    ttfts: list[float] = []

    def once() -> float:
        streamer = _TimingStreamer()
        start = time.perf_counter()
        _hf_generate(hf_model, [prompt], new_tokens, pad_id, streamer=streamer)
        times = streamer.times
        if len(times) != new_tokens:
            raise TokenmillError(f"transformers streamed {len(times)} tokens, expected {new_tokens}")
        ttfts.append(times[0] - start)
        return (len(times) - 1) / (times[-1] - times[0])

    runs = repeat(once, repeats)
    return DecodeResult("hf", len(prompt), new_tokens, statistics.median(runs), runs, statistics.median(ttfts))


def transformers_version() -> str | None:
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return None

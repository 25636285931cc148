"""Offline throughput: tokenmill's engine against Hugging Face transformers `generate`.

Everything here is plain Python, usable without the CLI:

    prompts = synthetic_prompts(llm.get_tokenizer(), vocab_size, input_lens, seed=0)
    result = measure_tokenmill(llm, prompts, output_lens, repeats=3)

or, all in one, `run_throughput_benchmark(model=None, num_prompts=64, input_len="32:512", ...)`,
which returns a JSON-ready dict. Both backends get the same token ids (never re-tokenized),
generate exactly `output_len` tokens per prompt (EOS ignored, greedy), and every measurement
is repeated `repeats` times and reported as the median.
"""

from __future__ import annotations

import gc
import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from tokenmill.errors import InvalidParameterError, TokenmillError
from tokenmill.metering import calibrate

# ---- prompt sets ----------------------------------------------------------------------------


def parse_length(spec: int | str) -> tuple[int, int]:
    """"128" -> (128, 128); "32:512" -> (32, 512); an int n -> (n, n)."""
    text = str(spec).strip()
    try:
        lo, hi = (text.split(":", 1) if ":" in text else (text, text))
        lo, hi = int(lo), int(hi)
    except ValueError:
        raise InvalidParameterError("length", f"{spec!r} is not a length or a range like 32:512") from None
    if lo < 1 or hi < lo:
        raise InvalidParameterError("length", f"{spec!r}: need 1 <= low <= high")
    return lo, hi


def spread_lengths(spec: int | str, num: int, seed: int | None = 0) -> list[int]:
    """`num` lengths spread evenly over the range `spec`, in a seeded random order."""
    if num < 1:
        raise InvalidParameterError("num_prompts", f"must be at least 1, got {num}")
    lo, hi = parse_length(spec)
    if num == 1:
        lengths = [round((lo + hi) / 2)]
    else:
        lengths = [round(lo + (hi - lo) * i / (num - 1)) for i in range(num)]
    random.Random(seed).shuffle(lengths)
    return lengths


def special_token_ids(tokenizer) -> set[int]:
    """Ids a synthetic prompt must not contain: special and added-special tokens, EOS ids."""
    hf = getattr(tokenizer, "hf", tokenizer)
    ids = set(getattr(hf, "all_special_ids", []) or [])
    for tid, tok in (getattr(hf, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", True):
            ids.add(int(tid))
    eos = getattr(tokenizer, "eos_token_ids", None)  # a list on tokenmill's Tokenizer, an int on a transformers one
    ids.update([eos] if isinstance(eos, int) else eos or [])
    return ids


def allowed_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """The ids random prompts draw from: the vocabulary without special tokens, which would end or reshape a prompt."""
    excluded = special_token_ids(tokenizer) if tokenizer is not None else set()
    allowed = [i for i in range(vocab_size) if i not in excluded]
    if not allowed:
        raise InvalidParameterError("vocab_size", "the vocabulary has no non-special tokens")
    return allowed


def synthetic_prompts(tokenizer, vocab_size: int, input_lens: Sequence[int], seed: int | None = 0) -> list[list[int]]:
    """Random token ids from the vocabulary (special tokens excluded), one prompt per length."""
    allowed = allowed_token_ids(tokenizer, vocab_size)
    rng = random.Random(None if seed is None else seed + 1)
    return [[allowed[rng.randrange(len(allowed))] for _ in range(n)] for n in input_lens]


def load_prompts_file(path: str | Path, tokenizer, num_prompts: int | None = None) -> list[list[int]]:
    """Token ids of the prompts in a JSONL file ({"prompt": ...} per line) or a plain text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError("prompts_file", f"{path.name}: no such file")
    if tokenizer is None:
        raise InvalidParameterError("prompts_file", "this model has no tokenizer to encode text prompts")
    texts: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidParameterError("prompts_file", f"{path.name} line {n}: bad JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise InvalidParameterError("prompts_file", f"{path.name} line {n}: no string \"prompt\" field")
            texts.append(record["prompt"])
        else:
            texts.append(line)
    if num_prompts is not None:
        texts = texts[:num_prompts]
    if not texts:
        raise InvalidParameterError("prompts_file", f"{path.name} holds no prompts")
    prompts = [tokenizer.encode(t) for t in texts]
    if any(not p for p in prompts):
        raise InvalidParameterError("prompts_file", f"{path.name}: a prompt encodes to no tokens")
    return prompts


# ---- results --------------------------------------------------------------------------------


@dataclass
class ThroughputResult:
    backend: str
    num_requests: int
    input_tokens: int
    output_tokens: int
    elapsed_s: float  # median over the runs
    runs_s: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def input_tokens_per_s(self) -> float:
        return self.input_tokens / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.elapsed_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(requests_per_s=self.requests_per_s, input_tokens_per_s=self.input_tokens_per_s,
                 output_tokens_per_s=self.output_tokens_per_s, total_tokens_per_s=self.total_tokens_per_s)
        return d


@dataclass
class DecodeResult:
    """Batch-1 decode speed: tokens after the first, over the time after the first (prefill excluded)."""

    backend: str
    prompt_tokens: int
    new_tokens: int
    decode_tokens_per_s: float  # median over the runs
    runs_tokens_per_s: list[float] = field(default_factory=list)
    ttft_s: float | None = None  # median time to the first token (prefill)

    def to_dict(self) -> dict:
        return asdict(self)


def _repeat(fn: Callable[[], float], repeats: int) -> list[float]:
    if repeats < 1:
        raise InvalidParameterError("repeats", f"must be at least 1, got {repeats}")
    return [fn() for _ in range(repeats)]


# ---- tokenmill ------------------------------------------------------------------------------


def _tm_run(llm, prompts: Sequence[list[int]], output_lens: Sequence[int]) -> tuple[float, int]:
    from tokenmill.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
    start = time.perf_counter()
    outs = llm.generate(list(prompts), params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def check_fits(prompts: Sequence[list[int]], output_lens: Sequence[int], max_model_len: int) -> None:
    worst = max(len(p) + n for p, n in zip(prompts, output_lens))
    if worst > max_model_len:
        raise InvalidParameterError(
            "input_len", f"a prompt plus its output needs {worst} tokens but max_model_len is {max_model_len}; "
                         "use shorter --input-len/--output-len or a larger --max-model-len/--kv-cache-memory")


def measure_tokenmill(llm, prompts: Sequence[list[int]], output_lens: Sequence[int], repeats: int = 3,
                      warmup: bool = True) -> ThroughputResult:
    """Run all prompts through `llm` (a tokenmill LLM) `repeats` times; median wall time."""
    check_fits(prompts, output_lens, llm.engine.max_model_len)
    if warmup:
        _tm_run(llm, [prompts[0][:8]], [2])
    accountant = llm.engine.accountant
    since = accountant.snapshot()
    produced: list[int] = []

    def once() -> float:
        llm.reset_prefix_cache()  # every run computes every prompt: repeats must not measure cache hits
        elapsed, n = _tm_run(llm, prompts, output_lens)
        produced.append(n)
        return elapsed

    runs = _repeat(once, repeats)
    expected = sum(output_lens)
    if any(n != expected for n in produced):
        raise TokenmillError(f"tokenmill produced {produced} output tokens, expected {expected} per run")
    input_tokens = sum(map(len, prompts))
    energy = accountant.report(since, input_tokens, expected, len(runs))
    return ThroughputResult("tokenmill", len(prompts), input_tokens, expected, statistics.median(runs), runs,
                            {"energy": energy})


def measure_tokenmill_decode(llm, prompt: list[int], new_tokens: int = 128, repeats: int = 3) -> DecodeResult:
    """Batch-1 decode tokens/s: one request, timed step by step from its first token to its last."""
    from tokenmill.sampling_params import SamplingParams

    engine = llm.engine
    check_fits([prompt], [new_tokens], engine.max_model_len)
    if new_tokens < 2:
        raise InvalidParameterError("new_tokens", "batch-1 decode needs at least 2 new tokens")
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    _tm_run(llm, [prompt[:8]], [2])  # warm-up
    ttfts: list[float] = []
    counter = iter(range(1 << 30))

    def once() -> float:
        request_id = f"bench-decode-{next(counter)}"
        engine.reset_prefix_cache()  # the TTFT of each run includes the whole prefill
        start = time.perf_counter()
        engine.add_request(request_id, list(prompt), params)
        first = last = None
        n = 0
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id != request_id:
                        continue
                    now = time.perf_counter()
                    n = len(out.outputs[0].token_ids)
                    if first is None:
                        first = now
                    last = now
        finally:
            engine.abort_request(request_id)
        if n != new_tokens or first is None or last == first:
            raise TokenmillError(f"batch-1 decode produced {n} tokens, expected {new_tokens}")
        ttfts.append(first - start)
        return (n - 1) / (last - first)

    runs = _repeat(once, repeats)
    return DecodeResult("tokenmill", len(prompt), new_tokens, statistics.median(runs), runs, statistics.median(ttfts))


# ---- Hugging Face transformers --------------------------------------------------------------


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

    runs = _repeat(once, repeats)
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

    runs = _repeat(once, repeats)
    return DecodeResult("hf", len(prompt), new_tokens, statistics.median(runs), runs, statistics.median(ttfts))


# ---- the whole benchmark --------------------------------------------------------------------


def model_label(model: str | None, engine_name: str) -> str:
    """A name for reports that never records a local path: the folder or file name for paths."""
    if model is None:
        return engine_name
    path = Path(str(model)).expanduser()
    return path.name if path.exists() else str(model)


def run_throughput_benchmark(model: str | None = None, *, num_prompts: int | None = None,
                             input_len: int | str = "32:512", output_len: int | str = 128,
                             prompts_file: str | None = None, seed: int | None = 0, repeats: int = 3,
                             compare_hf: bool = False, hf_batch_size: int | None = None,
                             batch1: bool = False, batch1_tokens: int = 128, batch1_input_len: int = 32,
                             engine_args: dict | None = None,
                             log: Callable[[str], None] | None = None) -> dict:
    """Measure tokenmill (and optionally transformers) on one prompt set; return a JSON-ready dict."""
    from tokenmill.entrypoints.llm import LLM

    say = log or (lambda msg: None)
    engine_args = dict(engine_args or {})
    if seed is not None:
        engine_args.setdefault("seed", seed)
    say("loading tokenmill engine")
    llm = LLM(model, **engine_args)
    engine = llm.engine
    if engine.accountant.roofline is None:
        say("measuring this machine's roofline once (`tokenmill calibrate`; cached)")
        engine.accountant.roofline = calibrate.roofline_for(calibrate.load_or_measure(engine.device), engine.dtype)
    tokenizer = engine.tokenizer
    if prompts_file:
        prompts = load_prompts_file(prompts_file, tokenizer, num_prompts)
        input_spec: str | int = "file"
    else:
        num = num_prompts if num_prompts is not None else 64
        prompts = synthetic_prompts(tokenizer, engine.model_config.vocab_size, spread_lengths(input_len, num, seed), seed)
        input_spec = str(input_len)
    output_lens = spread_lengths(output_len, len(prompts), None if seed is None else seed + 2)
    check_fits(prompts, output_lens, engine.max_model_len)
    decode_prompt = None
    if batch1:
        decode_prompt = synthetic_prompts(tokenizer, engine.model_config.vocab_size, [batch1_input_len],
                                          None if seed is None else seed + 3)[0]
        check_fits([decode_prompt], [batch1_tokens], engine.max_model_len)

    result: dict = {
        "model": model_label(model, engine.model_name),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": engine.device.type,
        "num_prompts": len(prompts),
        "input_len": input_spec,
        "output_len": str(output_len),
        "seed": seed,
        "repeats": repeats,
        "total_input_tokens": sum(map(len, prompts)),
        "total_output_tokens": sum(output_lens),
        "engine_args": {k: v for k, v in engine_args.items()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": _transformers_version(), "threads": torch.get_num_threads(),
                        "machine": platform.machine()},
    }
    say(f"tokenmill: {len(prompts)} prompts, {result['total_input_tokens']} input + "
        f"{result['total_output_tokens']} output tokens, {repeats} run(s)")
    result["tokenmill"] = measure_tokenmill(llm, prompts, output_lens, repeats).to_dict()
    if decode_prompt is not None:
        say(f"tokenmill: batch-1 decode of {batch1_tokens} tokens")
        result["batch1"] = {"prompt_tokens": len(decode_prompt), "new_tokens": batch1_tokens,
                            "tokenmill": measure_tokenmill_decode(llm, decode_prompt, batch1_tokens, repeats).to_dict()}
    dtype = engine.dtype
    del llm, engine
    gc.collect()

    if compare_hf:
        say("loading the transformers model")
        hf_model = load_hf_model(model, dtype)
        say(f"transformers: batch size {hf_batch_size or len(prompts)}, {repeats} run(s)")
        result["hf"] = measure_hf(hf_model, prompts, output_lens, hf_batch_size, repeats).to_dict()
        result["ratio"] = {k: result["tokenmill"][k] / result["hf"][k]
                           for k in ("requests_per_s", "input_tokens_per_s", "output_tokens_per_s", "total_tokens_per_s")}
        if decode_prompt is not None:
            say(f"transformers: batch-1 decode of {batch1_tokens} tokens")
            result["batch1"]["hf"] = measure_hf_decode(hf_model, decode_prompt, batch1_tokens, repeats).to_dict()
            result["batch1"]["ratio"] = (result["batch1"]["tokenmill"]["decode_tokens_per_s"]
                                         / result["batch1"]["hf"]["decode_tokens_per_s"])
        del hf_model
        gc.collect()
    return result


def _transformers_version() -> str | None:
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return None


# ---- reporting ------------------------------------------------------------------------------


def format_text(result: dict) -> str:
    """Plain-text summary, as the CLI prints it."""
    lines = [f"model {result['model']} ({result['dtype']}, {result['device']}), {result['num_prompts']} prompts, "
             f"{result['total_input_tokens']} input + {result['total_output_tokens']} output tokens, "
             f"median of {result['repeats']}"]
    for key in ("tokenmill", "hf"):
        r = result.get(key)
        if r is None:
            continue
        lines.append(f"{key:>9}: {r['elapsed_s']:.2f} s  {r['requests_per_s']:.2f} requests/s  "
                     f"{r['input_tokens_per_s']:.1f} input tok/s  {r['output_tokens_per_s']:.1f} output tok/s  "
                     f"{r['total_tokens_per_s']:.1f} total tok/s")
    if "ratio" in result:
        lines.append(f"    ratio: tokenmill / hf = {result['ratio']['total_tokens_per_s']:.2f}x")
    lines.extend(energy_lines(result["tokenmill"]["extra"].get("energy")))
    b1 = result.get("batch1")
    if b1:
        for key in ("tokenmill", "hf"):
            if key in b1:
                lines.append(f"batch-1 decode {key}: {b1[key]['decode_tokens_per_s']:.1f} tok/s "
                             f"({b1['new_tokens']} new tokens, {b1['prompt_tokens']}-token prompt)")
        if "ratio" in b1:
            lines.append(f"batch-1 decode ratio: tokenmill / hf = {b1['ratio']:.2f}x")
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """A markdown table: one row per metric, tokenmill vs transformers and the ratio."""
    has_hf = "hf" in result
    head = "| metric | tokenmill | HF transformers | ratio |" if has_hf else "| metric | tokenmill |"
    sep = "|---|---:|---:|---:|" if has_hf else "|---|---:|"
    rows = [head, sep]
    metrics = [("requests/s", "requests_per_s", 2), ("input tok/s", "input_tokens_per_s", 1),
               ("output tok/s", "output_tokens_per_s", 1), ("total tok/s", "total_tokens_per_s", 1),
               ("wall time (s)", "elapsed_s", 2)]
    for label, key, digits in metrics:
        tm = result["tokenmill"][key]
        if has_hf:
            hf = result["hf"][key]
            ratio = hf / tm if key == "elapsed_s" else tm / hf
            rows.append(f"| {label} | {tm:.{digits}f} | {hf:.{digits}f} | {ratio:.2f}x |")
        else:
            rows.append(f"| {label} | {tm:.{digits}f} |")
    rows.extend(f"| {label} | {value} |" + (" | |" if has_hf else "")
                for label, value in energy_rows(result["tokenmill"]["extra"].get("energy")))
    b1 = result.get("batch1")
    if b1:
        tm = b1["tokenmill"]["decode_tokens_per_s"]
        label = f"batch-1 decode tok/s ({b1['new_tokens']} tokens)"
        if "hf" in b1:
            rows.append(f"| {label} | {tm:.1f} | {b1['hf']['decode_tokens_per_s']:.1f} | {b1['ratio']:.2f}x |")
        else:
            rows.append(f"| {label} | {tm:.1f} |")
    return "\n".join(rows)


def energy_rows(energy: dict | None) -> list[tuple[str, str]]:
    """(label, value) pairs of an accountant report; the meter's name says when it is an estimate."""
    if not energy:
        return []
    rows = []
    if energy["energy_joules"] is not None:
        meter = energy["energy_meter"]  # an estimator's name starts with "estimated"
        rows.append((f"J / output token, {meter}", f"{energy['joules_per_output_token']:.3f}"))
        rows.append((f"J / token (input + output), {meter}", f"{energy['joules_per_token']:.3f}"))
    for phase, tokens in (("prefill", "input"), ("decode", "output")):
        p = energy[phase]
        if p["usd_per_1m_tokens"] is not None:
            rows.append((f"$ / 1M {tokens} tokens ({phase} steps)", f"{p['usd_per_1m_tokens']:.4f}"))
        if p["roofline_fraction"] is not None:
            rows.append((f"{phase} roofline fraction", f"{p['roofline_fraction']:.3f}"))
        elif p.get("roofline_error"):
            rows.append((f"{phase} roofline fraction", p["roofline_error"]))
    return rows


def energy_lines(energy: dict | None) -> list[str]:
    return [f"{label}: {value}" for label, value in energy_rows(energy)]


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path

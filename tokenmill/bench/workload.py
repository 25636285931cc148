"""What `tokenmill bench serve` sends, and when: prompts and their arrival times.

Prompts are either synthetic (random tokens of the server's vocabulary, decoded to text whose
token count is exact, optionally behind one shared prefix) or read from a JSONL file. Arrival
times follow vLLM's benchmark_serving: gamma-distributed gaps with mean 1/rate, where the
shape (burstiness) 1 is a Poisson process and rate inf sends everything at once.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenmill.bench.prompts import allowed_token_ids, parse_length
from tokenmill.errors import InvalidParameterError, ModelLoadError, TokenmillError

FIT_TRIES = 32  # re-encode rounds before a synthetic prompt gives up on an exact length


@dataclass
class BenchRequest:
    """One prompt to send: its text, the tokens to generate, and its token count when known."""

    prompt: str
    output_len: int
    prompt_len: int | None = None  # tokens of the text alone (specials the server adds not counted)
    tenant: str | None = None  # sent as `user`
    priority: int | None = None  # sent as `priority` (vLLM's extension field)


@dataclass
class TenantSpec:
    """One tenant of a multi-tenant workload: its own prompts, output lengths and arrival process."""

    name: str
    num_prompts: int = 100
    rate: float = 1.0  # requests per second, or inf
    burstiness: float = 1.0
    input_len: int | str = 128
    output_len: int | str = 128
    priority: int | None = None

    KEYS = {"name": "name", "num": "num_prompts", "rate": "rate", "burstiness": "burstiness", "input": "input_len",
            "output": "output_len", "priority": "priority"}

    @classmethod
    def parse(cls, spec: str) -> "TenantSpec":
        """From "name=chat,num=100,rate=2,input=64:256,output=16:64[,burstiness=0.5][,priority=0]"."""
        fields: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in cls.KEYS:
                raise InvalidParameterError("tenant", f"{spec!r}: {item!r} is not one of "
                                                      f"{', '.join(k + '=...' for k in cls.KEYS)}")
            fields[cls.KEYS[key]] = value
        if not fields.get("name"):
            raise InvalidParameterError("tenant", f"{spec!r}: give the tenant a name=...")
        try:
            for name, kind in (("num_prompts", int), ("rate", float), ("burstiness", float), ("priority", int)):
                if name in fields:
                    fields[name] = kind(fields[name])
        except ValueError as e:
            raise InvalidParameterError("tenant", f"{spec!r}: {e}") from None
        tenant = cls(**fields)
        if tenant.num_prompts < 1:
            raise InvalidParameterError("tenant", f"{spec!r}: num must be at least 1")
        check_arrivals(tenant.rate, tenant.burstiness)
        parse_length(tenant.input_len)
        parse_length(tenant.output_len)
        return tenant


# ---- lengths and arrivals -------------------------------------------------------------------


def sample_lengths(spec: int | str, num: int, rng: np.random.Generator) -> list[int]:
    """`num` lengths drawn uniformly from the range `spec` ("128" or "32:512", ends included)."""
    lo, hi = parse_length(spec)
    return rng.integers(lo, hi, endpoint=True, size=num).tolist()


def check_arrivals(rate: float, burstiness: float) -> None:
    """A rate is a positive number of requests per second or inf; burstiness a positive gamma shape."""
    if not rate > 0:
        raise InvalidParameterError("request_rate", f"must be a positive number or inf, got {rate}")
    if not burstiness > 0:
        raise InvalidParameterError("burstiness", f"must be positive, got {burstiness}")


def arrival_times(num: int, rate: float, burstiness: float = 1.0, seed: int | None = 0) -> list[float]:
    """Send times in seconds from the start (the first is 0) of `num` requests at `rate` per second.

    The gaps are gamma-distributed with shape `burstiness` and mean 1/rate, so their variance is
    1 / (rate^2 * burstiness): below 1 the traffic comes in bursts, above 1 it is steadier.
    """
    check_arrivals(rate, burstiness)
    if math.isinf(rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(num - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:num]


# ---- synthetic prompts ----------------------------------------------------------------------


def load_tokenizer(name: str | None):
    """The tokenizer synthetic prompts are counted with: a HF folder or hub id, a .gguf file, or
    (None) the default model's, read through the loader without loading any weights."""
    if name is None or str(name).endswith(".gguf"):
        from tokenmill.loader.checkpoint import load_checkpoint

        tokenizer = load_checkpoint(name).tokenizer
        if tokenizer is None:
            raise ModelLoadError(f"{Path(str(name)).name if name else 'the default model'} has no tokenizer")
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(name))
    except Exception as e:  # transformers raises many types for "cannot load this"
        raise ModelLoadError(f"tokenizer {name!r} could not be loaded: {e}") from e


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def text_token_pool(tokenizer) -> np.ndarray:
    """The ids synthetic text draws from: non-special tokens that decode to whole characters.

    A byte token or part of a multi-byte character decodes to U+FFFD, which re-encodes to
    other tokens; leaving those out lets the fitting below converge in a round or two.
    """
    allowed = allowed_token_ids(tokenizer, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in allowed])
    pool = [i for i, text in zip(allowed, texts) if text and "\ufffd" not in text]
    if not pool:
        raise InvalidParameterError("tokenizer", "no token decodes to plain text")
    return np.array(pool)


def fit_prompt(tokenizer, prefix_ids: list[int], length: int, pool: np.ndarray, rng: np.random.Generator) -> str:
    """Text that encodes to `prefix_ids` followed by exactly `length` random tokens.

    Decoded random ids seldom re-encode to themselves (pieces merge across their boundaries),
    so the text is re-encoded and its tokens trimmed or topped up until the count holds, as
    vLLM's random dataset does; the prefix is decoded together with the rest so its last piece
    keeps its spacing, and a draw that changes the prefix's tokens is thrown away.
    """
    prefix_text = tokenizer.decode(prefix_ids)
    ids = rng.choice(pool, size=length).tolist()
    for _ in range(FIT_TRIES):
        text = tokenizer.decode(prefix_ids + ids)
        got = _encode(tokenizer, text)
        if not (text.startswith(prefix_text) and got[:len(prefix_ids)] == prefix_ids):
            ids = rng.choice(pool, size=length).tolist()  # the boundary merged into the prefix: draw again
            continue
        if len(got) == len(prefix_ids) + length:
            return text
        ids = got[len(prefix_ids):][:length]
        ids += rng.choice(pool, size=length - len(ids)).tolist()
    raise TokenmillError(f"could not make a prompt of exactly {length} tokens with this tokenizer "
                         f"in {FIT_TRIES} tries; try another --seed or length")


def check_prefix_len(shared_prefix_len: int, input_len: int | str) -> None:
    """The shared prefix is part of every prompt, so it fits in the shortest one."""
    lo, _ = parse_length(input_len)
    if not 0 <= shared_prefix_len <= lo:
        raise InvalidParameterError("shared_prefix_len", f"must be between 0 and the shortest input length {lo}, "
                                                         f"got {shared_prefix_len}")


def synthetic_requests(tokenizer, num_prompts: int, input_len: int | str, output_len: int | str,
                       shared_prefix_len: int = 0, seed: int | None = 0) -> list[BenchRequest]:
    """`num_prompts` random-token prompts of `input_len` tokens each (shared prefix included)."""
    check_prefix_len(shared_prefix_len, input_len)
    rng = np.random.default_rng(seed)
    input_lens = sample_lengths(input_len, num_prompts, rng)
    output_lens = sample_lengths(output_len, num_prompts, rng)
    pool = text_token_pool(tokenizer)
    prefix_ids = _encode(tokenizer, fit_prompt(tokenizer, [], shared_prefix_len, pool, rng)) if shared_prefix_len else []
    return [BenchRequest(fit_prompt(tokenizer, prefix_ids, n - shared_prefix_len, pool, rng), out, n)
            for n, out in zip(input_lens, output_lens)]


# ---- a JSONL dataset ------------------------------------------------------------------------


def _dataset_line(record, default_output_len: int, where: str) -> BenchRequest:
    """One dataset line's request; says which line is wrong and how."""
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise InvalidParameterError("dataset", f"{where}: need an object with a string \"prompt\"")
    output_len = record.get("output_len", default_output_len)
    if isinstance(output_len, bool) or not isinstance(output_len, int) or output_len < 1:
        raise InvalidParameterError("dataset", f"{where}: \"output_len\" must be a positive integer, got {output_len!r}")
    return BenchRequest(record["prompt"], output_len)


def load_dataset(path: str | Path, num_prompts: int | None = None, output_len: int | str = 128,
                 seed: int | None = 0) -> list[BenchRequest]:
    """Requests from a JSONL file, one {"prompt": str, "output_len": int (optional)} per line.

    Lines without "output_len" draw one from `output_len`; `num_prompts` takes the first lines
    and must not ask for more than the file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError("dataset", f"{path.name}: no such file")
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if num_prompts is not None and num_prompts > len(lines):
        raise InvalidParameterError("dataset", f"{path.name} holds {len(lines)} prompts, fewer than --num-prompts {num_prompts}")
    lines = lines[:num_prompts]
    if not lines:
        raise InvalidParameterError("dataset", f"{path.name} holds no prompts")
    defaults = sample_lengths(output_len, len(lines), np.random.default_rng(seed))
    requests = []
    for (n, line), default in zip(lines, defaults):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidParameterError("dataset", f"{path.name} line {n}: bad JSON ({e})") from None
        requests.append(_dataset_line(record, default, f"{path.name} line {n}"))
    return requests


# ---- several tenants ------------------------------------------------------------------------


def tenant_workload(tokenizer, tenants: list[TenantSpec], seed: int | None = 0) -> tuple[list[BenchRequest], list[float]]:
    """Every tenant's synthetic requests, each tenant arriving on its own clock; merged in arrival order."""
    timed: list[tuple[float, int, BenchRequest]] = []
    for i, tenant in enumerate(tenants):
        tenant_seed = None if seed is None else seed + i
        requests = synthetic_requests(tokenizer, tenant.num_prompts, tenant.input_len, tenant.output_len, 0, tenant_seed)
        times = arrival_times(tenant.num_prompts, tenant.rate, tenant.burstiness, tenant_seed)
        for request, at in zip(requests, times):
            request.tenant, request.priority = tenant.name, tenant.priority
            timed.append((at, len(timed), request))
    timed.sort(key=lambda item: item[:2])
    return [r for _, _, r in timed], [t for t, _, _ in timed]

"""The simulator's requests: what `tokenmill bench serve` would send, as token ids, or a JSONL trace.

Synthetic workloads take bench serve's knobs (rate, burstiness, length ranges, a shared prefix,
tenants) and draw lengths and arrival times the same way; prompts are random token ids, so
only the prefixes meant to be shared are. `num_prefixes` > 1 gives several families of prompts,
each behind its own shared prefix (the case prefix-aware routing is for). Requests are made as
the simulation reaches them, so a million of them never sit in memory at once.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from tokenmill.bench.workload import TenantSpec, arrival_times, check_arrivals, check_prefix_len, sample_lengths
from tokenmill.errors import InvalidParameterError
from tokenmill.sim.simulator import SimRequest

DRAWN_TOGETHER = 1024  # requests whose prompt tokens are drawn at once


@dataclass
class WorkloadSpec:
    num_prompts: int = 100
    request_rate: float = math.inf
    burstiness: float = 1.0
    input_len: int | str = 128  # tokens, or a range "lo:hi"
    output_len: int | str = 128
    shared_prefix_len: int = 0
    num_prefixes: int = 1  # families of prompts, each behind its own shared prefix
    tenants: list[TenantSpec] = field(default_factory=list)  # several tenants instead of the fields above
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise InvalidParameterError("num_prompts", f"must be at least 1, got {self.num_prompts}")
        if self.num_prefixes < 1:
            raise InvalidParameterError("num_prefixes", f"must be at least 1, got {self.num_prefixes}")
        check_arrivals(self.request_rate, self.burstiness)
        check_prefix_len(self.shared_prefix_len, self.input_len)
        sample_lengths(self.output_len, 1, np.random.default_rng(0))


def synthetic(spec: WorkloadSpec) -> Iterator[SimRequest]:
    if spec.tenants:
        return heapq.merge(*(_stream(spec.vocab_size, t.num_prompts, t.rate, t.burstiness, t.input_len, t.output_len,
                                      0, 1, spec.seed + i, t.name, t.priority or 0)
                              for i, t in enumerate(spec.tenants)), key=lambda r: r.arrival)
    return _stream(spec.vocab_size, spec.num_prompts, spec.request_rate, spec.burstiness, spec.input_len,
                   spec.output_len, spec.shared_prefix_len, spec.num_prefixes, spec.seed)


def _stream(vocab: int, num: int, rate: float, burstiness: float, input_len, output_len, prefix_len: int,
            num_prefixes: int, seed: int, tenant: str = "", priority: int = 0) -> Iterator[SimRequest]:
    rng = np.random.default_rng(seed)
    inputs = sample_lengths(input_len, num, rng)
    outputs = sample_lengths(output_len, num, rng)
    times = arrival_times(num, rate, burstiness, seed)
    prefixes = [rng.integers(0, vocab, size=prefix_len).tolist() for _ in range(num_prefixes)]
    # Every token id one object: the blocks a long run keeps cached then hold references, not copies.
    vocab_ids = np.array(range(vocab), dtype=object)
    for first in range(0, num, DRAWN_TOGETHER):
        # One draw for the suffixes of many requests: the same tokens as a draw per request, faster.
        lengths = [int(n) - prefix_len for n in inputs[first:first + DRAWN_TOGETHER]]
        tokens = vocab_ids[rng.integers(0, vocab, size=sum(lengths))].tolist()
        start = 0
        for i, length in enumerate(lengths, first):
            prefix = prefixes[i % num_prefixes]
            suffix = tokens[start:start + length]
            yield SimRequest(times[i], prefix + suffix if prefix else suffix, outputs[i], tenant, priority)
            start += length


def load_trace(path: str | Path, vocab_size: int = 32000, seed: int = 0,
               max_len: int | None = None) -> Iterator[SimRequest]:
    """Requests from a JSONL trace, one per line: {"arrival": seconds, "output_len": n, and either
    "prompt_ids": [...] (ids below `vocab_size`) or "input_len": n (random tokens) with an optional
    "prefix": name and "prefix_len": n (lines naming the same prefix share its first prefix_len
    tokens), "tenant", "priority"}. Lines must come in arrival order; a prompt must be shorter than
    `max_len` tokens (checked before any token is drawn)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError("trace", f"{path.name}: no such file")
    rng = np.random.default_rng(seed)
    prefixes: dict[str, list[int]] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {n}"
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("a line must be a JSON object")
                yield _trace_request(record, prefixes, rng, vocab_size, max_len)
            except (ValueError, TypeError, KeyError) as e:
                raise InvalidParameterError("trace", f"{where}: {e}") from None


def _trace_request(record: dict, prefixes: dict[str, list[int]], rng: np.random.Generator, vocab: int,
                   max_len: int | None) -> SimRequest:
    arrival, output_len = float(record["arrival"]), int(record["output_len"])
    if not (arrival >= 0 and output_len >= 1):
        raise ValueError("need arrival >= 0 and output_len >= 1")
    if "prompt_ids" in record:
        ids = record["prompt_ids"]
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt_ids must be a list of token ids from 0 to {vocab - 1}")
    else:
        length = int(record["input_len"])
        if max_len is not None and length >= max_len:
            raise ValueError(f"input_len {length} does not fit max_model_len {max_len}")
        prefix_len = int(record.get("prefix_len", 0))
        if not 0 <= prefix_len <= length:
            raise ValueError(f"prefix_len {prefix_len} must be between 0 and input_len {length}")
        shared = prefixes.setdefault(str(record.get("prefix")), []) if record.get("prefix") is not None else []
        if len(shared) < prefix_len:
            shared += rng.integers(0, vocab, size=prefix_len - len(shared)).tolist()
        ids = shared[:prefix_len] + rng.integers(0, vocab, size=length - prefix_len).tolist()
    if not ids:
        raise ValueError("the prompt is empty")
    return SimRequest(arrival, ids, output_len, str(record.get("tenant", "")), int(record.get("priority", 0)))

"""The prompt sets of the offline benchmarks: synthetic token ids of spread lengths, or a prompts file.

Prompts are token ids, never re-tokenized, so every backend gets the same input; synthetic ones
draw from the vocabulary without its special tokens, which would end or reshape a prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from tokenmill.errors import InvalidParameterError


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


def check_fits(prompts: Sequence[list[int]], output_lens: Sequence[int], max_model_len: int) -> None:
    worst = max(len(p) + n for p, n in zip(prompts, output_lens))
    if worst > max_model_len:
        raise InvalidParameterError(
            "input_len", f"a prompt plus its output needs {worst} tokens but max_model_len is {max_model_len}; "
                         "use shorter --input-len/--output-len or a larger --max-model-len/--kv-cache-memory")

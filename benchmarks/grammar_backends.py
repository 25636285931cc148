"""Grammar libraries for structured output, side by side on this CPU: xgrammar and llguidance.

    python benchmarks/grammar_backends.py [--repeats 5] [--batch 32] [--libs xgrammar,llguidance]
                                          [--model PATH.gguf] [--output results/grammar_backends.json]

Neither library is a tokenmill dependency; install them without letting pip replace the CPU torch
(xgrammar's metadata asks for triton, which a CPU engine never uses):

    pip install --no-deps xgrammar apache-tvm-ffi llguidance

The tokenizer is the default model's (SmolLM2-135M-Instruct GGUF, vocabulary 49152), obtained the way
the engine does (`load_checkpoint`); the masks are as wide as the model's logits (`hf_config.vocab_size`)
and EOS is the engine's list of EOS ids. What is measured, per library:

- compile time of a 20-field JSON schema (enums, patterns, bounded integers and numbers, booleans, an
  array of objects, a nested object, optional fields), median of --repeats, cold (a fresh compiler each
  time) and from the library's cache where it has one (xgrammar: GrammarCompiler's cache; llguidance
  has none: a compiled template matcher's deep_copy stands in for it); also json_object, a regex, a
  choice list, a Lark grammar and a GBNF/EBNF grammar; and the time to the first mask (compile, new
  matcher, first mask);
- the per-token mask: matchers are driven through valid instances of the schema token by token (the
  instance as the tokenizer encodes it), timing the next-token bitmask before each token; batch 1
  (one row of a [1, vocab/32] int32 bitmask) and batch --batch (rows of one [B, vocab/32] bitmask,
  filled with the library's parallel batch call and, for comparison, row by row); then the time to
  accept the token, and to apply a bitmask to [B, vocab] float32 logits (xgrammar's CPU kernel, two
  eager torch versions, llguidance's torch.compile'd helper);
- rollback of 1, 4 and 8 tokens (speculative decoding) and checking a draft of 4 tokens;
- the error each library gives for invalid schemas, and whether it comes at compile time;
- resident memory growth from compiling the schema (each library measured in a child process).

Checks on the way: EOS is the only token allowed after a complete document and terminates the matcher;
special tokens inside a JSON string; JSON escapes inside strings with maxLength / pattern; whether a
matcher survives a refused token. Every document must pass both libraries, or the script stops.

The percentages are of tokenmill's decode step on this CPU (batch 1: 6-9 ms, batch 32: 30-60 ms), the
range covering both ends: the mask alone, and mask + accept + apply with the fastest apply that needs no
torch.compile. Medians are over all repeats (per-token figures: the median over repeats of each run's
median or p95); the 1-minute load average is printed before and after: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

STEP_MS = {1: (6.0, 9.0), 32: (30.0, 60.0)}  # tokenmill's decode step on this CPU, from the issue
LIBS = ("xgrammar", "llguidance")

# --- the grammars ---------------------------------------------------------------------------------

COUNTRIES = ["US", "GB", "FR", "DE", "JP", "BR", "IN", "CA"]


def schema_20(tag: str = "") -> dict:
    """20 top-level fields, 14 required. `tag` varies an enum so each variant compiles to a new grammar."""
    return {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 1000000},
            "name": {"type": "string", "minLength": 1, "maxLength": 40},
            "email": {"type": "string", "pattern": "^[a-z]{3,10}\\.[a-z]{3,10}@[a-z]{3,8}\\.(com|org|net)$"},
            "status": {"type": "string", "enum": ["active", "inactive", "banned", "pending" + tag]},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "score": {"type": "number"},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "verified": {"type": "boolean"},
            "admin": {"type": "boolean"},
            "country": {"type": "string", "enum": COUNTRIES},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "created": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
            "orders": {
                "type": "array", "minItems": 1, "maxItems": 6,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                        "price": {"type": "number", "minimum": 0},
                        "gift": {"type": "boolean"},
                    },
                    "required": ["sku", "qty", "price"],
                    "additionalProperties": False,
                },
            },
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string"},
                    "city": {"type": "string"},
                    "geo": {
                        "type": "object",
                        "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                        "required": ["lat", "lon"],
                        "additionalProperties": False,
                    },
                },
                "required": ["street", "city"],
                "additionalProperties": False,
            },
            "nickname": {"type": "string", "maxLength": 20},
            "phone": {"type": "string", "pattern": "^\\+[0-9]{7,12}$"},
            "priority": {"type": "string", "enum": ["low", "medium", "high"]},
            "balance": {"type": "number", "minimum": -1000},
            "notes": {"type": "string"},  # unbounded: xgrammar drops escapes from bounded strings (see below)
        },
        "required": ["id", "name", "email", "status", "age", "score", "ratio", "verified", "admin",
                     "country", "created", "orders", "address", "priority"],
        "additionalProperties": False,
    }


def instance(rng: random.Random) -> dict:
    """A random valid instance of schema_20, optional fields present or not, keys in schema order."""
    word = lambda a, b: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(a, b)))
    doc: dict = {
        "id": rng.randint(1, 1000000),
        "name": f"{word(3, 8).title()} {word(3, 10).title()}",
        "email": f"{word(3, 10)}.{word(3, 10)}@{word(3, 8)}.{rng.choice(['com', 'org', 'net'])}",
        "status": rng.choice(["active", "inactive", "banned"]),
        "age": rng.randint(0, 150),
        "score": round(rng.uniform(-100, 100), rng.randint(0, 4)),
        "ratio": round(rng.random(), 3),
        "verified": rng.random() < 0.5,
        "admin": rng.random() < 0.2,
        "country": rng.choice(COUNTRIES),
    }
    if rng.random() < 0.7:
        doc["zip"] = f"{rng.randint(0, 99999):05d}"
    doc["created"] = f"20{rng.randint(10, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if rng.random() < 0.8:
        doc["tags"] = [word(2, 10) for _ in range(rng.randint(0, 5))]
    doc["orders"] = [{"sku": f"{word(3, 3).upper()}-{rng.randint(0, 9999):04d}", "qty": rng.randint(1, 99),
                      "price": round(rng.uniform(0, 500), 2), **({"gift": True} if rng.random() < 0.3 else {})}
                     for _ in range(rng.randint(1, 4))]
    doc["address"] = {"street": f"{rng.randint(1, 999)} {word(4, 9).title()} St", "city": word(4, 10).title()}
    if rng.random() < 0.6:
        doc["address"]["geo"] = {"lat": round(rng.uniform(-90, 90), 5), "lon": round(rng.uniform(-180, 180), 5)}
    if rng.random() < 0.5:
        doc["nickname"] = word(3, 12)
    if rng.random() < 0.5:
        doc["phone"] = "+" + "".join(rng.choice("0123456789") for _ in range(rng.randint(7, 12)))
    doc["priority"] = rng.choice(["low", "medium", "high"])
    if rng.random() < 0.6:
        doc["balance"] = round(rng.uniform(-1000, 10000), 2)
    if rng.random() < 0.7:  # escapes and multi-byte characters inside a string
        doc["notes"] = rng.choice(['Prefers "express" delivery, café at the corner', "Line one\nline two\ttabbed",
                                   "Paid in € and ¥ — twice", "plain note"])
    return doc


REGEX_EMAIL = r"[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,4}"
CHOICES = ["positive", "negative", "neutral", "mixed", "not applicable"]
LARK = r"""start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+(\.[0-9]+)?/
"""
EBNF = r"""root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]+ ("." [0-9]+)?
"""
INVALID_SCHEMAS = {
    "dangling $ref": '{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}',
    "type typo": '{"type": "strin"}',
    "bad pattern": '{"type": "string", "pattern": "[a-"}',
    "minimum > maximum": '{"type": "integer", "minimum": 5, "maximum": 1}',
    "unknown format": '{"type": "string", "format": "credit-card"}',
    "not JSON": '{"type": "object"',
}


# --- the two libraries behind one small interface (what a tokenmill backend would wrap) -------------

class XGrammar:
    """compile -> xgrammar.CompiledGrammar (shared by every request with that grammar); matcher ->
    xgrammar.GrammarMatcher."""

    name = "xgrammar"

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids: list[int], threads: int, blank_specials: bool = False):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_words = (vocab_size + 31) // 32  # int32 words per bitmask row
        t0 = now()
        if blank_specials:
            self.info = self.info_without_specials(hf_tokenizer, vocab_size, eos_ids)
        else:
            self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=eos_ids)
        self.tokenizer_info_ms = (now() - t0) / 1e6
        self.threads = threads
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads)  # cache on
        self.batchers = {threads: xgr.BatchGrammarMatcher(max_threads=threads), 1: xgr.BatchGrammarMatcher(max_threads=1)}

    def info_without_specials(self, hf_tokenizer, vocab_size: int, eos_ids: list[int]):
        """from_huggingface finds no special tokens in this vocabulary (special_token_ids == []), so
        <|endoftext|>, <|im_start|>, ... count as their literal text and are allowed inside JSON
        strings. An empty vocabulary entry is what xgrammar treats as special: blank them."""
        vocab = [""] * vocab_size
        for text, i in hf_tokenizer.get_vocab().items():
            if i < vocab_size:
                vocab[i] = text
        for i, t in hf_tokenizer.added_tokens_decoder.items():
            if t.special and i < vocab_size:
                vocab[i] = ""
        probe = self.xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=eos_ids)
        return self.xgr.TokenizerInfo(vocab, probe.vocab_type, vocab_size=vocab_size, stop_token_ids=eos_ids,
                                      add_prefix_space=probe.add_prefix_space)

    def compile(self, kind: str, spec, *, cold: bool = True):
        c = self.xgr.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False) if cold else self.compiler
        if kind == "json_schema":
            return c.compile_json_schema(spec if isinstance(spec, str) else json.dumps(spec))
        if kind == "json_object":  # what vLLM compiles for response_format json_object
            return c.compile_builtin_json_grammar()
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "choice":  # as vLLM does: an EBNF alternation of string literals
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec))
        if kind == "lark":
            return c.compile_lark(spec)
        if kind == "ebnf":
            return c.compile_grammar(spec)
        raise ValueError(kind)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)

    def fill(self, m, bitmask: torch.Tensor, row: int = 0) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers, bitmask: torch.Tensor, threads: int) -> None:
        self.batchers[threads].batch_fill_next_token_bitmask(matchers, bitmask)

    def accept_batch(self, matchers, tokens: list[int]) -> list[bool]:
        return self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)

    def terminated(self, m) -> bool:
        return m.is_terminated()

    def rollback(self, m, n: int) -> None:
        m.rollback(n)

    def reset(self, m) -> None:
        m.reset()

    def draft_ok(self, m, draft: list[int]) -> int:
        """How many draft tokens the grammar takes, leaving the matcher as it was."""
        n = 0
        for t in draft:
            if not m.accept_token(t):
                break
            n += 1
        if n:
            m.rollback(n)
        return n



class LLGuidance:
    """compile -> an llguidance.LLMatcher built from the grammar (this is where llguidance checks the
    grammar and reports errors); matcher -> that template's deep_copy()."""

    name = "llguidance"

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids: list[int], threads: int):
        import llguidance
        import llguidance.hf  # not llguidance.torch: importing it imports torch._dynamo (a torch.compile'd helper)

        self.llg = llguidance
        self.vocab_words = (vocab_size + 31) // 32  # int32 words per bitmask row
        t0 = now()
        self.tok = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        self.tokenizer_info_ms = (now() - t0) / 1e6
        self.executors = {threads: llguidance.LLExecutor(num_threads=threads), 1: llguidance.LLExecutor(num_threads=1)}
        self.threads = threads

    def grammar(self, kind: str, spec) -> str:
        g = self.llg
        if kind == "json_schema":
            return g.LLMatcher.grammar_from_json_schema(spec if isinstance(spec, str) else json.dumps(spec))
        if kind == "json_object":  # what vLLM passes for json_object
            return g.LLMatcher.grammar_from_json_schema('{"type": "object"}')
        if kind == "regex":
            return g.LLMatcher.grammar_from_regex(spec)
        if kind == "choice":
            return g.grammar_from("choice", json.dumps(spec))
        if kind == "lark":
            return g.LLMatcher.grammar_from_lark(spec)
        if kind == "ebnf":
            return g.grammar_from("gbnf", spec)
        raise ValueError(kind)

    def compile(self, kind: str, spec, *, cold: bool = True):
        m = self.llg.LLMatcher(self.tok, self.grammar(kind, spec), log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token)

    def fill(self, m, bitmask: torch.Tensor, row: int = 0) -> None:
        # = llguidance.torch.fill_next_token_bitmask; bitmask: contiguous int32 on the CPU
        m.unsafe_compute_mask_ptr(bitmask.data_ptr() + row * bitmask.stride(0) * 4, bitmask.shape[1] * 4)

    def fill_batch(self, matchers, bitmask: torch.Tensor, threads: int) -> None:
        # = llguidance.torch.fill_next_token_bitmask_par
        self.executors[threads].unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                                        bitmask.shape[1] * 4, bitmask.shape[0])

    def accept_batch(self, matchers, tokens: list[int]) -> list[bool]:
        return self.executors[self.threads].consume_token_par(list(zip(matchers, tokens)))

    def terminated(self, m) -> bool:
        return m.is_stopped()

    def rollback(self, m, n: int) -> None:
        if not m.rollback(n):
            raise RuntimeError(m.get_error())

    def reset(self, m) -> None:
        m.reset()  # returns False (and stays in the error state) for a matcher in the error state

    def draft_ok(self, m, draft: list[int]) -> int:
        return m.validate_tokens(draft)



_SHIFTS = torch.arange(32, dtype=torch.int32)


def torch_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Plain torch: unpack the bits of each int32 word and masked_fill_ the zeros with -inf."""
    allowed = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).view(bitmask.shape[0], -1)[:, :logits.shape[1]]
    logits.masked_fill_(allowed == 0, float("-inf"))


# byte -> its 8 bits as additive biases (0 allowed, -inf not), least significant bit first
_BYTE_BIAS = torch.tensor([[0.0 if (b >> i) & 1 else float("-inf") for i in range(8)] for b in range(256)])


def torch_apply_lut(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Eager torch, one gather: each bitmask byte indexes a [256, 8] table of 0/-inf biases, added to
    the logits (a logit of +inf would turn NaN where masked; finite logits are exact)."""
    bias = _BYTE_BIAS[bitmask.view(torch.uint8).long()].view(bitmask.shape[0], -1)[:, :logits.shape[1]]
    logits.add_(bias)


def make(lib: str, tok, vocab: int, eos: list[int], threads: int):
    return {"xgrammar": XGrammar, "llguidance": LLGuidance}[lib](tok, vocab, eos, threads)


# --- helpers ---------------------------------------------------------------------------------------

def now() -> int:
    return time.perf_counter_ns()


def med(xs) -> float:
    return float(statistics.median(xs))


def p95(xs) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), 95))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def n_allowed(bitmask: torch.Tensor, row: int, vocab: int) -> int:
    words = bitmask[row].numpy().view(np.uint32)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab]
    return int(bits.sum())


def load_tokenizer(model: str | None):
    """The HF fast tokenizer, logits width and EOS ids exactly as the engine gets them."""
    from tokenmill.engine.builder import _eos_ids
    from tokenmill.loader.checkpoint import load_checkpoint

    ckpt = load_checkpoint(model)
    return ckpt.tokenizer, int(ckpt.hf_config.vocab_size), _eos_ids(ckpt)


def lib_info(lib: str) -> dict:
    dist = md.distribution(lib)
    meta = dist.metadata
    wheel = dist.read_text("WHEEL") or ""
    return {
        "version": dist.version,
        "license": meta.get("License-Expression") or meta.get("License"),
        "wheel_tags": [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")],
        "requires": [r for r in (meta.get_all("Requires-Dist") or []) if "extra ==" not in r],
    }


# --- measurements ----------------------------------------------------------------------------------

def bench_compile(be, repeats: int) -> dict:
    out = {}
    specs = {"json_schema": schema_20(), "json_object": None, "regex": REGEX_EMAIL, "choice": CHOICES,
             "lark": LARK, "ebnf": EBNF}
    for kind, spec in specs.items():
        cold = []
        for _ in range(repeats):
            gc.collect()
            t0 = now()
            be.compile(kind, spec, cold=True)
            cold.append((now() - t0) / 1e6)
        row = {"cold_ms": med(cold), "cold_ms_all": cold}
        if be.name == "xgrammar":
            be.compile(kind, spec, cold=False)  # fill the cache
            warm = []
            for _ in range(repeats):
                t0 = now()
                be.compile(kind, spec, cold=False)
                warm.append((now() - t0) / 1e6)
            row["cached_ms"] = med(warm)
            row["cached_how"] = "GrammarCompiler cache hit"
        else:
            template = be.compile(kind, spec)
            warm = []
            for _ in range(repeats):
                t0 = now()
                be.matcher(template)
                warm.append((now() - t0) / 1e6)
            row["cached_ms"] = med(warm)
            row["cached_how"] = "deep_copy of a compiled template matcher (no library cache)"
        out[kind] = row
    # time to the first mask: compile (cold), a matcher, one mask
    vocab_words = be.vocab_words
    first = []
    new_matcher = []
    for _ in range(repeats):
        bm = torch.full((1, vocab_words), -1, dtype=torch.int32)
        gc.collect()
        t0 = now()
        c = be.compile("json_schema", schema_20(), cold=True)
        t1 = now()
        m = be.matcher(c)
        t2 = now()
        be.fill(m, bm, 0)
        t3 = now()
        first.append((t3 - t0) / 1e6)
        new_matcher.append((t2 - t1) / 1e6)
    out["json_schema"]["first_mask_ms"] = med(first)
    out["json_schema"]["new_matcher_ms"] = med(new_matcher)
    return out


def drive_batch1(be, compiled, ids: list[int], eos: int, vocab: int, bitmask: torch.Tensor) -> dict:
    """One matcher through one document; µs per mask and per accept, and the checks on the way."""
    m = be.matcher(compiled)
    fills, accepts = [], []
    gc.disable()
    try:
        for i, t in enumerate(ids):
            t0 = now()
            be.fill(m, bitmask, 0)
            t1 = now()
            if not allowed(bitmask, 0, t):
                raise AssertionError(f"{be.name}: token {i} ({t}) of a valid document is masked")
            t2 = now()
            ok = be.accept(m, t)
            t3 = now()
            if not ok:
                raise AssertionError(f"{be.name}: token {i} ({t}) of a valid document was refused")
            fills.append((t1 - t0) / 1e3)
            accepts.append((t3 - t2) / 1e3)
        be.fill(m, bitmask, 0)
    finally:
        gc.enable()
    end_allowed = n_allowed(bitmask, 0, vocab)
    eos_ok = allowed(bitmask, 0, eos)
    be.accept(m, eos)
    return {"fills_us": fills, "accepts_us": accepts, "eos_allowed_at_end": eos_ok,
            "tokens_allowed_at_end": end_allowed, "terminated_after_eos": be.terminated(m)}


def bench_batch1(be, docs_ids: list[list[int]], eos: int, vocab: int, repeats: int) -> dict:
    compiled = be.compile("json_schema", schema_20(), cold=False)
    bitmask = torch.full((1, be.vocab_words), -1, dtype=torch.int32)
    runs = [drive_batch1(be, compiled, docs_ids[r % len(docs_ids)], eos, vocab, bitmask) for r in range(repeats)]
    first = runs[0]
    return {
        "tokens_per_doc": [len(docs_ids[r % len(docs_ids)]) for r in range(repeats)],
        "mask_us_median": med([med(r["fills_us"]) for r in runs]),
        "mask_us_p95": med([p95(r["fills_us"]) for r in runs]),
        "mask_us_mean": med([statistics.fmean(r["fills_us"]) for r in runs]),
        "mask_us_max": max(max(r["fills_us"]) for r in runs),
        "mask_us_mean_first_run": statistics.fmean(first["fills_us"]),
        "accept_us_median": med([med(r["accepts_us"]) for r in runs]),
        "accept_us_mean": med([statistics.fmean(r["accepts_us"]) for r in runs]),
        "eos_allowed_at_end": all(r["eos_allowed_at_end"] for r in runs),
        "tokens_allowed_at_end": first["tokens_allowed_at_end"],
        "terminated_after_eos": all(r["terminated_after_eos"] for r in runs),
    }


def bench_batch(be, docs_ids: list[list[int]], batch: int, repeats: int) -> dict:
    """`batch` matchers, each on its own document, for as many steps as the shortest one has; one
    [batch, vocab/32] bitmask per step, filled by the batch call or row by row."""
    compiled = be.compile("json_schema", schema_20(), cold=False)
    docs = docs_ids[:batch]
    steps = min(map(len, docs))
    bitmask = torch.full((batch, be.vocab_words), -1, dtype=torch.int32)
    res = {"steps": steps}
    for mode in ("batch_call", "batch_call_1thread", "row_loop"):
        per_step, per_accept = [], []
        for _ in range(repeats):
            ms = [be.matcher(compiled) for _ in range(batch)]
            fills, accepts = [], []
            gc.disable()
            try:
                for s in range(steps):
                    t0 = now()
                    if mode == "batch_call":
                        be.fill_batch(ms, bitmask, be.threads)
                    elif mode == "batch_call_1thread":
                        be.fill_batch(ms, bitmask, 1)
                    else:
                        for i, m in enumerate(ms):
                            be.fill(m, bitmask, i)
                    t1 = now()
                    toks = [d[s] for d in docs]
                    t2 = now()
                    oks = be.accept_batch(ms, toks) if mode != "row_loop" else [be.accept(m, t) for m, t in zip(ms, toks)]
                    t3 = now()
                    if not all(oks):
                        raise AssertionError(f"{be.name}: a valid token was refused at step {s} ({mode})")
                    fills.append((t1 - t0) / 1e3)
                    accepts.append((t3 - t2) / 1e3)
            finally:
                gc.enable()
            for i, d in enumerate(docs):  # the last mask filled must allow each row's last token
                if not allowed(bitmask, i, d[steps - 1]):
                    raise AssertionError(f"{be.name}: row {i}'s mask does not allow its token")
            per_step.append(fills)
            per_accept.append(accepts)
        res[mode] = {
            "mask_us_per_step_median": med([med(f) for f in per_step]),
            "mask_us_per_step_p95": med([p95(f) for f in per_step]),
            "mask_us_per_step_mean": med([statistics.fmean(f) for f in per_step]),
            "accept_us_per_step_median": med([med(a) for a in per_accept]),
        }
    res["batch_call_api"] = ("BatchGrammarMatcher(max_threads).batch_fill_next_token_bitmask(matchers, bitmask) + "
                             "BatchGrammarMatcher.batch_accept_token(matchers, tokens)"
                             if be.name == "xgrammar" else
                             "LLExecutor(num_threads).unsafe_compute_mask_ptr([(matcher, row)], ptr, row_bytes, batch) "
                             "(= llguidance.torch.fill_next_token_bitmask_par) + LLExecutor.consume_token_par")
    return res


def bench_rollback(be, ids: list[int], repeats: int) -> dict:
    """Rollback of k tokens at positions through the document; the mask afterwards equals the mask before."""
    compiled = be.compile("json_schema", schema_20(), cold=False)
    bitmask = torch.full((1, be.vocab_words), -1, dtype=torch.int32)
    before = torch.empty_like(bitmask)
    out = {}
    for k in (1, 4, 8):
        times, drafts = [], []
        for _ in range(repeats):
            m = be.matcher(compiled)
            for pos, t in enumerate(ids[:-k]):
                if pos >= 8 and pos % 8 == 0:
                    be.fill(m, before, 0)
                    t0 = now()
                    n = be.draft_ok(m, ids[pos:pos + k])
                    drafts.append((now() - t0) / 1e3)
                    if n != k:
                        raise AssertionError(f"{be.name}: a valid draft of {k} took only {n}")
                    for d in ids[pos:pos + k]:
                        be.accept(m, d)
                    t0 = now()
                    be.rollback(m, k)
                    times.append((now() - t0) / 1e3)
                    be.fill(m, bitmask, 0)
                    if not torch.equal(bitmask, before):
                        raise AssertionError(f"{be.name}: the mask after rollback({k}) differs")
                be.accept(m, t)
        out[f"rollback_{k}_us"] = med(times)
        out[f"draft_{k}_check_us"] = med(drafts)
    # rollback out of the terminated state (EOS accepted, then a rejected speculative EOS)
    m = be.matcher(compiled)
    for t in ids:
        be.accept(m, t)
    be.accept(m, EOS_FOR_ROLLBACK[0])
    term = be.terminated(m)
    be.rollback(m, 1)
    out["rollback_out_of_termination"] = term and not be.terminated(m)
    out["draft_check_how"] = ("accept_token x k, then rollback(k)" if be.name == "xgrammar" else
                              "LLMatcher.validate_tokens(draft) (state unchanged)")
    return out


EOS_FOR_ROLLBACK: list[int] = []


def bench_apply(bitmasks: dict[int, torch.Tensor], vocab: int, repeats: int, libs: list[str]) -> dict:
    """µs to apply a [B, vocab/32] bitmask to [B, vocab] float32 logits, per method."""
    methods = {"torch shift/masked_fill_": torch_apply, "torch byte table + add_": torch_apply_lut}
    if "xgrammar" in libs:
        import xgrammar as xgr

        methods["xgrammar.apply_token_bitmask_inplace (its CPU kernel)"] = xgr.apply_token_bitmask_inplace
    if "llguidance" in libs:
        import llguidance.torch as llgt

        methods["llguidance.torch.apply_token_bitmask_inplace (torch.compile, fused)"] = llgt.apply_token_bitmask_inplace
    out = {}
    for name, fn in methods.items():
        row = {}
        for b, bm in bitmasks.items():
            base = torch.randn(b, vocab)
            logits = base.clone()
            try:
                t0 = now()
                fn(logits, bm)  # first call: where torch.compile compiles
                first = (now() - t0) / 1e3
            except Exception as e:  # noqa: BLE001 - report what failed, keep the other methods
                row[b] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            expect = base.clone()
            torch_apply(expect, bm)
            if not torch.equal(logits, expect):
                raise AssertionError(f"{name} disagrees with the plain torch masking at batch {b}")
            times = []
            for _ in range(max(repeats, 5) * 20):
                logits.copy_(base)
                t0 = now()
                fn(logits, bm)
                times.append((now() - t0) / 1e3)
            row[b] = {"us_median": med(times), "us_p95": p95(times), "first_call_us": first}
        out[name] = row
    return out


def bench_errors(be) -> dict:
    """Each invalid schema through the library's own calls (not this script's wrapper)."""
    out = {}
    for label, text in INVALID_SCHEMAS.items():
        try:
            if be.name == "xgrammar":
                be.xgr.GrammarCompiler(be.info, cache_enabled=False).compile_json_schema(text)
                out[label] = {"at_compile": False, "exception": None, "message": "accepted (no error)"}
            else:
                m = be.llg.LLMatcher(be.tok, be.llg.LLMatcher.grammar_from_json_schema(text), log_level=0)
                out[label] = {"at_compile": m.is_error(), "exception": "no exception, is_error()" if m.is_error() else None,
                              "message": " ".join(m.get_error().split())[:300] or "accepted (no error)"}
        except Exception as e:  # noqa: BLE001 - the point is to see what each raises
            out[label] = {"at_compile": True, "exception": f"{type(e).__module__}.{type(e).__name__}",
                          "message": " ".join(str(e).split())[:300]}
    out["note"] = ("GrammarCompiler.compile_* raises RuntimeError; messages start with a time and a C++ file:line"
                   if be.name == "xgrammar" else
                   "LLMatcher(...) never raises for a grammar error: the matcher comes back in an error state "
                   "(is_error() / get_error()); LLMatcher.validate_grammar(grammar, tokenizer) returns the same "
                   "message without making a matcher")
    return out


def after_refused_token(be, tok, ids: list[int]) -> dict:
    """A token the grammar refuses: is the matcher still usable, and does reset() bring it back?"""
    compiled = be.compile("json_schema", schema_20(), cold=False)
    m = be.matcher(compiled)
    refused = not be.accept(m, tok.encode("x", add_special_tokens=False)[0])
    usable = be.accept(m, ids[0])
    be.reset(m)
    after_reset = be.accept(be.matcher(compiled), ids[0]) and be.accept(m, ids[0])
    return {"refused": refused, "usable_after": usable, "usable_after_reset": after_reset}


def escapes_in_bounded_string(be, tok) -> dict:
    """Can a string with maxLength hold JSON escapes (\\n, \\", \\\\)? They count as one character each."""
    out = {}
    for label, schema in (("plain string", {"type": "string"}), ("maxLength 200", {"type": "string", "maxLength": 200}),
                          ("pattern", {"type": "string", "pattern": "^[^x]*$"})):
        compiled = be.compile("json_schema", schema, cold=True)
        ok = []
        for text in ("a\nb", 'say "hi"', "back\\slash"):
            m = be.matcher(compiled)
            ok.append(all(be.accept(m, t) for t in tok.encode(json.dumps(text), add_special_tokens=False)))
        out[label] = all(ok)
    return out


def special_tokens_in_string(be, tok, vocab: int) -> dict:
    """Inside a free JSON string, is any special token (<|im_start|>, <|endoftext|>, ...) allowed?"""
    compiled = be.compile("json_schema", {"type": "object", "properties": {"s": {"type": "string"}},
                                          "required": ["s"]}, cold=True)
    m = be.matcher(compiled)
    for t in tok.encode('{"s": "abc', add_special_tokens=False):
        assert be.accept(m, t)
    bm = torch.full((1, be.vocab_words), -1, dtype=torch.int32)
    be.fill(m, bm, 0)
    specials = sorted(i for i, t in tok.added_tokens_decoder.items() if t.special)
    return {"special_ids_allowed": [i for i in specials if allowed(bm, 0, i)], "n_special": len(specials),
            "tokens_allowed_in_string": n_allowed(bm, 0, vocab)}


IMPORTS = {"xgrammar": ["xgrammar"], "llguidance": ["llguidance", "llguidance.hf"]}


def rss_child(lib: str, model: str | None, threads: int) -> dict:
    """In a fresh process: the import's time and RSS, then RSS growth of each stage."""
    import importlib

    tok, vocab, eos = load_tokenizer(model)  # imports transformers, as the engine does
    gc.collect()
    r_imp = rss_mib()
    t0 = now()
    for mod in IMPORTS[lib]:
        importlib.import_module(mod)
    import_ms = (now() - t0) / 1e6
    gc.collect()
    r0 = rss_mib()
    be = make(lib, tok, vocab, eos, threads)
    gc.collect()
    r1 = rss_mib()
    c = be.compile("json_schema", schema_20(), cold=True)
    m = be.matcher(c)
    bm = torch.full((1, be.vocab_words), -1, dtype=torch.int32)
    be.fill(m, bm, 0)
    gc.collect()
    r2 = rss_mib()
    ids = tok.encode(json.dumps(instance(random.Random(0)), ensure_ascii=False), add_special_tokens=False)
    for t in ids:
        be.fill(m, bm, 0)
        be.accept(m, t)
    gc.collect()
    r3 = rss_mib()
    keep = [be.compile("json_schema", schema_20(f"-{i}"), cold=True) for i in range(20)]
    gc.collect()
    r4 = rss_mib()
    out = {"import_ms": import_ms, "import_mib": r0 - r_imp, "tokenizer_info_mib": r1 - r0, "compile_schema_mib": r2 - r1, "after_driving_one_doc_mib": r3 - r2,
           "per_extra_schema_mib": (r4 - r3) / len(keep)}
    if lib == "xgrammar":
        out["compiled_grammar_memory_size_mib"] = c.memory_size_bytes / 2**20
    else:  # what importing llguidance.torch (for its apply helper) would add
        gc.collect()
        r5 = rss_mib()
        t0 = now()
        importlib.import_module("llguidance.torch")
        out["import_llguidance_torch_ms"] = (now() - t0) / 1e6
        gc.collect()
        out["import_llguidance_torch_mib"] = rss_mib() - r5
    return out


# --- report ----------------------------------------------------------------------------------------

def pct(us: float, batch: int) -> str:
    lo, hi = STEP_MS[batch]
    return f"{100 * us / 1e3 / hi:.1f}-{100 * us / 1e3 / lo:.1f} %"


def report(res: dict, batch: int) -> str:
    libs = [lib for lib in LIBS if lib in res["libs"]]
    L = lambda lib: res["libs"][lib]
    ap = res["apply"]
    eager = [n for n in ap if "torch.compile" not in n]
    best = lambda b: min(eager, key=lambda n: ap[n][b].get("us_median", float("inf")))
    lines = [f"## Grammar backends on this CPU (medians of {res['repeats']}; load avg before/after "
             f"{res['loadavg_before']:.2f}/{res['loadavg_after']:.2f} on {res['cpus']} CPUs; vocab {res['vocab']}; "
             f"documents of {res['doc_tokens_median']:.0f} tokens)", ""]
    lines += ["| | " + " | ".join(libs) + " |", "|---|" + "---|" * len(libs)]
    row = lambda label, f: lines.append(f"| {label} | " + " | ".join(f(L(lib)) for lib in libs) + " |")
    row("version / license", lambda r: f"{r['info']['version']} / {r['info']['license']}")
    row("wheel", lambda r: ", ".join(r["info"]["wheel_tags"]))
    if all("rss" in L(lib) for lib in libs):
        row("import (fresh process)", lambda r: f"{r['rss']['import_ms']:.0f} ms, {r['rss']['import_mib']:.0f} MiB")
    row("tokenizer info, once per model", lambda r: f"{r['tokenizer_info_ms']:.0f} ms")
    c = lambda r, k, f="cold_ms": f"{r['compile'][k][f]:.2f} ms"
    row("compile 20-field schema, cold", lambda r: c(r, "json_schema"))
    row("compile 20-field schema, cached", lambda r: c(r, "json_schema", "cached_ms"))
    row("  cold compile + matcher + first mask", lambda r: f"{r['compile']['json_schema']['first_mask_ms']:.2f} ms")
    row("  new matcher from compiled", lambda r: f"{r['compile']['json_schema']['new_matcher_ms']:.3f} ms")
    for k, label in (("json_object", "json_object"), ("regex", "regex (email)"), ("choice", "choice (5)"),
                     ("lark", "Lark grammar"), ("ebnf", "GBNF/EBNF grammar")):
        row(f"compile {label}, cold / cached", lambda r, k=k: f"{r['compile'][k]['cold_ms']:.2f} / "
                                                              f"{r['compile'][k]['cached_ms']:.3f} ms")
    b1 = lambda r: r["batch1"]
    row("mask, batch 1: median / p95", lambda r: f"{b1(r)['mask_us_median']:.1f} / {b1(r)['mask_us_p95']:.1f} µs")
    row("mask, batch 1: mean (first document) / max", lambda r: f"{b1(r)['mask_us_mean']:.1f} "
                                                               f"({b1(r)['mask_us_mean_first_run']:.1f}) / {b1(r)['mask_us_max']:.0f} µs")
    row("accept token, batch 1: median", lambda r: f"{b1(r)['accept_us_median']:.1f} µs")
    a1 = ap[best(1)][1]["us_median"]
    row("mask, % of a 6-9 ms step (batch 1)", lambda r: pct(b1(r)["mask_us_median"], 1))
    row(f"mask + accept + apply ({a1:.0f} µs), % of step (batch 1)",
        lambda r: pct(b1(r)["mask_us_median"] + b1(r)["accept_us_median"] + a1, 1))
    bb = lambda r, mode: r["batch"][mode]
    for mode, label in (("batch_call", f"batch call, {res['threads']} threads"), ("batch_call_1thread", "batch call, 1 thread"),
                        ("row_loop", "row by row")):
        row(f"mask, batch {batch}, {label}: median / p95 per step",
            lambda r, mode=mode: f"{bb(r, mode)['mask_us_per_step_median']:.0f} / {bb(r, mode)['mask_us_per_step_p95']:.0f} µs")
    row(f"accept, batch {batch}: batch call / row by row",
        lambda r: f"{bb(r, 'batch_call')['accept_us_per_step_median']:.0f} / {bb(r, 'row_loop')['accept_us_per_step_median']:.0f} µs")
    fastest = lambda r: min(bb(r, m)["mask_us_per_step_median"] for m in ("batch_call", "batch_call_1thread", "row_loop"))
    fastest_acc = lambda r: min(bb(r, m)["accept_us_per_step_median"] for m in ("batch_call", "row_loop"))
    if batch in STEP_MS:
        ab = ap[best(batch)][batch]["us_median"]
        row(f"fastest mask, % of a 30-60 ms step (batch {batch})", lambda r: pct(fastest(r), batch))
        row(f"mask + accept + apply ({ab:.0f} µs), % of step (batch {batch})",
            lambda r: pct(fastest(r) + fastest_acc(r) + ab, batch))
    rb = lambda r: r["rollback"]
    row("rollback 1 / 4 / 8 tokens", lambda r: f"{rb(r)['rollback_1_us']:.1f} / {rb(r)['rollback_4_us']:.1f} / "
                                               f"{rb(r)['rollback_8_us']:.1f} µs")
    row("check a 4-token draft (state unchanged)", lambda r: f"{rb(r)['draft_4_check_us']:.1f} µs")
    row("rollback out of EOS termination", lambda r: "yes" if rb(r)["rollback_out_of_termination"] else "no")
    row("after the document: EOS allowed (tokens allowed) / terminated after EOS",
        lambda r: f"{b1(r)['eos_allowed_at_end']} ({b1(r)['tokens_allowed_at_end']}) / {b1(r)['terminated_after_eos']}")
    sp = lambda d: f"{len(d['special_ids_allowed'])} of {d['n_special']}"
    row("special tokens allowed inside a JSON string", lambda r: sp(r["special_in_string"]) + (
        f" ({sp(r['special_in_string_blanked'])} with them blanked)" if "special_in_string_blanked" in r else ""))
    row("JSON escapes in a string: plain / maxLength / pattern", lambda r: " / ".join(
        "yes" if r["escapes_in_string"][k] else "NO" for k in ("plain string", "maxLength 200", "pattern")))
    rt = lambda r: r["refused_token"]
    row("after a refused token: usable / after reset()", lambda r: f"{'yes' if rt(r)['usable_after'] else 'no'} / "
                                                                 f"{'yes' if rt(r)['usable_after_reset'] else 'no'}")
    for label in INVALID_SCHEMAS:
        row(f"invalid schema: {label}", lambda r, label=label: (
            (r["errors"][label]["exception"].removeprefix("builtins.") + ": " + r["errors"][label]["message"][:90])
            if r["errors"][label]["at_compile"] else "no error"))
    if all("rss" in L(lib) for lib in libs):
        row("RSS: tokenizer info", lambda r: f"{r['rss']['tokenizer_info_mib']:.1f} MiB")
        row("RSS: compile schema (+ first mask)", lambda r: f"{r['rss']['compile_schema_mib']:.1f} MiB")
        row("RSS: after driving one document", lambda r: f"{r['rss']['after_driving_one_doc_mib']:.1f} MiB")
        row("RSS: per extra compiled schema (20 kept)", lambda r: f"{r['rss']['per_extra_schema_mib']:.2f} MiB")
    lines += ["", f"Apply a bitmask to float32 logits, µs median (batch 1 / batch {batch}); the % rows use the fastest "
                  "method without torch.compile:"]
    for name, r in ap.items():
        cell = lambda b: f"{r[b]['us_median']:.1f}" if "us_median" in r[b] else r[b]["error"]
        first = f"; first call {r[1]['first_call_us'] / 1e3:.0f} ms" if "torch.compile" in name and "first_call_us" in r[1] else ""
        lines.append(f"- {name}: {cell(1)} / {cell(batch)} µs{first}")
    lines.append("")
    for lib in libs:
        lines.append(f"Batch API, {lib}: {L(lib)['batch']['batch_call_api']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--libs", default=",".join(LIBS))
    p.add_argument("--model", default=None, help="GGUF file or HF folder; default: the embedded SmolLM2-135M")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for batch calls and compilers")
    p.add_argument("--output", default="results/grammar_backends.json")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.model, args.threads)))
        return

    libs = [lib for lib in args.libs.split(",") if lib]
    load0 = os.getloadavg()[0]
    print(f"load average (1 min) before: {load0:.2f} on {os.cpu_count()} CPUs", flush=True)
    tok, vocab, eos = load_tokenizer(args.model)
    EOS_FOR_ROLLBACK[:] = eos
    rng = random.Random(1234)
    docs = [json.dumps(instance(rng), ensure_ascii=False) for _ in range(max(args.batch, args.repeats))]
    try:
        import jsonschema

        for d in docs:
            jsonschema.validate(json.loads(d), schema_20())
    except ImportError:
        pass
    docs_ids = [tok.encode(d, add_special_tokens=False) for d in docs]
    res = {"repeats": args.repeats, "batch": args.batch, "threads": args.threads, "cpus": os.cpu_count(), "vocab": vocab,
           "tokenizer_len": len(tok), "eos_ids": eos, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "python": sys.version.split()[0], "loadavg_before": load0,
           "doc_tokens_median": med(map(len, docs_ids)), "step_ms_context": STEP_MS, "libs": {}}
    masks_for_apply: dict[int, torch.Tensor] = {}
    for lib in libs:
        print(f"[{lib}] tokenizer info ...", flush=True)
        be = make(lib, tok, vocab, eos, args.threads)
        r = {"name": lib, "info": lib_info(lib), "tokenizer_info_ms": be.tokenizer_info_ms}
        print(f"[{lib}] compile ...", flush=True)
        r["compile"] = bench_compile(be, args.repeats)
        print(f"[{lib}] batch 1 ...", flush=True)
        r["batch1"] = bench_batch1(be, docs_ids, eos[0], vocab, args.repeats)
        print(f"[{lib}] batch {args.batch} ...", flush=True)
        r["batch"] = bench_batch(be, docs_ids, args.batch, args.repeats)
        print(f"[{lib}] rollback ...", flush=True)
        r["rollback"] = bench_rollback(be, docs_ids[0], args.repeats)
        r["errors"] = bench_errors(be)
        r["special_in_string"] = special_tokens_in_string(be, tok, vocab)
        if lib == "xgrammar":  # the work-around: a TokenizerInfo with the special tokens' entries blanked
            fixed = XGrammar(tok, vocab, eos, args.threads, blank_specials=True)
            r["special_in_string_blanked"] = special_tokens_in_string(fixed, tok, vocab)
        r["escapes_in_string"] = escapes_in_bounded_string(be, tok)
        r["refused_token"] = after_refused_token(be, tok, docs_ids[0])
        if not masks_for_apply:  # real masks: matchers part-way through their documents
            c = be.compile("json_schema", schema_20(), cold=False)
            for b in sorted({1, args.batch}):
                bm = torch.full((b, be.vocab_words), -1, dtype=torch.int32)
                for i in range(b):
                    m = be.matcher(c)
                    for t in docs_ids[i][:len(docs_ids[i]) // 2]:
                        be.accept(m, t)
                    be.fill(m, bm, i)
                masks_for_apply[b] = bm
        print(f"[{lib}] memory (child process) ...", flush=True)
        child = subprocess.run([sys.executable, __file__, "--rss-child", lib, "--threads", str(args.threads)]
                               + (["--model", args.model] if args.model else []),
                               capture_output=True, text=True)
        if child.returncode == 0:
            r["rss"] = json.loads(child.stdout.strip().splitlines()[-1])
        else:
            r["rss_error"] = child.stderr[-500:]
        res["libs"][lib] = r
        del be
        gc.collect()
    print("apply ...", flush=True)
    res["apply"] = bench_apply(masks_for_apply, vocab, args.repeats, libs)
    res["loadavg_after"] = os.getloadavg()[0]
    table = report(res, args.batch)
    print()
    print(table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

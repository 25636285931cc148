"""Structured output: per sequence, a grammar state that says which tokens may come next.

llguidance compiles JSON schemas, regular expressions, choices and Lark / GBNF grammars and
computes each step's allowed tokens as a bitmask; it was measured against xgrammar on this
project's CPUs (`python benchmarks/grammar_backends.py`: a 20-field schema compiles in 2.4 ms
against 33 ms, a mask takes ~8 us) and it refuses hostile grammars within its own work limits.
The engine and the runner see only this module's three names: GrammarCompiler (one per
tokenizer), GrammarState (one per sequence) and fill_bitmask (one batched call per step).
"""

from __future__ import annotations

import functools
import json

import torch

from tokenmill.errors import InvalidParameterError
from tokenmill.sampling_params import StructuredOutputsParams

# JSON on one line, separators as Python's json.dumps writes them: with free whitespace small models
# ramble in newlines and spaces until max_tokens. A schema's own "x-guidance" settings win.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# llguidance's own pool. The runner computes the masks beside the model's forward pass, which
# already uses every core: one thread, so that the two share the machine rather than fight.
_MASK_THREADS = 1


class GrammarCompiler:
    """Turns StructuredOutputsParams into grammar states for one tokenizer. Building llguidance's
    view of the vocabulary takes ~0.5 s for 49K tokens: it is done on the first constrained
    request, not at start-up."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: list[int]):
        import llguidance.hf  # not llguidance.torch: that one imports torch._dynamo (1.7 s)

        self._llg = llguidance
        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos_token_ids or None)

    def compile(self, spec: StructuredOutputsParams) -> str:
        """The grammar, checked: a spec llguidance cannot use is an InvalidParameterError naming the
        request field it came from, before any compute."""
        matcher = self._llg.LLMatcher
        kind = spec.kind
        try:
            if kind == "json":
                schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
                if not isinstance(schema, dict):
                    raise ValueError(f"a JSON schema is an object, got {type(schema).__name__}")
                grammar = matcher.grammar_from_json_schema(json.dumps(_closed(schema)), defaults=_JSON_LAYOUT)
            elif kind == "json_object":
                grammar = matcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_LAYOUT)
            elif kind == "regex":
                grammar = matcher.grammar_from_regex(spec.regex)
            elif kind == "choice":
                grammar = self._llg.grammar_from("choice", json.dumps(spec.choice))
            else:
                grammar = self._llg.grammar_from("grammar", spec.grammar)  # Lark, or llama.cpp's GBNF
            failed, messages = matcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        except (ValueError, TypeError, RecursionError) as e:  # bad JSON text, a schema json cannot write
            failed, messages = True, [str(e)]
        if failed:
            problem = " ".join(" ".join(m.split()) for m in messages[:2])[:500] or "it does not compile"
            what = "grammar" if kind == "grammar" else f"{kind.replace('_', ' ')} grammar"
            raise InvalidParameterError(spec.field, f"the {what} is invalid: {problem}")
        return grammar

    def state(self, grammar: str) -> "GrammarState":
        return GrammarState(self._llg.LLMatcher(self._tokenizer, grammar, log_level=0))


class GrammarState:
    """Where one sequence is in its grammar. The sampler only lets through tokens the grammar
    allows, so `advance` fails only where the grammar itself did; `done` is true once the grammar
    can only end (the sequence finishes with "stop")."""

    def __init__(self, matcher):
        self.matcher = matcher

    def advance(self, token: int) -> bool:
        """Take the sampled token; False if the grammar failed (it ran past llguidance's limits)."""
        return self.matcher.consume_token(token) and not self.matcher.is_error()

    @property
    def error(self) -> str:
        return " ".join((self.matcher.get_error() or "unknown error").split())[:300]

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()


def _closed(schema):
    """The schema with additionalProperties false on every object that lists properties and says
    nothing of others (as vLLM's default xgrammar backend and OpenAI's strict mode read it): else a
    small model keeps inventing fields until max_tokens."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


@functools.cache
def _executor():
    import llguidance

    return llguidance.LLExecutor(num_threads=_MASK_THREADS)


def fill_bitmask(states: list[GrammarState], vocab_size: int) -> torch.Tensor:
    """The tokens each state allows next, in one call: int32 [len(states), ceil(vocab_size / 32)],
    token t allowed when bit t % 32 of word t // 32 is set."""
    words = (vocab_size + 31) // 32
    bitmask = torch.zeros(len(states), words, dtype=torch.int32)
    _executor().unsafe_compute_mask_ptr([(s.matcher, row) for row, s in enumerate(states)], bitmask.data_ptr(),
                                        words * 4, len(states))
    return bitmask

"""Structured outputs (offline): every sample follows its grammar, at a high temperature, from a
random model and from the default model, alone, with n > 1, under preemption; greedy output does
not change with speculation or prefix caching; a grammar that does not compile is refused by name."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tokenmill import LLM, InvalidParameterError, SamplingParams, StructuredOutputsParams

# Bounded, so that every sample can finish within max_tokens however the model rambles.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"  # \\d is any Unicode digit in both engines, but not the same set
CHOICES = ["Paris", "London", "Berlin", "Rome"]
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def random_model(tiny_chat_model) -> LLM:
    """A random tiny Llama with the default model's tokenizer: its samples go anywhere the mask allows."""
    return LLM(str(tiny_chat_model), dtype="float32", kv_cache_memory="32MiB", seed=0)


@pytest.fixture(scope="module")
def default_model(default_model_available) -> LLM:
    return LLM(kv_cache_memory="256MiB", seed=0)


def samples(llm: LLM, spec: StructuredOutputsParams, n: int = 100, must_finish: bool = True,
            max_tokens: int = MAX_TOKENS) -> list[str]:
    """n samples at temperature 1.5 (seeded by the engine's seed), the finished ones' texts."""
    params = SamplingParams(n=n, temperature=1.5, max_tokens=max_tokens, structured_outputs=spec)
    (out,) = llm.generate("Give me an answer:", params, use_tqdm=False)
    finished = [o.text for o in out.outputs if o.finish_reason == "stop"]
    assert len(finished) == n or not must_finish, [o.text for o in out.outputs if o.finish_reason != "stop"]
    return finished


@pytest.mark.slow
@pytest.mark.parametrize("model", ["random_model", "default_model"])
def test_100_hot_samples_follow_the_schema_the_regex_and_the_choice(request, model):
    llm = request.getfixturevalue(model)
    people = samples(llm, StructuredOutputsParams(json=PERSON))
    for text in people:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(people)) > 10  # really sampled, not one forced answer
    for text in samples(llm, StructuredOutputsParams(regex=PHONE)):
        assert re.fullmatch(PHONE, text), text
    picked = samples(llm, StructuredOutputsParams(choice=CHOICES), n=30)
    assert set(picked) <= set(CHOICES) and len(set(picked)) > 1
    objects = samples(llm, StructuredOutputsParams(json_object=True), n=8, must_finish=False)  # unbounded: some ramble
    assert objects and all(isinstance(json.loads(text), dict) for text in objects)


def test_a_grammar_in_lark_and_in_gbnf(random_model):
    lark = 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]{1,3}/'
    for text in samples(random_model, StructuredOutputsParams(grammar=lark), n=30):
        assert re.fullmatch(r"yes|no|maybe [0-9]{1,3}", text), text
    gbnf = 'root ::= "(" [a-z] [a-z]? [a-z]? [a-z]? ")"'  # llama.cpp's grammar format
    for text in samples(random_model, StructuredOutputsParams(grammar=gbnf), n=30):
        assert re.fullmatch(r"\([a-z]{1,4}\)", text), text


@pytest.mark.parametrize("spec, says", [
    (dict(json={"type": "object", "properties": {"a": {"type": "no-such-type"}}}), "no-such-type"),
    (dict(json='{"type": '), "invalid"),
    (dict(json="[1, 2]"), "object"),
    (dict(regex="[a-"), "regex"),
    (dict(grammar="start: undefined_rule"), "undefined_rule"),
])
def test_a_grammar_that_does_not_compile_is_refused_naming_the_field(random_model, spec, says):
    engine = random_model.engine
    with pytest.raises(InvalidParameterError) as e:
        engine.add_request("bad-grammar", "hi", SamplingParams(structured_outputs=StructuredOutputsParams(
            **spec, field="response_format")))
    assert e.value.param == "response_format" and says in str(e.value), e.value
    assert "bad-grammar" not in engine.requests


@pytest.mark.parametrize("spec", [dict(), dict(regex="a", choice=["b"]), dict(choice=[]), dict(choice=["a", 3]),
                                  dict(regex=""), dict(json=5)])
def test_a_spec_asks_for_exactly_one_well_typed_grammar(spec):
    with pytest.raises(InvalidParameterError) as e:
        StructuredOutputsParams(**spec)
    assert e.value.param == "structured_outputs"


def test_preemption_and_n_keep_every_sample_valid(tiny_chat_model):
    """8 samples of 30-70 tokens in a KV pool of 132 tokens: they preempt each other and are recomputed."""
    probe = LLM(str(tiny_chat_model), dtype="float32", kv_cache_memory="1MiB", max_model_len=128)
    per_token = probe.engine.memory_report.kv_bytes_per_token
    llm = LLM(str(tiny_chat_model), dtype="float32", block_size=4, max_model_len=128, seed=1,
              kv_cache_memory=per_token * 132)
    people = samples(llm, StructuredOutputsParams(json=PERSON), n=8, max_tokens=120)
    assert llm.engine.scheduler.num_preemptions > 0
    for text in people:
        jsonschema.validate(json.loads(text), PERSON)


def greedy(llm: LLM, specs: list[StructuredOutputsParams | None]) -> list[tuple[list[int], str]]:
    preamble = ("You are a careful assistant. Answer in the format asked for, with no extra words, and keep "
                "every value short and plain. The question follows.\n")  # full KV blocks the prefix cache shares
    prompts = [preamble + p for p in ("Describe a user as JSON:", "The phone number is", "The capital of France is")]
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured_outputs=s) for s in specs]
    return [(o.outputs[0].token_ids, o.outputs[0].text) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_greedy_constrained_output_is_the_same_with_speculation_and_prefix_caching(default_model_available):
    """On the default form (int4 weights, tokenmill's kernels), batched, beside an unconstrained request."""
    specs = [StructuredOutputsParams(json=PERSON), StructuredOutputsParams(regex=PHONE), None]
    plain = greedy(LLM(kv_cache_memory="64MiB", enable_prefix_caching=False), specs)
    jsonschema.validate(json.loads(plain[0][1]), PERSON)
    assert re.fullmatch(PHONE, plain[1][1])
    cached = LLM(kv_cache_memory="64MiB")
    assert greedy(cached, specs) == plain
    assert greedy(cached, specs) == plain  # the second time from the prefix cache
    assert cached.engine.kv_cache.stats.hit_rate > 0
    spec = LLM(kv_cache_memory="64MiB", speculative_config={"method": "ngram", "adaptive": False})
    assert greedy(spec, specs) == plain


def test_a_grammar_past_its_limits_ends_only_its_request(default_model):
    """A schema that recurses without end trips llguidance's work limit mid-generation: that request
    ends with an InvalidParameterError naming its field; the one beside it finishes as alone."""
    endless = {"type": "object", "required": ["a"], "properties": {"a": {"$ref": "#"}}}
    engine = default_model.engine
    plain = SamplingParams(temperature=0, max_tokens=12)
    alone = default_model.generate("The capital of France is", plain, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("endless", "Say:", SamplingParams(max_tokens=40, structured_outputs=StructuredOutputsParams(
        json=endless, field="response_format")))
    engine.add_request("plain", "The capital of France is", plain)
    finished, failed = {}, {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        failed.update(engine.pop_failed())
    assert list(failed) == ["endless"] and isinstance(failed["endless"], InvalidParameterError)
    assert failed["endless"].param == "response_format" and "grammar failed" in str(failed["endless"])
    assert list(finished) == ["plain"] and finished["plain"].outputs[0].token_ids == alone

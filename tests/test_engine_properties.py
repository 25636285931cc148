"""Property test of LLMEngine under random traffic, with a KV pool small enough that it preempts.

Hypothesis draws requests (token-id and text prompts, random SamplingParams, some out of range),
adds them at random steps while others run, aborts some at random steps, and steps one engine
until it drains. It proves, for every draw:

- SamplingParams and add_request refuse bad values only with InvalidParameterError naming the
  parameter, and no exception escapes step() for anything they accepted (no request fails a step);
- every accepted request ends: a finished output, or our abort (after which it never reappears);
- finished outputs are well formed: n samples, finish_reason "stop" or "length" with a stop_reason
  that matches, token ids inside the vocabulary, at most max_tokens of them and within
  max_model_len, no EOS / stop token before min_tokens (they are blocked) nor before the last
  token, no stop string left in the text after min_tokens, logprobs shaped as asked and finite;
- after draining, engine.requests is empty and the KV pool is whole.

The runs must really preempt, abort running requests and add requests while others run: the test
counts that, so it cannot pass vacuously. Values that once broke the engine (float32 overflow and
underflow, wrong types, stop lists long enough to slow every step) are kept out of the random
draws and pinned one by one in the tests at the end, each naming the bug it once showed.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import save_tiny_model
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import InvalidParameterError
from tokenmill.sampling_params import SamplingParams

MAX_MODEL_LEN = 48
BLOCK_SIZE = 4
KV_TOKENS = 80  # 20 blocks: 1.7 full-length sequences, so concurrent requests preempt each other
MAX_STEPS = 3000  # a draw that has not drained by then has a request that never ends
FINISH_REASONS = {"stop", "length"}  # what a finished output may say ("abort" never reaches an output)
STORY_TEXT = ["Once upon a time", "The little dog", "Lily and Ben went to the park. They", "one day, a bird",
              "\n", " ", "Tom said, \"Hello!\""]
STOP_PIECES = ["the", ".", " a", "and", "e", ",", "\n", "Lily", "was"]


def _make_engine(path) -> LLMEngine:
    probe = LLMEngine(str(path), dtype="float32", kv_cache_memory="1MiB", max_model_len=MAX_MODEL_LEN)
    per_token = probe.memory_report.kv_bytes_per_token
    engine = LLMEngine(str(path), dtype="float32", seed=0, block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN,
                       kv_cache_memory=per_token * KV_TOKENS, max_num_seqs=6, max_num_batched_tokens=24)
    assert engine.block_pool.num_usable_blocks == KV_TOKENS // BLOCK_SIZE
    return engine


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> LLMEngine:
    """The tiny random Llama (vocabulary 256, no tokenizer): token-id prompts only."""
    return _make_engine(save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama"))


@pytest.fixture(scope="module")
def stories(stories_path) -> LLMEngine:
    """stories260k (vocabulary 512, a sentencepiece tokenizer): text prompts and stop strings too."""
    return _make_engine(stories_path)


@pytest.fixture(params=["tiny-llama", "stories260k"])
def engine(request) -> LLMEngine:
    engine = request.getfixturevalue("tiny_llama" if request.param == "tiny-llama" else "stories")
    engine.label = request.param
    return engine


def hot_tokens(engine: LLMEngine) -> list[int]:
    """Tokens the model actually likes to produce (its greedy continuation): stop token ids drawn
    from these are hit, so the blocking before min_tokens is really exercised."""
    prompt = engine.tokenizer.encode("Once upon a time") if engine.tokenizer else [1, 5, 6, 7]
    engine.add_request("hot", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    out = None
    while engine.has_unfinished_requests():
        out = engine.step() or out
    return sorted(set(out[0].outputs[0].token_ids))


# ---- strategies -------------------------------------------------------------------------------
# The sampler divides the logits by temperature and (seen tokens) by repetition_penalty in float32:
# their product must stay far from float32's limits (~1e-38, ~3e38) here, see the float32-edge test.
temperatures = st.one_of(st.just(0.0), st.floats(1e-15, 1e-3), st.floats(0.05, 3.0), st.floats(10.0, 1e15))
repetition_penalties = st.one_of(st.just(1.0), st.floats(1e-15, 0.9), st.floats(1.1, 10.0), st.floats(10.0, 1e15))
unit = st.floats(0.0, 1.0)
penalty = st.one_of(st.just(0.0), st.floats(-2.0, 2.0))

BAD_VALUES = {  # one field made out of range; the param the error must name is the field's
    "temperature": [-1e-9, -1.0],
    "top_p": [0.0, -0.5, 1.0000001, 2.0, math.nan],
    "top_k": [-2, -100],
    "min_p": [-0.1, 1.5, math.nan],
    "repetition_penalty": [0.0, -1.0],
    "presence_penalty": [2.5, -3.0, math.nan],
    "frequency_penalty": [2.01, -2.5, math.nan],
    "max_tokens": [0, -5],
    "min_tokens": [-1],
    "logprobs": [-1, 21],
    "stop": [[""], ["ok", "a\ud800"], [3]],
    "stop_token_ids": [[-1], [5, -3]],
    "seed": [2**64, -(2**63) - 1, 1.5, True],
    "n": [0, -1],
}


@st.composite
def sampling_kwargs(draw, vocab: int, hot: list[int], eos: list[int], text: bool) -> tuple[dict, str | None]:
    """SamplingParams keyword arguments, and the param an error must name (None: all valid)."""
    max_tokens = draw(st.one_of(st.none(), st.integers(1, 20)))
    kw = dict(
        n=draw(st.sampled_from([1, 1, 1, 2, 3])),
        temperature=draw(temperatures),
        top_p=draw(st.one_of(st.just(1.0), st.floats(1e-30, 1.0))),
        top_k=draw(st.one_of(st.sampled_from([0, -1, 1]), st.integers(1, 2 * vocab))),
        min_p=draw(st.one_of(st.just(0.0), unit)),
        repetition_penalty=draw(repetition_penalties),
        presence_penalty=draw(penalty),
        frequency_penalty=draw(penalty),
        seed=draw(st.one_of(st.none(), st.integers(-(2**63), 2**63))),
        max_tokens=max_tokens,
        min_tokens=draw(st.integers(0, max_tokens if max_tokens is not None else 30)),
        ignore_eos=draw(st.booleans()),
        stop_token_ids=draw(st.lists(st.one_of(st.sampled_from(hot + eos), st.integers(0, vocab - 1)), max_size=4)),
        logprobs=draw(st.one_of(st.none(), st.integers(0, 20))),
        skip_special_tokens=draw(st.booleans()),
        include_stop_str_in_output=draw(st.booleans()),
    )
    if text:
        kw["stop"] = draw(st.one_of(
            st.none(), st.sampled_from(STOP_PIECES),
            st.lists(st.one_of(st.sampled_from(STOP_PIECES), st.text(min_size=1, max_size=3)), max_size=3)))
    bad = None
    if draw(st.integers(0, 11)) == 0:
        bad = draw(st.sampled_from(sorted(BAD_VALUES)))
        kw[bad] = draw(st.sampled_from(BAD_VALUES[bad]))
        if bad == "min_tokens" and draw(st.booleans()):
            kw["max_tokens"] = kw["max_tokens"] or 4
            kw["min_tokens"] = kw["max_tokens"] + 1
    elif draw(st.integers(0, 29)) == 0:  # passes SamplingParams; add_request refuses it
        bad = "stop_token_ids"
        kw["stop_token_ids"] = [draw(st.integers(vocab, vocab + 1000))]
    elif not text and draw(st.integers(0, 29)) == 0:
        bad = "stop"  # stop strings without a tokenizer
        kw["stop"] = ["."]
    return kw, bad


def extreme(kw: dict) -> set[str]:
    """Params drawn far out (but valid today): a later guard against float32's edges may refuse them."""
    far = {"temperature": kw["temperature"] != 0 and not 1e-6 <= kw["temperature"] <= 1e6,
           "repetition_penalty": not 1e-6 <= kw["repetition_penalty"] <= 1e6,
           "top_p": kw["top_p"] < 1e-6}
    return {name for name, out in far.items() if out}


@st.composite
def prompts(draw, vocab: int, text: bool) -> tuple[str | list[int], bool]:
    """A prompt, and whether it must be refused (param "prompt")."""
    kind = draw(st.sampled_from(["ids"] * 4 + (["text"] * 4 if text else []) + ["bad"]))
    if kind == "ids":
        ids = draw(st.one_of(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=24),
                             st.lists(st.integers(0, vocab - 1), min_size=1, max_size=MAX_MODEL_LEN + 2)))
        return ids, len(ids) >= MAX_MODEL_LEN
    if kind == "text":
        return draw(st.one_of(st.sampled_from(STORY_TEXT), st.text(min_size=1, max_size=60))), None  # length: tokenized
    return draw(st.sampled_from([[], [vocab], [-1, 3], [1, True], [2.0], "", "a\ud800"])), True


@st.composite
def requests(draw, vocab: int, hot: list[int], eos: list[int], text: bool) -> dict:
    kw, bad = draw(sampling_kwargs(vocab, hot, eos, text))
    prompt, bad_prompt = draw(prompts(vocab, text))
    return dict(prompt=prompt, bad_prompt=bad_prompt, kw=kw, bad=bad,
                arrive=draw(st.one_of(st.just(0), st.integers(0, 40))),
                abort=draw(st.one_of(st.none(), st.none(), st.integers(0, 60))))


# ---- the property -----------------------------------------------------------------------------
def check_output(engine: LLMEngine, params: SamplingParams, prompt_len: int, out, finished: bool) -> Counter:
    """Everything a (partial or final) output of one request must satisfy; returns what it exercised."""
    seen = Counter()
    vocab, eos = engine.model_config.vocab_size, engine.eos_token_ids
    assert sorted(o.index for o in out.outputs) == list(range(params.n))
    for o in out.outputs:
        ids = o.token_ids
        assert all(isinstance(t, int) and 0 <= t < vocab for t in ids), ids
        assert params.max_tokens is None or len(ids) <= params.max_tokens
        assert prompt_len + len(ids) <= engine.max_model_len
        blocked = set(eos) | set(params.stop_token_ids)
        early = ids[:params.min_tokens]
        assert not blocked & set(early), f"a blocked token was sampled before min_tokens={params.min_tokens}: {ids}"
        seen["blocked_positions"] += len(early) if blocked and finished else 0
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
        assert not ends & set(ids[:-1]), f"generation went on after a stop/EOS token: {ids}"
        if params.logprobs is None:
            assert o.logprobs is None
        else:
            assert len(o.logprobs) == len(ids)
            for t, entry in zip(ids, o.logprobs):
                assert t in entry and len(entry) <= params.logprobs + 1
                assert all(math.isfinite(lp.logprob) and lp.logprob <= 1e-4 and lp.rank >= 1 for lp in entry.values())
        if not finished:
            assert o.finish_reason is None or o.finish_reason in FINISH_REASONS
            continue
        assert o.finish_reason in FINISH_REASONS, o
        assert ids, "a finished sample generated nothing"
        if o.finish_reason == "length":
            assert len(ids) == params.max_tokens or prompt_len + len(ids) == engine.max_model_len, o
            assert o.stop_reason is None
        elif isinstance(o.stop_reason, str):
            assert o.stop_reason in params.stop and len(ids) >= params.min_tokens, o
            seen["stop_string"] += 1
        else:
            assert len(ids) >= params.min_tokens, o
            if o.stop_reason is None:  # EOS
                assert not params.ignore_eos and ids[-1] in eos, o
                seen["eos"] += 1
            else:
                assert o.stop_reason == ids[-1] and ids[-1] in params.stop_token_ids, o
                seen["stop_token"] += 1
        # a stop string ends the text where it first occurs (an EOS or stop token ends it as it is);
        # one met before min_tokens stays text
        if params.stop and not params.min_tokens and not params.include_stop_str_in_output and (
                o.finish_reason == "length" or isinstance(o.stop_reason, str)):
            assert not any(s in o.text for s in params.stop), o
        if isinstance(o.stop_reason, str) and params.include_stop_str_in_output:
            assert o.text.endswith(o.stop_reason), o
    return seen


def drive(engine: LLMEngine, specs: list[dict], stats: Counter) -> None:
    """Run one draw: add at its step, abort at its step, step until drained, check everything."""
    assert not engine.requests
    preemptions = engine.scheduler.num_preemptions
    live: dict[str, tuple[SamplingParams, int]] = {}  # request id -> (params, prompt length)
    aborted: set[str] = set()
    done: set[str] = set()
    step = 0
    for rid, spec in enumerate(specs):
        spec["rid"] = f"r{rid}"
    while step <= max(s["arrive"] for s in specs) or engine.has_unfinished_requests():
        for spec in specs:
            if spec["arrive"] == step:
                add(engine, spec, live, stats)
            if spec["abort"] is not None and spec["arrive"] + spec["abort"] == step:
                rid = spec["rid"]
                running = rid in engine.requests
                engine.abort_request(rid)  # a no-op for finished or refused ones
                assert rid not in engine.requests
                if running:
                    aborted.add(rid)
                    stats["aborted_in_flight"] += 1
        outputs = engine.step()  # nothing accepted may make it raise
        assert not engine.pop_failed(), "a request failed a step by itself"
        for out in outputs:
            rid = out.request_id
            assert rid in live and rid not in aborted and rid not in done, f"output for {rid} after it ended"
            params, prompt_len = live[rid]
            stats.update(check_output(engine, params, prompt_len, out, out.finished))
            if out.finished:
                done.add(rid)
                stats["finished"] += 1
        step += 1
        assert step < MAX_STEPS, f"not drained after {MAX_STEPS} steps: {list(engine.requests)}"
    assert set(live) == done | aborted, f"requests that never ended: {set(live) - done - aborted}"
    pool = engine.block_pool
    assert not engine.requests and not engine.scheduler.waiting and not engine.scheduler.running
    assert pool.num_free_blocks == pool.num_usable_blocks and pool.num_used_blocks == 0
    if engine.scheduler.num_preemptions > preemptions:
        stats["draws_that_preempted"] += 1
    stats["preemptions"] += engine.scheduler.num_preemptions - preemptions


def add(engine: LLMEngine, spec: dict, live: dict, stats: Counter) -> None:
    rid, kw, bad, bad_prompt = spec["rid"], spec["kw"], spec["bad"], spec["bad_prompt"]
    if bad_prompt is None:  # a text prompt: too long once tokenized?
        bad_prompt = len(engine.tokenizer.encode(spec["prompt"])) >= engine.max_model_len
    running = engine.has_unfinished_requests()
    try:
        params = SamplingParams(**kw)
        engine.add_request(rid, spec["prompt"], params)
    except InvalidParameterError as e:
        # a bad prompt or a bad param may be named, whichever is checked first
        if e.param in extreme(kw) - {bad}:
            stats["refused_extreme"] += 1
            return
        assert e.param in {bad, "prompt" if bad_prompt else None} - {None}, (e, spec)
        assert rid not in engine.requests
        stats["refused"] += 1
        return
    assert bad is None and not bad_prompt, f"accepted a bad request: {spec}"
    live[rid] = (params, len(engine.requests[rid].prompt_token_ids))
    stats["accepted"] += 1
    stats["added_while_running"] += running


def test_random_traffic_keeps_the_engine_whole(engine):
    vocab, eos = engine.model_config.vocab_size, engine.eos_token_ids
    text = engine.tokenizer is not None
    hot = hot_tokens(engine)
    stats: Counter = Counter()

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(requests(vocab, hot, eos, text), min_size=1, max_size=8))
    def run(specs):
        try:
            drive(engine, specs, stats)
        finally:  # a failing draw must not leave requests behind for the next (shrinking) one
            for rid in list(engine.requests):
                engine.abort_request(rid)

    run()
    print(f"\n{engine.label}: {dict(sorted(stats.items()))}")
    # not vacuous: the draws preempted, aborted running requests, added while others ran, refused
    # bad input, and finished by every route
    assert stats["draws_that_preempted"] >= 5 and stats["preemptions"] >= 20, stats
    assert stats["aborted_in_flight"] >= 5 and stats["added_while_running"] >= 10, stats
    assert stats["refused"] >= 5 and stats["finished"] >= 50 and stats["blocked_positions"] >= 20, stats
    assert stats["stop_token"] >= 1 and (stats["stop_string"] >= 1 or not text), stats


# ---- values the random draws leave out: known and new bugs, one explicit case each ---------------
BLOCK_TOKEN_0 = dict(stop_token_ids=[0], min_tokens=4, max_tokens=4, ignore_eos=True)  # token 0 may never come
LONG_PROMPT = list(range(3, 40))  # many distinct tokens: the repetition penalty touches positive logits


def generate_alone(engine: LLMEngine, prompt, params: SamplingParams):
    """The request's final output, run by itself; the engine is left empty even if a step raises."""
    try:
        engine.add_request("alone", prompt, params)
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                final = out if out.finished else final
        assert not engine.pop_failed(), "the request failed a step"
        return final
    finally:
        engine.abort_request("alone")


def refused_or_well_formed(engine: LLMEngine, bad: dict, base: dict | None = None, prompt=LONG_PROMPT):
    """Values SamplingParams or add_request refuses (InvalidParameterError naming one of `bad`, not of the
    valid `base`), or an output that keeps every promise: the property test's checks (so token 0 never
    comes before min_tokens where it is a stop token)."""
    try:
        params = SamplingParams(**bad, **(base or {}))
    except InvalidParameterError as e:
        assert e.param in bad, e
        return
    try:
        out = generate_alone(engine, prompt, params)
    except InvalidParameterError as e:  # from add_request, before any step
        assert e.param in bad, e
        return
    assert out is not None and out.finished
    check_output(engine, params, len(out.prompt_token_ids), out, finished=True)


@pytest.mark.parametrize("kw", [dict(temperature=1e-40), dict(repetition_penalty=1e-40), dict(top_p=1e-46),
                                dict(temperature=1e39), dict(temperature=1e-20, repetition_penalty=1e-20)],
                         ids=["temperature=1e-40", "repetition_penalty=1e-40", "top_p=1e-46", "temperature=1e39",
                              "temperature*repetition_penalty=1e-40"])
def test_float32_edges_never_sample_a_blocked_token(tiny_llama, kw):
    """Values that underflow or overflow float32 (alone or as the sampler's product) once made the
    probabilities NaN, and token 0 was sampled although blocked."""
    refused_or_well_formed(tiny_llama, kw, BLOCK_TOKEN_0)


@pytest.mark.parametrize("kw", [dict(top_k=2.5), dict(logprobs=True), dict(logprobs=2.5), dict(n=1.5),
                                dict(max_tokens=2.5), dict(temperature=math.nan), dict(repetition_penalty=math.nan),
                                dict(temperature=math.inf), dict(temperature=None), dict(temperature="0.5"),
                                dict(top_k=None), dict(n=None), dict(max_tokens="3"), dict(stop_token_ids=5),
                                dict(stop=5)],
                         ids=["top_k=2.5", "logprobs=True", "logprobs=2.5", "n=1.5", "max_tokens=2.5",
                              "temperature=nan", "repetition_penalty=nan", "temperature=inf", "temperature=None",
                              "temperature='0.5'", "top_k=None", "n=None", "max_tokens='3'", "stop_token_ids=5",
                              "stop=5"])
def test_wrong_types_and_non_finite_values_are_invalid_parameters(kw):
    """They once passed SamplingParams and raised TypeError in add_request or step(), or sampled NaN."""
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**kw)
    assert e.value.param in kw


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "random"])
def test_a_request_that_blocks_every_token_is_refused(tiny_llama, temperature):
    """stop_token_ids that with EOS cover the vocabulary leave nothing to sample before min_tokens."""
    vocab = tiny_llama.model_config.vocab_size
    params = SamplingParams(stop_token_ids=list(range(vocab)), min_tokens=3, max_tokens=5, temperature=temperature)
    with pytest.raises(InvalidParameterError) as e:
        tiny_llama.add_request("all-blocked", LONG_PROMPT, params)
    assert e.value.param == "stop_token_ids" and "whole vocabulary" in str(e.value)
    assert "all-blocked" not in tiny_llama.requests
    # one id fewer leaves a token to sample: accepted, and it keeps min_tokens
    refused_or_well_formed(tiny_llama, dict(stop_token_ids=list(range(1, vocab)), min_tokens=3),
                           dict(max_tokens=5, temperature=temperature))


def test_stop_strings_wait_for_min_tokens(stories):
    """As in vLLM, no stop condition ends the output before min_tokens; a stop string met earlier stays text."""
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=10, stop=[" "])
    out = generate_alone(stories, "Once upon a time", params).outputs[0]
    assert len(out.token_ids) >= 10 and out.stop_reason == " ", out
    assert " " in out.text  # the spaces of the first 10 tokens stay
    early = generate_alone(stories, "Once upon a time", SamplingParams(temperature=0, max_tokens=20, stop=[" "]))
    assert len(early.outputs[0].token_ids) < 10  # without min_tokens the same stop string ends it early


@pytest.mark.parametrize("kw, param", [
    (dict(stop=[f"zq{i}" for i in range(50_000)]), "stop"),
    (dict(stop=["z" * 100_000]), "stop"),
    (dict(stop_token_ids=list(range(100_000)), min_tokens=20), "stop_token_ids"),
], ids=["50k-stop-strings", "100k-char-stop-string", "100k-stop-token-ids"])
def test_a_long_stop_list_is_refused(kw, param):
    """Every step checks each stop string and blocks each stop id of every sequence: through the server
    200k stop strings once made a 20-token completion beside them take 38 s instead of 0.05 s."""
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(max_tokens=20, **kw)
    assert e.value.param == param and "at most" in str(e.value)


def test_repeated_stop_token_ids_count_once(tiny_llama):
    """A million copies of one id are one id: cheap, and accepted."""
    params = SamplingParams(max_tokens=20, stop_token_ids=[5] * 1_000_000, min_tokens=4)
    assert params.stop_token_ids == [5]
    refused_or_well_formed(tiny_llama, dict(stop_token_ids=[5] * 1_000_000, min_tokens=4), dict(max_tokens=6))

"""Speculative decoding: greedy outputs unchanged (n-gram and draft model, mixed batches with
chunked prefill and preemption), the sampled distribution preserved (chi-square), exact KV
accounting after rejections, the adaptive choice of k, configuration errors, and metrics."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from tokenmill import LLM, SamplingParams
from tokenmill.engine.engine import LLMEngine
from tokenmill.step_plan import ScheduledChunk
from tokenmill.errors import InvalidParameterError
from tokenmill.executor.rejection_sampler import verify
from tokenmill.executor.sampler import Sampler, SamplingBatch, target_probs
from tokenmill.sequence import Sequence
from tokenmill.spec.config import SpeculativeConfig
from tokenmill.spec.controller import SpecController, StepCost, expected_tokens
from tokenmill.spec.ngram import propose_ngram

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
# Repetitive prompts (so lookup finds matches), a long one (chunked prefill), short ones.
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8], [10, 11, 12], list(range(20, 90)), [3, 4, 3, 4, 3, 4, 3],
           [200, 100, 50, 25, 12, 6], list(range(100, 130)) * 2, [42]]


def spec_configs(path: str) -> dict[str, dict]:
    return {"ngram": {"method": "ngram"},
            "ngram-always": {"method": "ngram", "adaptive": False, "prompt_lookup_min": 1},
            "draft-truncated": {"method": "draft", "model": path, "draft_layers": 1, "adaptive": False},
            "draft-same": {"method": "draft", "model": path, "num_speculative_tokens": 3},
            "draft-other": {"method": "draft", "model": None, "adaptive": False}}  # set per test: another model


def outputs(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="4MiB")
    return outputs(llm, PROMPTS, GREEDY)


@pytest.mark.parametrize("name", ["ngram", "ngram-always", "draft-truncated", "draft-same", "draft-other"])
def test_greedy_output_is_unchanged_with_chunked_prefill_and_preemption(tiny_models, reference, name):
    path = str(tiny_models["llama"])
    config = spec_configs(path)[name]
    if name == "draft-other":
        config["model"] = str(tiny_models["llama-tied"])  # same vocabulary, other weights: mostly rejected
    # 24 blocks of 8 tokens for 7 sequences growing to 110 tokens: preemption; 32-token budget: chunks
    llm = LLM(path, dtype="float32", kv_cache_memory=24 * 8 * 512, block_size=8,  # 512 bytes of KV per token
              max_num_batched_tokens=32, max_model_len=160, speculative_config=config)
    assert outputs(llm, PROMPTS, GREEDY) == reference
    stats = llm.engine.speculator.stats
    assert stats.verify_steps > 0 and stats.draft_tokens > 0
    assert llm.engine.scheduler.num_preemptions > 0
    if name == "draft-same":
        assert stats.accepted_tokens == stats.draft_tokens  # the draft is the target
    if name in ("ngram-always", "draft-truncated", "draft-other"):
        assert stats.accepted_tokens < stats.draft_tokens  # rejections happened


def test_greedy_output_is_unchanged_on_a_real_model(stories_path):
    prompts = ["Once upon a time", "The little dog ran to the park. The little dog", "Lily and Ben"]
    params = SamplingParams(temperature=0, max_tokens=64)
    plain = outputs(LLM(str(stories_path), dtype="float32", kv_cache_memory="32MiB"), prompts, params)
    for config in ({"method": "ngram", "adaptive": False},
                   {"method": "draft", "model": str(stories_path), "draft_layers": 2, "adaptive": False}):
        llm = LLM(str(stories_path), dtype="float32", kv_cache_memory="32MiB", speculative_config=config)
        assert outputs(llm, prompts, params) == plain
        assert llm.engine.speculator.stats.accepted_tokens > 0


@pytest.mark.slow
def test_greedy_output_is_unchanged_on_the_default_form(default_model_available):
    """The default model as a user gets it (int4, tokenmill's kernels): greedy n-gram speculation on a
    copy task, 96 tokens, equals speculation off token for token, alone and in a batch of four."""
    text = ("The river rose in the spring and the farmers moved their sheep to the high fields, where the grass "
            "was thin but dry, and waited for the water to fall.")
    prompts = [f"Repeat this text exactly, three times:\n{text}", "Count from one to forty in words:",
               "Write the alphabet twice:", "List the days of the week, then the months of the year:"]
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    plain = outputs(LLM(kv_cache_memory="64MiB"), prompts, params)
    llm = LLM(kv_cache_memory="64MiB", speculative_config={"method": "ngram", "adaptive": False})
    assert outputs(llm, prompts, params) == plain
    assert outputs(llm, prompts[:1], params) == plain[:1]
    assert llm.engine.speculator.stats.accepted_tokens > 0


@pytest.mark.slow
def test_stop_strings_end_a_verified_step_at_their_token(stories_path):
    """A stop string completed inside a verification's accepted drafts ends the output at that
    token (the step's later tokens dropped), as with speculation off: same text, tokens and reasons."""
    prompt = "The little dog ran to the park. The little dog ran to the park. The little dog"
    plain = LLM(str(stories_path), dtype="float32", kv_cache_memory="32MiB")
    spec = LLM(str(stories_path), dtype="float32", kv_cache_memory="32MiB",  # the draft is the target:
               speculative_config={"method": "draft", "model": str(stories_path),  # every draft is accepted
                                   "num_speculative_tokens": 4, "adaptive": False})
    text = plain.generate([prompt], SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)[0].outputs[0].text
    stops = [text[i:i + 4] for i in range(6, len(text) - 4, 9)]
    assert len(stops) >= 5
    for stop in stops:
        for include in (False, True):
            params = SamplingParams(temperature=0, max_tokens=48, stop=[stop], include_stop_str_in_output=include)
            want, got = (llm.generate([prompt], params, use_tqdm=False)[0].outputs[0] for llm in (plain, spec))
            assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
                   (want.text, want.token_ids, want.finish_reason, want.stop_reason)
            assert want.stop_reason == stop
    assert spec.engine.speculator.stats.accepted_tokens > 0


def test_penalties_min_tokens_stops_and_logprobs_hold_under_speculation(tiny_models):
    path = str(tiny_models["llama"])
    params = [SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, logprobs=2),
              SamplingParams(temperature=0, max_tokens=30, min_tokens=12, stop_token_ids=[57], logprobs=0),
              SamplingParams(temperature=0, max_tokens=7, frequency_penalty=0.5)]
    prompts = PROMPTS[:3]
    plain = LLM(path, dtype="float32", kv_cache_memory="4MiB").generate(prompts, params, use_tqdm=False)
    spec = LLM(path, dtype="float32", kv_cache_memory="4MiB",
               speculative_config={"method": "ngram", "adaptive": False}).generate(prompts, params, use_tqdm=False)
    for a, b in zip(plain, spec):
        x, y = a.outputs[0], b.outputs[0]
        assert (x.token_ids, x.finish_reason, x.stop_reason) == (y.token_ids, y.finish_reason, y.stop_reason)
        assert (x.logprobs is None) == (y.logprobs is None)
        assert [sorted(e) for e in x.logprobs or []] == [sorted(e) for e in y.logprobs or []]
        for ex, ey in zip(x.logprobs or [], y.logprobs or []):
            for tid in ex:
                assert ex[tid].logprob == pytest.approx(ey[tid].logprob, abs=1e-4) and ex[tid].rank == ey[tid].rank


# ---- rejection sampling preserves the target distribution -------------------------------------


def first_tokens(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                       params: SamplingParams) -> torch.Tensor:
    """Verify one draft for each of n identical sequences; the first token each emits."""
    sampler = Sampler(seed=1234)
    n = len(drafts)
    rows = logits.repeat(n, 1)  # [2n, V]: the row after the known token, the row after the draft
    batch = SamplingBatch([params] * 2 * n, [None] * 2 * n, [[1]] * 2 * n, [[] for _ in range(2 * n)],
                          [[] for _ in range(2 * n)])
    counts, samples = verify(sampler, rows, batch, [[d] for d in drafts], [q] * n)
    firsts, row = [], 0
    for c in counts:
        firsts.append(samples.token_ids[row])
        row += c
    return torch.tensor(firsts)


def chi2_pvalue(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit, the categories with under 5 expected counts merged into one."""
    n = observed.sum().item()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([observed[big].double(), observed[~big].double().sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.fixture(scope="module")
def tiny_logits(tiny_models):
    """Two real next-token logits rows of the tiny model, and a draft model's rows for the same context."""
    def rows(path: str) -> torch.Tensor:
        engine = LLMEngine(path, dtype="float32", kv_cache_memory="2MiB")
        seq = Sequence("x", 0, [5, 6, 7, 8], SamplingParams(), 0.0)
        engine.kv_cache.allocate(seq, engine.kv_cache.lookup(seq), 4)
        logits = engine.runner.logits_for([ScheduledChunk(seq, 0, 4, engine.kv_cache.block_table(seq.seq_id))])[-2:]
        engine.kv_cache.free(seq.seq_id)
        return logits
    return rows(str(tiny_models["llama"])), rows(str(tiny_models["llama-tied"]))


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_rejection_sampling_keeps_the_target_distribution(tiny_logits, proposer):
    target, other = tiny_logits
    params = SamplingParams(temperature=0.3)  # the random tiny model is flat: cool it to a top token near 0.3
    p = target_probs(target.clone(), [params, params])
    n = 40_000
    if proposer == "ngram":
        q = None  # a deterministic guess of the likeliest token
        drafts = [int(p[0].argmax())] * n
    else:
        q = target_probs(other.clone(), [params, params])[:1]  # [k=1, V]: another model's distribution
        drafts = torch.multinomial(q[0], n, replacement=True, generator=torch.Generator().manual_seed(0)).tolist()
    firsts = first_tokens(target, drafts, q, params)
    counts = torch.bincount(firsts, minlength=target.shape[1])
    assert 0.05 < (firsts == torch.tensor(drafts)).float().mean() < 0.95  # drafts often kept, often not
    assert chi2_pvalue(counts, p[0]) > 1e-3
    # The same test, at this sample size, rejects a distribution 2% of whose mass has moved.
    top2 = p[0].topk(2).indices
    shifted = p[0].clone()
    moved = min(0.02, float(shifted[top2[0]]))
    shifted[top2[0]] -= moved
    shifted[top2[1]] += moved
    assert chi2_pvalue(counts, shifted) < 1e-3


def test_seeded_sampling_under_speculation_is_reproducible(tiny_models):
    path = str(tiny_models["llama"])
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=30, seed=7, ignore_eos=True)
    config = {"method": "draft", "model": path, "draft_layers": 1, "adaptive": False}
    runs = [outputs(LLM(path, dtype="float32", kv_cache_memory="4MiB", speculative_config=config), PROMPTS[:3], params)
            for _ in range(2)]
    assert runs[0] == runs[1]


# ---- rollback: exact KV accounting --------------------------------------------------------------


def test_rejected_drafts_leave_no_blocks_and_no_stale_kv(tiny_models, reference):
    path = str(tiny_models["llama"])
    engine = LLMEngine(path, dtype="float32", kv_cache_memory="4MiB", block_size=4,
                       speculative_config={"method": "draft", "model": str(tiny_models["llama-tied"]),
                                           "draft_layers": [1], "adaptive": False, "num_speculative_tokens": 6})
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, GREEDY)
    draft = engine.speculator.draft
    done: dict[str, list[int]] = {}
    bs = engine.config.cache.block_size
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        running = engine.scheduler.running
        for seq in running:  # exactly the blocks of the computed tokens, none for rejected drafts
            assert len(engine.kv_cache.block_table(seq.seq_id)) == math.ceil(seq.num_computed_tokens / bs)
            assert seq.num_computed_tokens == seq.num_tokens - 1 or seq.num_computed_tokens < seq.num_prompt_tokens
        assert engine.block_pool.num_used_blocks == len({b for s in running for b in engine.kv_cache.block_table(s.seq_id)})
        cached = draft.cached_tokens()
        assert draft.num_used_blocks == sum(math.ceil(n / bs) for n in cached.values())
        for seq in running:  # the draft cache holds a prefix of the real tokens, never a rejected one
            state = draft._states.get(seq.seq_id)
            if state is not None:
                assert state.fed == seq.token_ids[:len(state.fed)]
    assert [done[str(i)] for i in range(len(PROMPTS))] == reference
    assert engine.speculator.stats.accepted_tokens < engine.speculator.stats.draft_tokens
    assert draft.num_used_blocks == 0 and draft.cached_tokens() == {}


# ---- proposers and the adaptive controller --------------------------------------------------


def test_ngram_lookup_proposes_what_followed_the_latest_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], k=2, max_n=3, min_n=1) == [7, 8]
    assert propose_ngram([1, 2, 3, 4, 5], k=3, max_n=3, min_n=1) == []
    assert propose_ngram([4, 4, 4], k=3, max_n=2, min_n=1) == [4]
    assert propose_ngram([5, 6, 1, 6], k=2, max_n=2, min_n=2) == []  # only a 1-token tail recurs
    assert propose_ngram([5, 6, 1, 6], k=2, max_n=2, min_n=1) == [1, 6]


def test_step_cost_interpolates_between_measured_sizes():
    cost = StepCost()
    assert cost.seconds(7) == 1.0  # nothing measured: flat
    cost.observe(1, 0.010)
    cost.observe(16, 0.040)
    assert cost.seconds(1) == pytest.approx(0.010)
    assert cost.seconds(8) == pytest.approx(0.010 + 0.030 * 7 / 15)
    assert cost.seconds(32) == pytest.approx(0.040 + 0.030 / 15 * 16)


def test_the_controller_speculates_only_while_it_pays():
    c = SpecController(max_k=4)
    for tokens in range(1, 9):  # each verified token adds a sixth of a step
        c.target_cost.observe(tokens, 0.020 + 0.004 * tokens)
    for _ in range(3):  # timed plain steps to compare with
        c.realized(1, drafted=False, tokens_per_second=40.0)
    assert c.choose({1: 4}, step_tokens=1, decodes=1)[1] >= 1  # the prior alpha 0.5 is worth trying
    for _ in range(30):
        c.observe(1, proposed=4, accepted=0)
    assert c.alpha(1) < 0.1
    assert c.choose({1: 4}, step_tokens=1, decodes=1) == {}  # stopped: no speculation for it
    for _ in range(30):  # its shadow guesses come true again
        c.shadow(1, 42)
        c.observe_token(1, 42)
    assert c.alpha(1) > 0.85 and c.choose({1: 4}, step_tokens=1, decodes=1) == {1: 4}  # resumed


def test_a_compute_bound_batch_gets_fewer_drafts():
    c = SpecController(max_k=4)
    for tokens in (1, 2, 4, 8, 16, 32, 64):  # linear beyond 8 tokens
        c.target_cost.observe(tokens, 0.02 if tokens <= 8 else 0.02 * tokens / 8)
    for sid in range(8):
        for _ in range(10):
            c.observe(sid, proposed=4, accepted=2)
    for decodes in (1, 8, 1, 8, 1, 8):
        c.realized(decodes, drafted=False, tokens_per_second=50.0)
    alone = c.choose({0: 4}, step_tokens=1, decodes=1)
    crowded = c.choose({sid: 4 for sid in range(8)}, step_tokens=8, decodes=8)
    assert alone == {0: 4} and sum(crowded.values()) < 8 * 4
    assert expected_tokens(0.5, 2) == pytest.approx(1.75) and expected_tokens(1.0, 3) == 4


def test_a_draft_that_never_agrees_stops_being_used(tiny_models):
    path = str(tiny_models["llama"])
    llm = LLM(path, dtype="float32", kv_cache_memory="4MiB",
              speculative_config={"method": "draft", "model": str(tiny_models["llama-tied"]), "draft_layers": 1})
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=120, ignore_eos=True), use_tqdm=False)[0]
    stats = llm.engine.speculator.stats
    assert out.metrics.spec_draft_tokens == stats.draft_tokens < 119 * 4 / 2  # it stopped proposing most steps


# ---- configuration ----------------------------------------------------------------------------


def test_bad_speculative_configs_are_refused_by_name(tiny_models):
    for bad, says in [({"method": "medusa"}, "speculative_config.method"),
                      ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
                      ({"prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min"),
                      ({"k": 3}, "unknown keys"), ("{not json", "not a JSON object"),
                      ({"draft_layers": 0}, "draft_layers")]:
        with pytest.raises(InvalidParameterError, match=says):
            SpeculativeConfig.of(bad)
    path = str(tiny_models["llama"])
    with pytest.raises(InvalidParameterError, match="vocabulary"):
        LLMEngine(path, kv_cache_memory="2MiB", speculative_config={"method": "draft",
                                                                   "model": str(_other_vocab(tiny_models))})
    with pytest.raises(InvalidParameterError, match="draft_layers"):
        LLMEngine(path, kv_cache_memory="2MiB", speculative_config={"method": "draft", "model": path,
                                                                   "draft_layers": 9})


def _other_vocab(tiny_models):
    from conftest import save_tiny_model

    folder = tiny_models["llama"].parent / "llama-vocab-300"
    if not folder.exists():
        save_tiny_model(folder, "llama", vocab_size=300)
    return folder


def test_the_server_reports_speculation_per_request_and_in_metrics(tiny_chat_model):
    import openai

    from server_process import ServerProcess

    flags = ["--model", str(tiny_chat_model), "--dtype", "float32", "--kv-cache-memory", "8MiB",
             "--speculative-config", '{"method": "ngram", "adaptive": false}']
    with ServerProcess(flags) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        got = client.completions.create(model=model, prompt=[5, 6, 7, 5, 6, 7, 5, 6], max_tokens=24, temperature=0,
                                        extra_body={"ignore_eos": True})
        spec = got.usage.model_extra["speculative"]
        assert got.usage.completion_tokens == 24 and spec["draft_tokens"] > 0
        assert server.metric("tokenmill_spec_decode_draft_tokens_total") == spec["draft_tokens"]
        assert server.metric("tokenmill_spec_decode_accepted_tokens_total") == spec["accepted_tokens"]
        assert 0 <= server.metric("tokenmill_spec_decode_acceptance_rate") <= 1


def test_the_clock_overrules_the_cost_model():
    c = SpecController(max_k=4)
    for tokens in range(1, 9):  # the model: drafts are nearly free
        c.target_cost.observe(tokens, 0.020)
    for _ in range(10):
        c.observe(1, proposed=4, accepted=4)
    for _ in range(3):
        c.realized(1, drafted=False, tokens_per_second=50.0)
    assert c.choose({1: 4}, step_tokens=1, decodes=1) == {1: 4}
    for _ in range(3):  # but drafting steps measure slower
        c.realized(1, drafted=True, tokens_per_second=30.0)
    held = [c.choose({1: 4}, step_tokens=1, decodes=1) for _ in range(64)]
    assert held.count({}) >= 60 and {1: 4} in held  # held back, with a retry now and then

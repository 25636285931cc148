"""Sampling behaviour through the whole engine: seeds, n > 1, stop strings, logprobs, min_tokens."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny_llm(tiny_models):
    return LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="8MiB")


@pytest.fixture(scope="module")
def stories_llm(stories_path):
    return LLM(str(stories_path), dtype="float32", kv_cache_memory="32MiB")


def tokens(out, i=0):
    return out.outputs[i].token_ids


def test_seeded_sampling_reproducible_across_runs_and_batches(tiny_llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    other = SamplingParams(temperature=0.8, max_tokens=25, ignore_eos=True)
    prompt = [7, 8, 9, 10]
    alone = tokens(tiny_llm.generate([prompt], seeded, use_tqdm=False)[0])
    again = tokens(tiny_llm.generate([prompt], seeded, use_tqdm=False)[0])
    crowd = tiny_llm.generate([[3, 4], prompt, list(range(20, 60)), [11]], [other, seeded, other, other], use_tqdm=False)
    assert alone == again
    assert tokens(crowd[1]) == alone
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True)
    assert tokens(tiny_llm.generate([prompt], different_seed, use_tqdm=False)[0]) != alone


def test_n_samples_are_distinct(tiny_llm):
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=16, ignore_eos=True),
                            use_tqdm=False)[0]
    assert len(out.outputs) == 4
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 4


def test_greedy_n_and_batch_duplicates_agree(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    a, b = tiny_llm.generate([[9, 9, 9], [9, 9, 9]], params, use_tqdm=False)
    assert tokens(a) == tokens(b)


def test_logprobs_are_log_softmax_of_logits(tiny_models, tiny_llm):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    prompt = [4, 50, 60, 70]
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    ids = prompt + out.token_ids
    with torch.no_grad():
        ref_logprobs = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
    total = 0.0
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref_logprobs[len(prompt) - 1 + step]
        assert token in entry and entry[token].rank == 1  # greedy: the sampled token is the top-1
        assert abs(entry[token].logprob - row[token].item()) < 1e-4
        assert abs(entry[token].logprob - row.max().item()) < 1e-4
        top = sorted(entry.values(), key=lambda lp: lp.rank)
        assert len(entry) == 3 and [lp.rank for lp in top] == [1, 2, 3]
        assert all(lp.logprob <= 0 for lp in top)
        assert sum(math.exp(lp.logprob) for lp in top) <= 1 + 1e-5
        total += entry[token].logprob
    assert abs(out.cumulative_logprob - total) < 1e-5


def test_min_tokens_blocks_eos(tiny_llm):
    eos = tiny_llm.engine.eos_token_ids[0]
    greedy = tiny_llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0]
    # Make the first greedy token a stop token: with min_tokens=3 it may not end the sequence early.
    first = greedy.token_ids[0]
    out = tiny_llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=30, min_tokens=3, stop_token_ids=[first]),
                            use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 3 and first not in out.token_ids[:3]
    assert eos not in out.token_ids[:3]
    stopped = tiny_llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[first]),
                                use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.stop_reason == first


def test_stop_strings_cut_across_token_boundaries(stories_llm):
    greedy = SamplingParams(temperature=0, max_tokens=60)
    full = stories_llm.generate(["One day, Lily met a dragon"], greedy, use_tqdm=False)[0].outputs[0].text
    assert full.startswith(" named Jack. Jack was very excited")
    # "Jack was" spans several tokens; the text stops right before it.
    out = stories_llm.generate(["One day, Lily met a dragon"],
                               SamplingParams(temperature=0, max_tokens=60, stop=["ack was"]), use_tqdm=False)[0].outputs[0]
    assert out.text == " named Jack. J"
    assert out.finish_reason == "stop" and out.stop_reason == "ack was"
    kept = stories_llm.generate(["One day, Lily met a dragon"],
                                SamplingParams(temperature=0, max_tokens=60, stop=["ack was"],
                                               include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == " named Jack. Jack was"


def test_streamed_text_never_shows_a_partial_stop_string(stories_llm):
    engine = stories_llm.engine
    engine.add_request("s", "One day, Lily met a dragon", SamplingParams(temperature=0, max_tokens=60, stop=["ack was"]))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append(out.outputs[0].text)
    assert all("ack w" not in t for t in seen)
    assert all(seen[-1].startswith(t) for t in seen)
    assert seen[-1] == " named Jack. J"


def test_stories_reference_text(stories_llm):
    """The llama2.c reference sample: greedy from BOS, 200 tokens, byte for byte."""
    out = stories_llm.generate([[1]], SamplingParams(temperature=0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    assert out.text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")
    assert out.text.endswith("Lily didn't want to help her mom, so she")
    assert out.finish_reason == "length" and len(out.token_ids) == 200


def test_multibyte_characters_never_split(stories_llm):
    tok = stories_llm.get_tokenizer()
    text = "Lily saw a café and a 🐉 dragon. ü"
    ids = tok.encode(text, add_special_tokens=False)
    from tokenmill.tokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tok, [1], skip_special_tokens=True)
    pieces = [detok.step(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces).strip() == tok.decode(ids).strip()


def test_request_metrics_are_ordered(tiny_llm):
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time
    assert m.ttft >= 0 and m.e2e >= m.ttft


def test_logit_bias_forces_or_bans_tokens_and_leaves_other_rows_alone(tiny_llm):
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7], [40, 41], [90, 91, 92, 93]]
    alone = [tokens(o) for o in tiny_llm.generate(prompts, greedy, use_tqdm=False)]
    forced = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={77: 100})
    banned = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={alone[1][0]: -100})
    mixed = tiny_llm.generate(prompts, [forced, banned, greedy], use_tqdm=False)
    assert tokens(mixed[0]) == [77] * 6
    assert tokens(mixed[1])[0] != alone[1][0] and alone[1][0] not in tokens(mixed[1])
    assert tokens(mixed[2]) == alone[2]
    sampled = SamplingParams(temperature=1.0, seed=4, max_tokens=6, ignore_eos=True, logit_bias={77: 100})
    assert tokens(tiny_llm.generate(prompts[:1], sampled, use_tqdm=False)[0]) == [77] * 6


def test_truncate_prompt_tokens_keeps_the_last_ones(tiny_llm):
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    cut = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, truncate_prompt_tokens=3)
    long = list(range(10, 40))
    out = tiny_llm.generate([long], cut, use_tqdm=False)[0]
    assert out.prompt_token_ids == long[-3:]
    assert tokens(out) == tokens(tiny_llm.generate([long[-3:]], greedy, use_tqdm=False)[0])


def test_generation_config_gives_the_defaults_of_offline_generate(tmp_path):
    import json
    from conftest import save_tiny_model

    path = save_tiny_model(tmp_path / "m", "llama")
    (path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5, "top_k": 1, "temperature": 0.7,
                                                             "do_sample": True, "eos_token_id": 2}))
    llm = LLM(str(path), dtype="float32", kv_cache_memory="4MiB")
    assert llm.engine.generation_defaults == {"max_tokens": 5, "top_k": 1, "temperature": 0.7}
    out = llm.generate([[5, 6, 7]], use_tqdm=False)[0].outputs[0]
    greedy = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy.token_ids  # top_k 1 samples the argmax
    assert len(out.token_ids) == 5 or out.finish_reason == "stop"

"""Sampler behaviour on small hand-made logits: greedy, penalties, filters, seeding, distribution, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.executor.sampler import Sampler, SamplingBatch
from tokenmill.sampling_params import SamplingParams


def make_batch(params, generators=None, prompts=None, outputs=None, blocked=None) -> SamplingBatch:
    n = len(params)
    return SamplingBatch(
        params=list(params),
        generators=list(generators) if generators is not None else [None] * n,
        prompt_token_ids=list(prompts) if prompts is not None else [[] for _ in range(n)],
        output_token_ids=list(outputs) if outputs is not None else [[] for _ in range(n)],
        blocked_token_ids=list(blocked) if blocked is not None else [[] for _ in range(n)],
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw_many(logits_row: torch.Tensor, params: SamplingParams, draws: int, seed: int = 0, blocked=None):
    """`draws` samples of one row, batched as identical rows drawing from one seeded shared generator."""
    logits = logits_row.unsqueeze(0).expand(draws, -1).contiguous()
    batch = make_batch([params] * draws, blocked=[blocked or []] * draws)
    return torch.tensor(Sampler(seed=seed)(logits, batch).token_ids)


LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0, 2.5])


def test_greedy_is_argmax_for_any_dtype():
    torch.manual_seed(0)
    logits = torch.randn(7, 50)
    greedy = SamplingParams(temperature=0.0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = Sampler()(logits.to(dtype), make_batch([greedy] * 7))
        assert out.token_ids == logits.to(dtype).argmax(-1).tolist()
        assert out.logprobs is None and out.ranks is None and out.top_logprobs is None


def test_greedy_does_not_modify_caller_logits():
    logits = LOGITS.unsqueeze(0).clone()
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=1.0)
    Sampler()(logits, make_batch([params], prompts=[[1]], outputs=[[5]], blocked=[[2]]))
    assert torch.equal(logits, LOGITS.unsqueeze(0))


def test_repetition_penalty_hf_rule():
    # Token 1 (3.0, seen in the prompt) -> 3.0 / 2 = 1.5; token 5 (2.5, seen in the output) -> 1.25;
    # token 2 (2.0, unseen) now wins. A negative seen logit gets multiplied: token 4 -1.0 -> -2.0.
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    logits = LOGITS.unsqueeze(0)
    out = Sampler()(logits, make_batch([params], prompts=[[1]], outputs=[[5]]))
    assert out.token_ids == [2]

    # With only token 4 seen and other tokens negative, multiplying pushes it further down.
    neg = torch.tensor([[-1.0, -1.5, -3.0]])
    out = Sampler()(neg, make_batch([SamplingParams(temperature=0.0, repetition_penalty=2.0)], prompts=[[0]]))
    assert out.token_ids == [1]  # -1.0 * 2 = -2.0 < -1.5


def test_presence_and_frequency_penalties():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    # presence 0.5 on token 0 (generated once): 3.0 - 0.5 = 2.5 still wins.
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0, presence_penalty=0.5)], outputs=[[0]]))
    assert out.token_ids == [0]
    # frequency 0.6 with token 0 generated twice: 3.0 - 1.2 = 1.8 < 2.0.
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0, frequency_penalty=0.6)], outputs=[[0, 0]]))
    assert out.token_ids == [1]
    # presence 0.5 + frequency 0.3 once: 3.0 - 0.8 = 2.2 > 2.0; twice: 3.0 - 0.5 - 0.6 = 1.9 < 2.0.
    both = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3)
    out = Sampler()(logits.repeat(2, 1), make_batch([both, both], outputs=[[0], [0, 0]]))
    assert out.token_ids == [0, 1]
    # Prompt tokens do not count for presence/frequency.
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0, presence_penalty=2.0)], prompts=[[0]]))
    assert out.token_ids == [0]


def test_penalties_apply_only_to_their_rows():
    logits = torch.tensor([[3.0, 2.0, 1.0]]).repeat(3, 1)
    greedy = SamplingParams(temperature=0.0)
    params = [greedy, SamplingParams(temperature=0.0, frequency_penalty=2.0), greedy]
    out = Sampler()(logits, make_batch(params, outputs=[[0], [0], [0]]))
    assert out.token_ids == [0, 1, 0]


def test_blocked_tokens_never_sampled():
    params = SamplingParams(temperature=1.0)
    tokens = draw_many(LOGITS, params, 2000, blocked=[1, 5])
    assert not torch.isin(tokens, torch.tensor([1, 5])).any()
    out = Sampler()(LOGITS.unsqueeze(0), make_batch([SamplingParams(temperature=0.0)], blocked=[[1]]))
    assert out.token_ids == [5]


def test_top_k_1_and_tiny_top_p_equal_greedy():
    torch.manual_seed(1)
    logits = torch.randn(16, 100)
    greedy = logits.argmax(-1).tolist()
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(top_k=5, top_p=1e-6)):
        out = Sampler(seed=3)(logits, make_batch([params] * 16))
        assert out.token_ids == greedy


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-40),  # below the greedy threshold: logits / t would overflow
    SamplingParams(top_p=1e-46),  # 0 in float32: the top token still survives
    SamplingParams(repetition_penalty=1e-40),  # seen logits / 1e-40 overflow to inf
    SamplingParams(repetition_penalty=1e30),
], ids=["temperature", "top_p", "tiny_penalty", "huge_penalty"])
def test_extreme_values_sample_a_real_token_never_a_blocked_one(params):
    """Values at float32's edges once made NaN probabilities, and NaN's argmax is token 0 even when blocked."""
    logits = LOGITS.unsqueeze(0).expand(64, -1).contiguous()
    out = Sampler(seed=0)(logits, make_batch([params] * 64, prompts=[[1, 2]] * 64, blocked=[[0]] * 64))
    assert 0 not in out.token_ids
    if params.top_p < 1 or params.greedy:
        assert set(out.token_ids) == {1}


def test_top_k_keeps_only_k_best():
    tokens = draw_many(LOGITS, SamplingParams(top_k=3, temperature=2.0), 3000)
    assert set(tokens.tolist()) == {1, 5, 2}


def test_top_p_keeps_smallest_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05: top_p=0.75 and 0.78 need tokens 0 and 1 (0.8 >= top_p).
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    for top_p, expected in ((0.75, {0, 1}), (0.78, {0, 1}), (0.81, {0, 1, 2})):
        tokens = draw_many(logits, SamplingParams(top_p=top_p), 3000)
        assert set(tokens.tolist()) == expected


def test_min_p_removes_low_probability_tokens():
    # probs 0.5, 0.3, 0.15, 0.05; min_p 0.2 -> threshold 0.1 drops token 3 only.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    tokens = draw_many(logits, SamplingParams(min_p=0.2), 5000)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_mixed_filters_per_row():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(4, 1)
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_p=0.6)]
    seen = [set() for _ in params]
    sampler = Sampler(seed=0)
    for _ in range(300):
        for row, token in enumerate(sampler(logits, make_batch(params)).token_ids):
            seen[row].add(token)
    assert seen == [{0}, {0, 1, 2, 3}, {0}, {0, 1}]


def test_seeded_rows_independent_of_batch_and_order():
    torch.manual_seed(2)
    logits = torch.randn(5, 64)
    params = [
        SamplingParams(temperature=1.0, top_k=k, top_p=p)
        for k, p in zip([0, 10, 0, 20, 0], [1.0, 1.0, 0.9, 0.95, 1.0])
    ]

    def run(rows, steps=10):
        gens = {r: gen(100 + r) for r in rows}
        sampler = Sampler()
        result = {r: [] for r in rows}
        for _ in range(steps):
            out = sampler(logits[rows], make_batch([params[r] for r in rows], [gens[r] for r in rows]))
            for r, t in zip(rows, out.token_ids):
                result[r].append(t)
        return result

    full = run([0, 1, 2, 3, 4])
    for rows in ([3], [4, 2, 0], [1, 3]):
        part = run(rows)
        for r in rows:
            assert part[r] == full[r]

    # Seeded rows stay the same when mixed with unseeded and greedy rows.
    g = gen(100 + 2)
    mixed_params = [SamplingParams(temperature=0.0), params[2], SamplingParams(temperature=1.0)]
    mixed_logits = torch.stack([logits[0], logits[2], logits[4]])
    sampler = Sampler()
    got = [sampler(mixed_logits, make_batch(mixed_params, [None, g, None])).token_ids[1] for _ in range(10)]
    assert got == full[2]


def test_sampler_seed_reproducible():
    logits = torch.randn(8, 32, generator=gen(5))
    params = [SamplingParams()] * 8
    a = [Sampler(seed=7)(logits, make_batch(params)).token_ids for _ in range(3)]
    b = [Sampler(seed=7)(logits, make_batch(params)).token_ids for _ in range(3)]
    assert a == b


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)
    params = [SamplingParams()]
    g1, g2 = gen(1), gen(2)
    a = [Sampler()(logits, make_batch(params, [g1])).token_ids[0] for _ in range(50)]
    b = [Sampler()(logits, make_batch(params, [g2])).token_ids[0] for _ in range(50)]
    assert sum(x != y for x, y in zip(a, b)) > 40
    assert len(set(a)) > 40  # successive draws from one generator vary too


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_matches_softmax(temperature):
    draws = 40_000
    tokens = draw_many(LOGITS, SamplingParams(temperature=temperature), draws, seed=11)
    freq = torch.bincount(tokens, minlength=len(LOGITS)).double() / draws
    expected = (LOGITS.double() / temperature).softmax(-1)
    assert (freq - expected).abs().max() < 0.01
    chi2 = (draws * (freq - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0  # df=5: p < 1e-4 above this


def test_temperature_sharpens():
    def top_freq(t):
        return (draw_many(LOGITS, SamplingParams(temperature=t), 5000) == 1).double().mean().item()

    assert top_freq(0.3) > top_freq(1.0) > top_freq(3.0)


def test_logprobs_from_raw_logits():
    torch.manual_seed(4)
    logits = torch.randn(4, 30)
    params = [
        SamplingParams(temperature=0.7, top_k=5, logprobs=3, repetition_penalty=1.5),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, logprobs=5, presence_penalty=2.0),
    ]
    batch = make_batch(params, prompts=[[1, 2], [], [], []], outputs=[[3], [], [], [int(logits[3].argmax())]])
    out = Sampler(seed=0)(logits, batch)
    raw = torch.log_softmax(logits, -1)
    for row, token in enumerate(out.token_ids):
        assert out.logprobs[row] == pytest.approx(raw[row, token].item(), abs=1e-5)
        assert out.ranks[row] == int((raw[row] > raw[row, token]).sum()) + 1
    assert out.ranks[1] == 1  # greedy without penalties picks the best token
    assert out.ranks[3] > 1  # the presence penalty moved greedy off the raw best

    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []
    for row, n in ((0, 3), (3, 5)):
        top = out.top_logprobs[row]
        values, ids = raw[row].topk(n)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-6)
        assert all(top[i][1] >= top[i + 1][1] for i in range(n - 1))


def test_logprobs_with_half_precision_logits():
    logits = torch.randn(2, 40, generator=gen(9)).to(torch.bfloat16)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0, logprobs=2)] * 2))
    raw = torch.log_softmax(logits.float(), -1)
    for row, token in enumerate(out.token_ids):
        assert out.logprobs[row] == pytest.approx(raw[row, token].item(), abs=1e-5)
        assert math.isfinite(out.logprobs[row])


def test_no_logprobs_when_nobody_asks():
    params = [SamplingParams(), SamplingParams(temperature=0.0, top_k=2), SamplingParams(min_p=0.1)]
    out = Sampler(seed=0)(torch.randn(3, 10), make_batch(params))
    assert out.logprobs is None and out.ranks is None and out.top_logprobs is None
    assert len(out.token_ids) == 3


def test_the_grammar_bitmask_kernel_matches_torch(monkeypatch):
    """Structured outputs mask logits by llguidance's bitmask: tokenmill's kernel and the torch fallback agree."""
    from tokenmill.executor import sampler as sampler_module

    torch.manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word is partial
    logits = torch.randn(5, vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32)
    bitmask[1] = -1  # every token allowed
    rows = torch.tensor([4, 0, 2])
    kernel = logits.clone()
    sampler_module._mask_by_bitmask(kernel, rows, bitmask)
    monkeypatch.setattr(sampler_module, "lowbit", lambda: None)
    fallback = logits.clone()
    sampler_module._mask_by_bitmask(fallback, rows, bitmask)
    assert torch.equal(kernel, fallback)
    bit = lambda i, t: (int(bitmask[i, t // 32]) >> (t % 32)) & 1  # noqa: E731
    for i, row in enumerate(rows.tolist()):
        assert [torch.isneginf(kernel[row, t]).item() for t in range(vocab)] == [not bit(i, t) for t in range(vocab)]
    assert torch.equal(kernel[[1, 3]], logits[[1, 3]])  # rows without a grammar are untouched


def test_logit_bias_is_added_to_its_rows_before_sampling_and_logprobs_stay_raw():
    logits = torch.randn(3, 20, generator=gen(5))
    worst = int(logits[0].argmin())
    best = int(logits[2].argmax())
    params = [SamplingParams(temperature=0, logit_bias={worst: 100.0}, logprobs=1),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0, logit_bias={best: -100.0, 3: 0.5})]
    out = Sampler(seed=0)(logits, make_batch(params))
    assert out.token_ids[0] == worst
    assert out.token_ids[1] == int(logits[1].argmax())  # a row without a bias is untouched
    assert out.token_ids[2] != best
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[0] == pytest.approx(raw[0, worst].item(), abs=1e-6)  # raw, as for grammar masks
    assert out.ranks[0] == 20
    processed = Sampler().processed(logits, make_batch(params))
    expected = logits.clone()
    expected[0, worst] += 100
    expected[2, best] -= 100
    expected[2, 3] += 0.5
    assert torch.equal(processed, expected)

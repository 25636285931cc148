"""Low-bit weights (int8, int4) and KV caches (int8, fp8): kernels against dequantize-then-matmul,
GGUF Q4_0/Q4_1/Q8_0 mapped onto them, and quality against float32 as llama.cpp measures it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from tokenmill import LLM, SamplingParams
from tokenmill.config import WeightQuant
from tokenmill.engine.engine import LLMEngine
from tokenmill.entrypoints import cli
from tokenmill.errors import InvalidParameterError
from tokenmill.executor.kernels import lowbit
from tokenmill.executor.layers.kv_cache import KVCache
from tokenmill.executor.layers.linear import Int4Linear, Int8Linear, Linear, make_linear
from tokenmill.executor.layers.quant import COMPUTE_DTYPE, quantize_int4
from tokenmill.loader.gguf import int4_groups, load_gguf

from test_gguf import tiny_model, write_gguf
from test_kernels import assert_close_to
from test_model_reference import run_chunks

REPO = Path(__file__).resolve().parent.parent
BATCHES = [1, 3, 17, 64]


def bf16(t: torch.Tensor) -> torch.Tensor:
    """What the kernels compute with: the value rounded to bfloat16, as float64."""
    return t.to(COMPUTE_DTYPE).double()


def assert_kernel_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Kernel output (bfloat16, fp32 accumulation) against a float64 reference: bf16 rounding only."""
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.double() - ref).abs()
    assert (err <= 2 ** -8 * ref.abs() + 1e-3 * ref.abs().max()).all(), err.max().item()


def load_in_shards(layer, w: torch.Tensor, bias: torch.Tensor | None = None, cut: int = 48):
    """Load as a fused projection would: two shards of output rows."""
    layer.load("weight", w[:cut])
    layer.load("weight", w[cut:], cut)
    if bias is not None:
        layer.load("bias", bias)
    return layer


# ---- linear layers --------------------------------------------------------------------------


@pytest.fixture(params=["kernels", "pytorch"])
def form(request, monkeypatch):
    """Each layer test runs on tokenmill's packed kernels (where built) and on PyTorch's kernels."""
    import tokenmill.executor.layers.linear as linear

    if request.param == "kernels" and lowbit() is None:
        pytest.skip("tokenmill's kernels could not be built here")
    if request.param == "pytorch":
        monkeypatch.setattr(linear, "kernels_fit", lambda in_features: False)
    return request.param


@pytest.mark.parametrize("batch", BATCHES)
def test_int8_linear_matches_dequantized_matmul(batch, form):
    torch.manual_seed(0)
    w, b, x = torch.randn(160, 256), torch.randn(160), torch.randn(batch, 256)
    layer = load_in_shards(Int8Linear(256, 160, bias=True), w, b)
    if form == "kernels":  # Q8_0-like blocks of 32 with float16 scales
        assert layer.kernel_weight.bits == 8 and layer.kernel_weight.scales.dtype == torch.float16
        dequantized = layer.kernel_weight.dequantize()
        assert_close_to(layer(x) - b, x, dequantized)
        step = layer.kernel_weight.scales.float().permute(0, 2, 1).reshape(160, 8).repeat_interleave(32, dim=1)
    else:
        assert layer.weight.dtype == torch.int8 and layer.scale.dtype == COMPUTE_DTYPE and layer.scale.shape == (160,)
        reference = bf16(x) @ (layer.weight.double() * layer.scale.double()[:, None]).t()
        assert_kernel_close(layer(x) - b, reference)
        dequantized, step = layer.weight.float() * layer.scale.float()[:, None], layer.scale.float()[:, None]
    # The codes are w's own int8 grid: never more than half a step away.
    assert ((dequantized - w).abs() <= 0.51 * step + 1e-2 * w.abs()).all()


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("batch", BATCHES)
def test_int4_linear_matches_dequantized_matmul(group, batch, form):
    torch.manual_seed(group)
    w, x = torch.randn(160, 256), torch.randn(batch, 256)
    layer = load_in_shards(Int4Linear(256, 160, group=group), w)
    groups = quantize_int4(w, group)
    if form == "kernels":  # groups of 32; a larger group repeats its scale and zero
        torch.testing.assert_close(layer.kernel_weight.dequantize(), groups.dequantize(), rtol=0, atol=1e-6)
        assert_close_to(layer(x), x, layer.kernel_weight.dequantize())
    else:
        assert layer.scale_zero.shape == (256 // group, 160, 2) and layer.scale_zero.dtype == COMPUTE_DTYPE
        codes = groups.q.view(160, -1, group).double() - 8
        dequantized = (codes * bf16(groups.d)[..., None] + bf16(groups.m + 8 * groups.d)[..., None]).view(160, 256)
        assert_kernel_close(layer(x), bf16(x) @ dequantized.t())
    assert (groups.dequantize() - w).abs().max() <= 0.51 * groups.d.max()


def test_make_linear_picks_the_form_the_kernels_take():
    int4 = WeightQuant("int4", 128)
    assert isinstance(make_linear(576, 1536, quant=int4), Int4Linear)
    assert make_linear(576, 1536, quant=int4).group == 64  # 128 does not divide 576: the largest group that does
    assert make_linear(1536, 576, quant=int4).group == 128
    assert isinstance(make_linear(64, 172, quant=int4), Linear)  # 172 output rows: not in blocks of 16
    assert isinstance(make_linear(64, 172, quant=WeightQuant("int8")), Int8Linear)
    assert isinstance(make_linear(172, 64, quant=WeightQuant("int8")), Linear)  # 172 inputs: not in blocks of 32
    assert isinstance(make_linear(64, 172), Linear)


# ---- GGUF blocks ----------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_gguf_q4_blocks_map_exactly_onto_int4_groups(qtype, form):
    w = np.random.default_rng(0).normal(0, 0.5, (96, 128)).astype(np.float32)
    raw = quantize(w, qtype)
    groups = int4_groups(raw, qtype)
    assert groups.group == 32 and groups.q.max() <= 15
    assert torch.equal(groups.dequantize(), torch.from_numpy(dequantize(raw, qtype)))  # no re-quantization
    layer = Int4Linear(128, 96, group=32)
    layer.load("weight", groups)
    x = torch.randn(5, 128)
    if form == "kernels":  # the file's own float16 d and m
        assert torch.equal(layer.kernel_weight.dequantize(), torch.from_numpy(dequantize(raw, qtype)))
        assert_close_to(layer(x), x, layer.kernel_weight.dequantize())
        return
    codes = groups.q.view(96, -1, 32).double() - 8
    expected = (codes * bf16(groups.d)[..., None] + bf16(groups.m + 8 * groups.d)[..., None]).view(96, 128)
    assert_kernel_close(layer(x), bf16(x) @ expected.t())


def test_gguf_q8_0_blocks(form):
    """With tokenmill's kernels a Q8_0 tensor keeps its own blocks; PyTorch's int8 kernel has no per-32
    scales, so there it is dequantized and requantized with one scale per output row."""
    w = np.random.default_rng(1).normal(0, 0.5, (64, 128)).astype(np.float32)
    q8 = torch.from_numpy(dequantize(quantize(w, Q.Q8_0), Q.Q8_0))
    layer = Int8Linear(128, 64)
    layer.load("weight", q8)
    if form == "kernels":
        assert torch.equal(layer.kernel_weight.dequantize(), q8)
        return
    step = layer.scale.float()[:, None]
    assert ((layer.weight.float() * step - q8).abs() <= 0.51 * step + 1e-2 * q8.abs()).all()


@pytest.fixture(scope="module")
def tiny_q4_gguf(tmp_path_factory):
    config, state = tiny_model("llama", vocab=128)
    return write_gguf(tmp_path_factory.mktemp("q4") / "tiny-q4_1.gguf", "llama", config, state, Q.Q4_1, permute=True)


def test_tiny_q4_1_gguf_packed_is_exact(tiny_q4_gguf, monkeypatch, form):
    """Every projection of a llama.cpp-permuted Q4_1 file loads packed, with the very weights of the
    dequantized file: computed in float32 (PyTorch's slow path) the logits are the same, and with
    tokenmill's kernels (two int8 terms per activation block) within 5e-3 of logits up to 6.7 (measured
    0.0032; one int8 term, llama.cpp's Q8 activations, is 0.49 off on this random model)."""
    import tokenmill.executor.layers.quant as quant
    import tokenmill.executor.models.llama as llama

    monkeypatch.setattr(llama, "LM_HEAD_QUANT", None)  # keep the output projection float: compare the Q4_1 layers
    monkeypatch.setattr(quant, "COMPUTE_DTYPE", torch.float32)
    assert set(load_gguf(tiny_q4_gguf).native_forms.values()) == {"int4"}
    packed = LLMEngine(str(tiny_q4_gguf), dtype="float32", kv_cache_memory="2MiB")  # auto: int4
    dense = LLMEngine(str(tiny_q4_gguf), dtype="float32", kv_cache_memory="2MiB", quantization="none")
    assert packed.memory_report.weights == "int4 g32" and dense.memory_report.weights == "float32"
    assert isinstance(packed.runner.model.layers[0].self_attn.qkv_proj, Int4Linear)
    prompt = list(range(3, 40))
    logits = [run_logits(engine, prompt) for engine in (packed, dense)]
    assert (logits[0] - logits[1]).abs().max() <= (5e-3 if form == "kernels" else 1e-4)


# Q4_K_M-like files. llama.cpp's Q4_K_M mixes Q4_K with Q6_K, and falls back to Q5_0 / Q8_0 for rows that
# are not whole 256-blocks (SmolLM2's 576-wide ones). EXACT_TYPES: every projection's form holds its
# tensors exactly; REQUANTIZED adds what int8 blocks hold only to within half a step: Q6_K, and a Q4_K
# shard fused with a Q6_K one (as Q4_K_M's attn_q / attn_v of large models).
EXACT_TYPES = {
    "model.layers.0.self_attn.q_proj.weight": Q.Q4_K, "model.layers.0.self_attn.k_proj.weight": Q.Q4_K,
    "model.layers.0.self_attn.v_proj.weight": Q.Q4_K, "model.layers.0.self_attn.o_proj.weight": Q.Q5_0,
    "model.layers.0.mlp.gate_proj.weight": Q.Q4_K, "model.layers.0.mlp.up_proj.weight": Q.Q4_K,
    "model.layers.0.mlp.down_proj.weight": Q.Q8_0,
    "model.layers.1.self_attn.q_proj.weight": Q.Q5_0, "model.layers.1.self_attn.k_proj.weight": Q.Q5_0,
    "model.layers.1.self_attn.v_proj.weight": Q.Q8_0, "model.layers.1.self_attn.o_proj.weight": Q.Q4_K,
    "model.layers.1.mlp.gate_proj.weight": Q.Q5_0, "model.layers.1.mlp.up_proj.weight": Q.Q5_0,
    "model.layers.1.mlp.down_proj.weight": Q.Q4_K,
    "model.embed_tokens.weight": Q.Q8_0, "lm_head.weight": Q.Q8_0,
}
REQUANTIZED = {"model.layers.0.mlp.up_proj.weight": Q.Q6_K, "model.layers.1.mlp.down_proj.weight": Q.Q6_K}


def mixed_gguf(path: Path, types: dict) -> Path:
    config, state = tiny_model("llama", vocab=128, hidden_size=256, intermediate_size=256)
    return write_gguf(path, "llama", config, state, permute=True, types=types)


def projections(llm: LLM) -> list:
    return [m for layer in llm.engine.runner.model.layers for m in (
        layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]


def test_mixed_gguf_runs_each_projection_in_its_own_form(tmp_path):
    """By default each projection keeps its file's form, exactly: int4 where every shard is Q4_K,
    int8 blocks where they are Q5_0 / Q8_0. The greedy tokens are the dequantized float model's and
    the logits differ only by the kernels' activation rounding (measured: KL 1e-5)."""
    path = mixed_gguf(tmp_path / "exact.gguf", EXACT_TYPES)
    ckpt = load_gguf(path)
    assert ckpt.native_forms["model.layers.0.mlp.gate_proj.weight"] == "int4"
    assert ckpt.native_forms["model.layers.1.mlp.up_proj.weight"] == "int8"
    native, dense = (LLM(str(path), kv_cache_memory="2MiB", quantization=q) for q in ("auto", "none"))
    assert native.engine.memory_report.weights == "int4 + int8 as the file stores them"
    assert [type(m).__name__ for m in projections(native)] == [
        "Int4Linear", "Int8Linear", "Int4Linear", "Int8Linear", "Int8Linear", "Int4Linear", "Int8Linear", "Int4Linear"]
    for got, expected in zip(projections(native), projections(dense)):
        if got.kernel_weight is not None:
            assert torch.equal(got.kernel_weight.dequantize(), expected.weight.t())
    prompt = list(range(5, 40))
    got, expected = (run_logits(llm.engine, prompt).log_softmax(-1) for llm in (native, dense))
    assert (expected.exp() * (expected - got)).sum(-1).max() <= 1e-4
    params = SamplingParams(max_tokens=16, temperature=0)
    outputs = [llm.generate([prompt], params)[0].outputs[0].token_ids for llm in (native, dense)]
    assert outputs[0] == outputs[1]


def test_q6_k_and_mixed_shards_requantize_to_8_bit_blocks(tmp_path):
    """A fused projection with a Q6_K shard, and a Q6_K one, run as int8 blocks of 32 within half a step
    of the file's values (benchmarks/quant_quality.py measures what that costs on a real Q4_K_M)."""
    path = mixed_gguf(tmp_path / "q6_k.gguf", EXACT_TYPES | REQUANTIZED)
    native, dense = (LLM(str(path), kv_cache_memory="2MiB", quantization=q) for q in ("auto", "none"))
    requantized = [2, 7]  # layer 0's gate/up (Q4_K + Q6_K) and layer 1's down (Q6_K)
    forms = [type(m).__name__ for m in projections(native)]
    assert [forms[i] for i in requantized] == ["Int8Linear", "Int8Linear"]
    for i in requantized:
        packed, expected = projections(native)[i].kernel_weight, projections(dense)[i].weight.t()
        if packed is None:
            continue
        step = packed.scales.float().view(-1, packed.in_features // 32, 8).permute(0, 2, 1).reshape(-1, packed.in_features // 32)
        step = step[: packed.out_features].repeat_interleave(32, dim=1)
        # Half a step, plus the float16 rounding of the scale (as llama.cpp's Q8_0): 127 x 2^-11 of a step,
        # or 127 x half float16's smallest step where the scale is subnormal.
        assert ((packed.dequantize() - expected).abs() <= (0.5 + 127 * 2 ** -11) * step + 127 * 2 ** -25).all()


def run_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    from tokenmill.sequence import Sequence

    seq = Sequence("r", 0, prompt, SamplingParams(), 0.0)
    try:
        (logits,) = run_chunks(engine, seq, [(0, len(prompt))])
    finally:
        engine.kv_cache.free(seq.seq_id)
    return logits


# ---- the default model (SmolLM2-135M, Q4_1 layers, Q8_0 embedding) -------------------------


@pytest.fixture(scope="module")
def smollm_checkpoint(default_model_available):
    from tokenmill.loader import load_checkpoint

    return load_checkpoint(None)


def test_default_model_runs_packed_int4(smollm_checkpoint, monkeypatch):
    """Q4_1 loaded packed: logits near the dequantized float32 model's, and the same greedy tokens."""
    import tokenmill.executor.models.llama as llama

    monkeypatch.setattr(llama, "LM_HEAD_QUANT", None)  # the tied output projection is Q8_0, not under test here
    assert set(smollm_checkpoint.native_forms.values()) == {"int4"}
    packed = LLM(smollm_checkpoint, dtype="float32", kv_cache_memory="64MiB")
    dense = LLM(smollm_checkpoint, dtype="float32", kv_cache_memory="64MiB", quantization="none")
    assert packed.engine.memory_report.weights == "int4 g32"
    prompt = packed.get_tokenizer().encode("The lighthouse keeper climbed the stairs, lit the lamp and")
    got, expected = (run_logits(llm.engine, prompt).log_softmax(-1) for llm in (packed, dense))
    # Only the kernels' bfloat16 activations differ (measured: logits within 0.75 of 27, KL <= 0.001).
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    assert (expected.exp() * (expected - got)).sum(-1).max() <= 0.003
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
               "The best way to learn a language is", "Water boils at"]
    same = 0
    for got, expected in zip(packed.generate(prompts, params, use_tqdm=False),
                             dense.generate(prompts, params, use_tqdm=False)):
        same += assert_greedy_equal_up_to_a_tie(got.outputs[0], expected.outputs[0])
    assert same >= 3


def assert_greedy_equal_up_to_a_tie(got, expected, margin: float = 0.1) -> bool:
    """True if the greedy tokens are equal. Otherwise they may part only where the reference's two best
    tokens were within `margin` nats (a tie bfloat16 rounding can break either way), the packed model
    taking the other one; after that the continuations differ, as they should."""
    tokens, reference = got.token_ids, expected.token_ids
    if tokens == reference:
        return True
    i = next(k for k, (a, b) in enumerate(zip(tokens, reference)) if a != b)
    (first, lp1), (second, lp2) = sorted(expected.logprobs[i].items(), key=lambda kv: -kv[1].logprob)[:2]
    assert (first, second) == (reference[i], tokens[i]) and lp1.logprob - lp2.logprob < margin, (i, tokens, reference)
    return False


# Bounds from the measurement in benchmarks/quant_quality.py (mean KL in nats, top-1 agreement), with margin.
QUALITY_BOUNDS = {
    "auto (the file's own forms)": (0.008, 0.92),
    "int8": (0.015, 0.90),
    "int4 g32": (0.008, 0.92),
    "int4 g128": (0.6, 0.55),
    "KV int8": (0.003, 0.95),
    "KV fp8_e4m3": (0.012, 0.92),
}


@pytest.mark.slow
def test_quality_against_float32(smollm_checkpoint):
    from tokenmill.bench.quality import CONFIGS, run_quality

    text = (REPO / "benchmarks" / "data" / "quality_text.txt").read_text()
    result = run_quality(text, smollm_checkpoint)
    assert result["positions"] >= 2000
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"float32 (reference)", *CONFIGS} and set(QUALITY_BOUNDS) == set(CONFIGS)
    for name, (kl_max, top1_min) in QUALITY_BOUNDS.items():
        assert rows[name]["kl_mean"] <= kl_max, (name, rows[name])
        assert rows[name]["top1_agreement"] >= top1_min, (name, rows[name])
    reference = rows["float32 (reference)"]
    assert rows["auto (the file's own forms)"]["kl_mean"] == rows["int4 g32"]["kl_mean"]  # Q4_1: int4 g32 exactly
    assert rows["int4 g32"]["weight_bytes"] < rows["int8"]["weight_bytes"] < reference["weight_bytes"] / 2
    # 64 one-byte codes and a 4-byte scale per head vector instead of 64 float32 values.
    assert rows["KV int8"]["kv_bytes_per_token"] == reference["kv_bytes_per_token"] * (64 + 4) // 256


# ---- KV cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_dtype, tolerance", [(torch.int8, 0.5 / 127), (torch.float8_e4m3fn, 2 ** -4)])
def test_kv_cache_round_trip(cache_dtype, tolerance):
    cache = KVCache(64, 2, 32, torch.float32, cache_dtype, torch.device("cpu"))
    assert cache.scale.shape == (64, 2, 2)
    assert torch.equal(cache.read(torch.arange(16)), torch.zeros(16, 2, 2, 32))  # the null block
    kv = torch.randn(5, 2, 2, 32) * torch.tensor([0.01, 1.0, 100.0, 3.0, 0.5])[:, None, None, None]
    slots = torch.tensor([20, 17, 63, 40, 33])
    cache.write(slots, kv)
    amax = kv.abs().amax(-1, keepdim=True)
    err = (cache.read(slots) - kv).abs()
    bound = tolerance * amax if cache_dtype == torch.int8 else tolerance * kv.abs() + amax / 448 * 2 ** -9
    assert (err <= bound * 1.001).all()


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
def test_quantized_kv_cache_is_chunking_invariant(tiny_models, kv_cache_dtype):
    """A first prefill chunk also attends to its K/V as read back from the cache, so logits do not
    depend on how the prompt was split into chunks."""
    from tokenmill.sequence import Sequence

    engine = LLMEngine(str(tiny_models["llama"]), dtype="float32", kv_cache_memory="2MiB", kv_cache_dtype=kv_cache_dtype)
    prompt = list(range(3, 43))
    results = []
    for spans in ([(0, 40)], [(0, 17), (17, 23)]):
        seq = Sequence("r", 0, prompt, SamplingParams(), 0.0)
        try:
            results.append(torch.cat(run_chunks(engine, seq, spans)))
        finally:
            engine.kv_cache.free(seq.seq_id)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


def test_kv_blocks_sized_by_real_bytes(tiny_models, caplog):
    path = str(tiny_models["llama"])
    with caplog.at_level(logging.INFO, logger="tokenmill"):
        fp32 = LLMEngine(path, dtype="float32", kv_cache_memory="1MiB")
        int8 = LLMEngine(path, dtype="float32", kv_cache_memory="1MiB", kv_cache_dtype="int8")
    # tiny llama: 2 layers x 2 KV heads x head_dim 16; int8 keeps a 4-byte scale per head vector.
    assert fp32.memory_report.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert int8.memory_report.kv_bytes_per_token == 2 * 2 * 2 * (16 + 4)
    assert int8.block_pool.num_usable_blocks == pytest.approx(fp32.block_pool.num_usable_blocks * 64 / 20, abs=1)
    assert int8.runner.kv_caches[0].data.dtype == torch.int8
    assert "KV cache 1.0 MiB committed (1047040 bytes: int8, 0.16 KiB/token x 6544 tokens)" in caplog.text


# ---- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, param", [({"quantization": "int3"}, "quantization"),
                                           ({"quantization": "int4", "quantization_group_size": 48},
                                            "quantization_group_size"),
                                           ({"kv_cache_dtype": "fp4"}, "kv_cache_dtype")])
def test_bad_quantization_parameters(tiny_models, kwargs, param):
    with pytest.raises(InvalidParameterError) as e:
        LLMEngine(str(tiny_models["llama"]), kv_cache_memory="1MiB", **kwargs)
    assert e.value.param == param


def test_cli_quantization_flags(stories_path, capsys):
    args = cli.build_parser().parse_args(["generate", "hi", "--quantization", "int4", "--quantization-group-size",
                                          "64", "--kv-cache-dtype", "fp8_e4m3"])
    assert cli.engine_kwargs(args) == {"quantization": "int4", "quantization_group_size": 64,
                                       "kv_cache_dtype": "fp8_e4m3"}
    assert cli.main(["generate", "Once upon a time", "--model", str(stories_path), "--temperature", "0",
                     "--max-tokens", "8", "--kv-cache-memory", "4MiB", "--quantization", "int8",
                     "--kv-cache-dtype", "int8"]) == 0
    assert capsys.readouterr().out.strip()

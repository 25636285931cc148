"""tokenmill's C++ CPU kernels (executor/kernels): the packed low-bit matmuls against
dequantize-then-matmul, every CPU path against the others bit for bit, batch invariance, the
decoder-layer operators against PyTorch, the fused decode step against the op-by-op one, and
the fallback paths (kernels off, AVX2, portable) through the generation tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from tokenmill import LLM, SamplingParams
from tokenmill.executor.kernels import lowbit
from tokenmill.executor.kernels.packed import pack_q4, pack_q8
from tokenmill.executor.layers.quant import quantize_q8_blocks
from tokenmill.loader.gguf import int4_groups, int8_blocks

from test_gguf import random_blocks

REPO = Path(__file__).resolve().parent.parent
OPS = lowbit()
pytestmark = pytest.mark.skipif(OPS is None, reason="tokenmill's kernels could not be built here (see the log line)")
SHAPES = [(13, 32), (50, 96), (96, 576), (200, 1536)]  # (out, in): ragged row groups, 1 to 48 blocks
BATCHES = [1, 2, 5, 17, 64]
PATHS = ["scalar", "avx2", "avx512vnni"]


def available_paths() -> list[str]:
    best = OPS.set_isa("best")
    return PATHS[: PATHS.index(best) + 1]


@pytest.fixture
def each_path():
    """Yields a function running fn once per path this CPU has, returning the outputs by path."""
    def run(fn):
        out = {}
        try:
            for path in available_paths():
                OPS.set_isa(path)
                out[path] = fn()
        finally:
            OPS.set_isa("best")
        return out
    return run


def random_q4(out_features, in_features, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.uint8)
    d = (torch.rand(out_features, in_features // 32, generator=g) * 0.05).half().float()
    m = (-torch.rand(out_features, in_features // 32, generator=g) * 0.4).half().float()
    return q, d, m


def weight_q4(q, d, m):
    rows, cols = q.shape
    return (q.view(rows, -1, 32).float() * d[..., None] + m[..., None]).view(rows, cols)


def assert_close_to(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """The kernels' stated accuracy: activations are quantized to two int8 terms a block (about
    15 bits), so each output is within 1e-4 of sum |x| |w| of the float64 product."""
    ref = x.double() @ w.double().t()
    bound = 1e-4 * (x.double().abs() @ w.double().abs().t()) + 1e-6
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), (err / bound).max().item()


@pytest.mark.parametrize("shape", SHAPES)
def test_q4_kernel_equals_dequantized_matmul_on_every_path(shape, each_path):
    q, d, m = random_q4(*shape)
    packed = pack_q4(q, d, m)
    assert packed.scales.dtype == torch.float16  # float16 scales hold these exactly
    w = weight_q4(q, d, m)
    assert torch.equal(packed.dequantize(), w)
    for batch in BATCHES:
        x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(batch))
        outs = each_path(lambda: packed.matmul(x))
        for y in outs.values():
            assert y.shape == (batch, shape[0])
            assert torch.equal(y, outs["scalar"])  # every path, the same bits
        assert_close_to(outs["scalar"], x, w)


@pytest.mark.parametrize("shape", SHAPES)
def test_q8_kernel_equals_dequantized_matmul_on_every_path(shape, each_path):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-128, 128, (shape[0], shape[1]), generator=g, dtype=torch.int8)  # -128 too
    d = torch.rand(shape[0], shape[1] // 32, generator=g) * 0.01  # float32 scales: kept as they are
    packed = pack_q8(q, d)
    assert packed.scales.dtype == torch.float32
    w = (q.view(shape[0], -1, 32).float() * d[..., None]).view(shape)
    assert torch.equal(packed.dequantize(), w)
    for batch in BATCHES:
        x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(batch)) * 3
        outs = each_path(lambda: packed.matmul(x))
        for y in outs.values():
            assert torch.equal(y, outs["scalar"])
        assert_close_to(outs["scalar"], x, w)


def test_per_channel_int8_scales_are_repeated_per_block():
    q = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    scale = torch.rand(24)
    packed = pack_q8(q, scale)
    assert torch.equal(packed.dequantize(), q.float() * scale[:, None])


@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_gets_the_same_bits_whatever_the_batch(bits):
    """Batch invariance: each row alone, and among 99 others (decode-sized and prefill-sized calls take
    different loops), and at any position."""
    q, d, m = random_q4(40, 576)
    blocks = quantize_q8_blocks(weight_q4(q, d, m))
    packed = pack_q4(q, d, m) if bits == 4 else pack_q8(blocks.q, blocks.d)
    x = torch.randn(100, 576)
    together = packed.matmul(x)
    alone = torch.cat([packed.matmul(x[i:i + 1]) for i in range(100)])
    shuffled = packed.matmul(x.flip(0)).flip(0)
    assert torch.equal(together, alone) and torch.equal(together, shuffled)


def test_activation_terms_trade_accuracy_for_speed():
    """One int8 term a block is llama.cpp's Q8 activation; two (the default) are far closer to float."""
    q, d, m = random_q4(64, 576)
    packed, w = pack_q4(q, d, m), weight_q4(q, d, m)
    x = torch.randn(8, 576)
    ref = x.double() @ w.double().t()
    errs = {}
    try:
        for terms in (1, 2):
            OPS.set_activation_terms(terms)
            errs[terms] = (packed.matmul(x).double() - ref).abs().max().item()
    finally:
        OPS.set_activation_terms(2)
    assert errs[2] < errs[1] / 50


def test_bad_shapes_are_refused():
    q, d, m = random_q4(16, 64)
    packed = pack_q4(q, d, m)
    with pytest.raises(RuntimeError, match="do not match"):
        OPS.q4_mm(torch.randn(2, 96), packed.codes, packed.scales, 16)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        OPS.q4_mm(torch.randn(2, 40), packed.codes, packed.scales, 16)
    with pytest.raises(RuntimeError, match="float32"):
        OPS.q4_mm(torch.randn(2, 64).double(), packed.codes, packed.scales, 16)


# ---- GGUF blocks, exactly ------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q8_0], ids=lambda q: q.name)
def test_gguf_blocks_pack_exactly(qtype):
    """Each block type the packed layers hold as stored: the loader's form and the packed weight
    dequantize to the gguf package's own dequantization, bit for bit, and the kernel multiplies by it.
    Q4_K's scales (d x 6-bit scale) need float32; the others keep the file's float16."""
    raw = random_blocks(40, 512, qtype)
    expected = torch.from_numpy(dequantize(raw, qtype))
    if qtype in (Q.Q5_0, Q.Q8_0):
        blocks = int8_blocks(raw, qtype)
        assert torch.equal(blocks.dequantize(), expected)
        packed = pack_q8(blocks.q, blocks.d)
    else:
        groups = int4_groups(raw, qtype)
        assert groups.group == 32 and torch.equal(groups.dequantize(), expected)
        packed = pack_q4(groups.q, groups.d, groups.m)
    assert packed.scales.dtype == (torch.float32 if qtype == Q.Q4_K else torch.float16)
    assert torch.equal(packed.dequantize(), expected)
    x = torch.randn(3, 512)
    assert_close_to(packed.matmul(x), x, expected)


def test_gguf_q8_0_blocks_come_back_exactly():
    """A Q8_0 tensor, dequantized and quantized again in blocks, is its own codes and scales."""
    rng = np.random.default_rng(1)
    raw = quantize(rng.standard_normal((24, 256)).astype(np.float32), Q.Q8_0)
    w = torch.from_numpy(dequantize(raw, Q.Q8_0))
    blocks = quantize_q8_blocks(w)
    packed = pack_q8(blocks.q, blocks.d)
    assert packed.scales.dtype == torch.float16
    assert torch.equal(packed.dequantize(), w)


def test_default_model_layers_are_held_packed_and_exact(default_model_available):
    """The embedded Q4_1 file: every layer projection packed with the file's own float16 d and m."""
    from gguf import GGUFReader

    from tokenmill.loader.checkpoint import default_model_path

    llm = LLM(kv_cache_memory="64MiB")
    model = llm.engine.runner.model
    reader = GGUFReader(str(default_model_path()))
    raw = {t.name: t for t in reader.tensors}
    down = model.layers[3].mlp.down_proj.kernel_weight
    t = raw["blk.3.ffn_down.weight"]
    assert down.bits == 4 and down.scales.dtype == torch.float16
    assert torch.equal(down.dequantize(), torch.from_numpy(dequantize(t.data, t.tensor_type)).view(576, 1536))
    head = model.lm_head.kernel_weight  # the tied Q8_0 embedding, kept as its own blocks
    t = raw["token_embd.weight"]
    assert head.bits == 8 and torch.equal(head.dequantize(), torch.from_numpy(dequantize(t.data, t.tensor_type)))


# ---- the decoder-layer operators ------------------------------------------------------------------


def test_rms_norm_rope_silu_match_pytorch():
    x, w = torch.randn(7, 576), torch.randn(576)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(OPS.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-5)
    gu = torch.randn(5, 2 * 96) * 4
    torch.testing.assert_close(OPS.silu_mul(gu), F.silu(gu[:, :96]) * gu[:, 96:], rtol=1e-5, atol=1e-6)
    qk = torch.randn(6, 3 * 64 + 1)[:, :192].view(6, 3, 64)  # strided rows, as inside qkv
    cos, sin = torch.randn(6, 64), torch.randn(6, 64)
    rotated = torch.cat([-qk[..., 32:], qk[..., :32]], dim=-1)
    ref = qk * cos[:, None] + rotated * sin[:, None]
    OPS.rope_(qk, cos, sin)
    torch.testing.assert_close(qk, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize(("group", "hd"), [(3, 64), (5, 40)])  # 5: heads in runs of 4 and 1; 40: a partial lane chunk
def test_row_attention_reads_the_paged_cache_like_sdpa(window, group, hd):
    torch.manual_seed(0)
    block, kv_heads = 16, 2
    cache = torch.randn(64 * block, 2, kv_heads, hd)
    # scattered blocks; rows 0 and 1 begin with the same 4 blocks (one cached prefix): attended together
    tables = [[5, 9, 2, 40, 7], [5, 9, 2, 40, 8, 12], [11, 3], [30]]
    lens = [70, 90, 17, 1]
    width = max(map(len, tables))
    t = torch.tensor([tb + [0] * (width - len(tb)) for tb in tables])
    q = torch.randn(len(lens), kv_heads * group, hd)
    out = OPS.row_attention(q, cache, t, torch.tensor(lens), block, window, hd ** -0.5)
    for r, (table, n) in enumerate(zip(tables, lens)):
        pos = torch.arange(n)
        slots = torch.tensor(table)[pos // block] * block + pos % block
        k, v = cache[slots, 0], cache[slots, 1]  # [n, kvh, hd]
        mask = pos > n - 1 - window if window else torch.ones(n, dtype=torch.bool)
        ref = F.scaled_dot_product_attention(
            q[r].view(kv_heads, group, hd), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=hd ** -0.5)
        torch.testing.assert_close(out[r], ref.reshape(-1), rtol=1e-5, atol=1e-5)
        # alone, a row's heads are split over threads by KV head: the same bits as among others
        alone = OPS.row_attention(q[r:r + 1], cache, t[r:r + 1], torch.tensor(lens[r:r + 1]), block, window, hd ** -0.5)
        assert torch.equal(alone[0], out[r])


def test_fused_step_equals_the_op_by_op_step(default_model_available):
    """The same step (two decodes and a prefill chunk) through step_layers and through the Python
    layer loop: the same bits."""
    llm = LLM(kv_cache_memory="64MiB")
    runner = llm.engine.runner
    model = runner.model
    prompt = list(range(100, 140))
    llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)  # a cached context to decode after
    table = list(range(1, 5))
    # two decodes of one context and a 20-token chunk after it (the cache is rewritten alike)
    spans = [([7], 40, table), ([8], 41, table), (list(range(300, 320)), 42, table + [5, 6])]
    hidden = {}
    for fused in (True, False):
        if not fused:
            model._fused_key, model._fused = id(runner.kv_caches), None  # forces the op-by-op loop
        hidden[fused] = runner.forward(spans)
    model._fused_key = None
    assert torch.equal(hidden[True], hidden[False])


# ---- fallbacks ------------------------------------------------------------------------------------


@pytest.mark.slow  # a pytest run of other test files per path
@pytest.mark.parametrize("env", [{"TOKENMILL_KERNELS": "off"}, {"TOKENMILL_KERNEL_ISA": "avx2"},
                                 {"TOKENMILL_KERNEL_ISA": "scalar"}], ids=["kernels-off", "avx2", "portable"])
def test_generation_tests_pass_on_the_fallback_paths(env):
    if env.get("TOKENMILL_KERNEL_ISA") and env["TOKENMILL_KERNEL_ISA"] not in available_paths():
        pytest.skip(f"this CPU has no {env['TOKENMILL_KERNEL_ISA']} path")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_generation.py")],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]

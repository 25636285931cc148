"""Architecture name (config.json "architectures") -> model class. Adding one is one line here."""

from __future__ import annotations

from tokenmill.errors import ModelLoadError
from tokenmill.executor.models.llama import LlamaForCausalLM

MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def model_class(architecture: str):
    if architecture not in MODELS:
        raise ModelLoadError(f"unsupported architecture {architecture!r}; supported: {sorted(MODELS)}")
    return MODELS[architecture]

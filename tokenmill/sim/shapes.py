"""Model shapes for the simulator: a local checkpoint's config, or a preset for models that are not here.

A roofline cost model and the KV pool's size need only the shape (layers, heads, widths,
vocabulary), so planning for an 8B model on a chip that is not here needs no download.
"""

from __future__ import annotations

from tokenmill.config import ModelConfig

# Published configs (config.json) of Llama models, the fields ModelConfig reads.
PRESETS = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072),
    "llama-3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072),
}


def model_shape(model: str | None) -> tuple[str, ModelConfig]:
    """(name, shape) of a preset name, a local checkpoint, or (None) the default model."""
    if model in PRESETS:
        from transformers import LlamaConfig

        return model, ModelConfig.from_hf(LlamaConfig(**PRESETS[model], rms_norm_eps=1e-5, tie_word_embeddings=False))
    from tokenmill.loader import load_checkpoint

    ckpt = load_checkpoint(model)
    return ckpt.name, ModelConfig.from_hf(ckpt.hf_config)

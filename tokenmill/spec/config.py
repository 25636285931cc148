"""What speculative decoding to do: `LLM(speculative_config={...})`, `--speculative-config JSON` (vLLM's keys)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from tokenmill.errors import InvalidParameterError

METHODS = ("ngram", "draft")


@dataclass
class SpeculativeConfig:
    """method "ngram": prompt lookup, no second model; "draft": a smaller model with the same vocabulary."""

    method: str = "ngram"
    num_speculative_tokens: int = 4  # the most drafts per step; the controller may propose fewer, or none
    prompt_lookup_max: int = 4  # ngram: the longest suffix of the context looked up
    prompt_lookup_min: int = 1  # ngram: the shortest
    model: str | None = None  # draft: a Hugging Face folder, .gguf file or hub id (None: the default model)
    # draft: the checkpoint's layers to keep, in order: N (the first N) or a list of indices (e.g. the
    # first and last few: a self-speculative draft that skips the middle of the target)
    draft_layers: int | list[int] | None = None
    draft_dtype: str | None = None  # draft: its own dtype (None: the target's), e.g. bfloat16 under a float32 target
    draft_quantization: str | None = None  # draft: its own weights (None: the target's setting), e.g. int4
    adaptive: bool = True  # choose k per request from its acceptance and the measured step costs

    def __post_init__(self):
        if self.method not in METHODS:
            raise InvalidParameterError("speculative_config.method", f"must be one of {', '.join(METHODS)}, "
                                                                     f"got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"speculative_config.{name}", f"must be an integer >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise InvalidParameterError("speculative_config.prompt_lookup_min",
                                        f"{self.prompt_lookup_min} is above prompt_lookup_max {self.prompt_lookup_max}")
        layers = self.draft_layers
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = list(range(layers))
        if layers is not None and (not isinstance(layers, list) or not layers
                                   or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
                                   or len(set(layers)) < len(layers)):
            raise InvalidParameterError("speculative_config.draft_layers", "must be a number of layers >= 1 or a list "
                                        f"of distinct layer indices, got {self.draft_layers!r}")
        self.draft_layers = layers

    @classmethod
    def of(cls, value: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        """From a config, a dict, or a JSON object string (the CLI flag); None stays None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidParameterError("speculative_config", f"not a JSON object: {e}") from None
        if not isinstance(value, dict):
            raise InvalidParameterError("speculative_config", f"must be an object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidParameterError("speculative_config", f"unknown keys {unknown}; known: {sorted(known)}")
        return cls(**value)

"""SamplingParams: what a request asks of the sampler and the stop logic, validated on creation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

from tokenmill.errors import InvalidParameterError, require_unicode

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
GREEDY_TEMPERATURE = 1e-5  # below this, sampling is greedy (as in vLLM): logits / t would overflow float32
# Every step checks each stop string and blocks each stop token id of every sequence: one request
# with 200k of them slowed every other request ~700x. These caps are far above real use.
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_GRAMMAR_CHOICES = 1024  # 100k choices held the engine thread ~12 s for one 20-token answer
MAX_LOGIT_BIAS = 300  # entries of logit_bias, OpenAI's cap
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGPROBS = 20  # top logprobs per token, generated or prompt
# generation_config.json keys that become defaults of the fields a request leaves out (vLLM's set)
GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}

_INTEGERS = ("n", "top_k", "min_tokens")
_OPTIONAL_INTEGERS = ("max_tokens", "logprobs", "seed", "prompt_logprobs", "truncate_prompt_tokens")
_REALS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_FLAGS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


@dataclass
class StructuredOutputsParams:
    """A grammar the output must follow (vLLM's fields): exactly one of a JSON schema, any JSON
    object, a regular expression, a choice of strings, or a Lark / GBNF grammar. `field` is the
    request field it came from, which an error names."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    field: str = "structured_outputs"

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object is True else []
        if len(given) != 1:
            raise InvalidParameterError(self.field, "give exactly one of json, json_object, regex, choice, grammar; "
                                                    f"got {', '.join(given) or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        ok = {"json": isinstance(value, (dict, str)), "json_object": True,
              "regex": isinstance(value, str) and value, "grammar": isinstance(value, str) and value,
              "choice": isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)}[kind]
        if kind == "choice" and ok and len(value) > MAX_GRAMMAR_CHOICES:
            raise InvalidParameterError(self.field, f"at most {MAX_GRAMMAR_CHOICES} choices, got {len(value)}")
        if not ok:
            raise InvalidParameterError(self.field, {
                "json": "json must be a JSON schema (an object, or its text)",
                "regex": "regex must be a non-empty string", "grammar": "grammar must be a non-empty string",
                "choice": "choice must be a non-empty list of non-empty strings"}[kind])
        for text in [value] if isinstance(value, str) else value if kind == "choice" else []:
            require_unicode(self.field, text)

    @property
    def kind(self) -> str:
        return "json_object" if self.json_object is True else next(
            name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None)


@dataclass
class SamplingParams:
    """Per-request generation settings, named and defaulted as in vLLM."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token (0: sampled token only)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # constrains the output to a grammar
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    prompt_logprobs: int | None = None  # number of top logprobs per prompt token (0: the prompt token only)
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise InvalidParameterError(name, f"must be a list, got {type(value).__name__}")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate_types()
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate_types(self) -> None:
        """Each field has its declared type (a bool is not a number here), and reals are finite:
        a float top_k or a NaN penalty must fail now, not inside a shared engine step."""
        for name in _INTEGERS + _OPTIONAL_INTEGERS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_INTEGERS:
                continue
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise InvalidParameterError(name, f"must be an integer, got {value!r}")
        for name in _REALS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise InvalidParameterError(name, f"must be a finite number, got {value!r}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameterError(name, f"must be true or false, got {getattr(self, name)!r}")

    def _validate(self) -> None:
        def bad(param: str, message: str) -> None:
            raise InvalidParameterError(param, message)

        if self.n < 1:
            bad("n", f"must be at least 1, got {self.n}")
        if self.temperature < 0:
            bad("temperature", f"must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad("top_k", f"must be 0 or -1 (disabled) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be positive, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            bad("min_tokens", f"must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                bad(name, f"must be in [0, {MAX_LOGPROBS}], got {value}")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            bad("truncate_prompt_tokens", f"must be at least 1, got {self.truncate_prompt_tokens}")
        self._validate_logit_bias()
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "stop strings must be non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            bad("stop", f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_STRING_CHARS} characters each, "
                        f"got {len(self.stop)} (longest {max(map(len, self.stop))})")
        for s in self.stop:
            require_unicode("stop", s)
        if any(isinstance(t, bool) or not isinstance(t, Integral) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be non-negative integers, got {self.stop_token_ids[:8]}")
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))  # order kept, repeats dropped
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} distinct ids, got {len(self.stop_token_ids)}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs", f"must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}")
        if self.seed is not None:
            low, high = SEED_RANGE
            if not low <= self.seed <= high - (self.n - 1):
                bad("seed", f"must be an integer in [{low}, {high - (self.n - 1)}] (sample i of n uses seed + i), "
                            f"got {self.seed!r}")

    def _validate_logit_bias(self) -> None:
        """Token ids (non-negative integers; the engine checks them against its vocabulary) to finite
        biases in [-100, 100], at most MAX_LOGIT_BIAS of them: every step adds each one."""
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise InvalidParameterError("logit_bias", f"must be a map of token id to bias, got {type(bias).__name__}")
        if len(bias) > MAX_LOGIT_BIAS:
            raise InvalidParameterError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        low, high = LOGIT_BIAS_RANGE
        for token, value in bias.items():
            if isinstance(token, bool) or not isinstance(token, Integral) or token < 0:
                raise InvalidParameterError("logit_bias",
                                            f"keys must be token ids (non-negative integers), got {token!r}")
            if isinstance(value, bool) or not isinstance(value, Real) or not low <= value <= high:
                raise InvalidParameterError("logit_bias", f"the bias of token {token} must be a number in "
                                                          f"[{low:g}, {high:g}], got {value!r}")
        self.logit_bias = {int(t): float(v) for t, v in bias.items()} or None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def generation_defaults(generation_config: dict) -> dict:
    """The SamplingParams fields a checkpoint's generation_config.json sets (as vLLM's
    `--generation-config auto` reads it): they replace tokenmill's defaults where a request is silent."""
    return {field: generation_config[key] for key, field in GENERATION_CONFIG_FIELDS.items()
            if generation_config.get(key) is not None}

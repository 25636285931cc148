"""Text <-> tokens: the checkpoint's Hugging Face tokenizer, its chat template, and streaming decode."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from jinja2 import TemplateSyntaxError

from tokenmill.errors import InvalidParameterError

JINJA_CHARS = "{}\n"  # a chat template given holding none of these is a file's path (as vLLM takes it)


class Tokenizer:
    """Wraps a transformers fast tokenizer; chat templates render through its jinja2 renderer."""

    def __init__(self, hf_tokenizer, chat_template: str | None, eos_token_ids: list[int]):
        self.hf = hf_tokenizer
        self.chat_template = chat_template
        self.eos_token_ids = eos_token_ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: its vocabulary string's length (a byte-level
        token's string has one character per byte, and every character is at least a byte)."""
        return max(1, max(map(len, self.hf.get_vocab()), default=1))

    @property
    def vocab_size(self) -> int:
        """Token ids 0 to vocab_size - 1 decode (the model's embedding may have more rows, as padding)."""
        return len(self.hf)

    def token_strs(self, ids: list[int]) -> list[str]:
        """Each token's vocabulary string (byte-level pieces as stored, e.g. "Ġworld")."""
        return self.hf.convert_ids_to_tokens(ids)

    @functools.cached_property
    def special_tokens_pattern(self) -> re.Pattern | None:
        """Matches the text of any special token (which encoding turns into that token), or None."""
        specials = sorted({t.content for t in self.hf.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, specials))) if specials else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> str:
        """The conversation as the model reads it; `tools` (OpenAI's function definitions) and
        `template_kwargs` (e.g. enable_thinking) are handed to the template."""
        if not self.chat_template:
            raise InvalidParameterError("messages", "this model has no chat template; use generate() with plain prompts")
        return self.hf.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt,
            tools=tools, **(template_kwargs or {}))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes any BOS itself, so the rendered text is encoded without adding specials.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def custom_chat_template(hf_tokenizer, value: str) -> str:
    """The template `value` gives (a file's path, or the jinja text itself, as vLLM takes it), checked
    at start-up: one that does not parse would otherwise fail every chat request."""
    template = value
    if not any(c in value for c in JINJA_CHARS):
        try:
            template = Path(value).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidParameterError("chat_template", f"{value!r} is not a jinja template, nor a readable "
                                                         f"file: {e}") from None
    if hf_tokenizer is None:
        raise InvalidParameterError("chat_template", "this model has no tokenizer to render a chat template with")
    try:  # transformers' own environment compiles it (its filters, extensions and globals)
        hf_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template, tokenize=False)
    except TemplateSyntaxError as e:
        raise InvalidParameterError("chat_template", f"the template does not parse: {e.message} "
                                                     f"(line {e.lineno})") from None
    except Exception:  # noqa: BLE001  (it parses; what it does with real messages shows per request)
        pass
    return template


class IncrementalDetokenizer:
    """Turns tokens into text one at a time without splitting multi-byte characters.

    Decodes a short window (a few tokens of context plus the new ones) and emits only the
    text past the context, holding back output that still ends in an incomplete character
    (U+FFFD). The context keeps word-initial spaces right for SentencePiece-style tokenizers.
    """

    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.prefix_offset > 4 * self.CONTEXT:  # keep the window short
            drop = self.prefix_offset - self.CONTEXT
            self.ids = self.ids[drop:]
            self.prefix_offset -= drop
            self.read_offset -= drop
        return full[len(prefix):]

"""Reasoning models' thinking, split from their answer (`--reasoning-parser`).

A reasoning model writes its thinking between <think> and </think>, then the answer. The server
returns the thinking as `reasoning_content` beside `content`, as vLLM does.
- deepseek_r1: the chat template opens <think> in the prompt, so the answer begins inside the
  thinking, which runs to </think> (all of it if the answer ends first).
- qwen3: thinking only when the answer opens with <think> (Qwen3 skips it when asked to with
  `chat_template_kwargs: {"enable_thinking": false}`).
"""

from __future__ import annotations

from typing import ClassVar

from tokenmill.entrypoints.openai.tool_parsers import partial_marker

OPEN, CLOSE = "<think>", "</think>"


class ReasoningParser:
    name: ClassVar[str]
    starts_in_thinking: ClassVar[bool]

    def split(self, text: str, final: bool) -> tuple[str, str, int]:
        """(thinking, answer, how much of the text has been placed): the text past that point may
        still turn out to be a marker, and waits for more."""
        body = text.lstrip()
        if body.startswith(OPEN):
            body = body[len(OPEN):]
        elif not self.starts_in_thinking:
            if not final and OPEN.startswith(body):
                return "", "", 0  # "<thi" may open the thinking: wait
            return "", text, len(text)
        elif not final and OPEN.startswith(body):
            return "", "", 0
        closed = body.find(CLOSE)
        if closed >= 0:
            return body[:closed], body[closed + len(CLOSE):].lstrip("\n"), len(text)
        held = 0 if final else partial_marker(body, CLOSE)
        return body[:len(body) - held], "", len(text) - held


class DeepSeekR1Parser(ReasoningParser):
    name = "deepseek_r1"
    starts_in_thinking = True


class Qwen3Parser(ReasoningParser):
    name = "qwen3"
    starts_in_thinking = False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (DeepSeekR1Parser, Qwen3Parser)}

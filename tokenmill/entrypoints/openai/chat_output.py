"""One chat choice's answer read as it grows: thinking, content and tool calls.

The engine gives text; the chat endpoint gives `reasoning_content`, `content` and `tool_calls`.
AssistantMessage reads the whole text so far each time (cheap next to a decode step) and hands
out only what is new and settled: text that may still turn out to be a marker (`</thi`,
`<tool_ca`) waits for the next token, and a call goes out whole once it is complete, as one
`delta.tool_calls` entry (clients join the pieces of a call; one piece is a valid stream).
"""

from __future__ import annotations

import json
import uuid

from tokenmill.entrypoints.openai.reasoning import ReasoningParser
from tokenmill.entrypoints.openai.tool_parsers import ToolParser


class AssistantMessage:
    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None):
        self.reasoning = reasoning
        self.tools = tools
        self.sent_reasoning = self.sent_content = 0
        self.call_ids: list[str] = []  # one per call handed out, kept for the final message

    def read(self, text: str, final: bool) -> tuple[str, str, list[dict]]:
        """(thinking, content, calls) as far as they are settled."""
        thinking, answer = "", text
        if self.reasoning is not None:
            thinking, answer, _ = self.reasoning.split(text, final)
        if self.tools is None:
            return thinking, answer, []
        start = self.tools.start(answer)
        if start is None:
            return thinking, answer if final else answer[:self.tools.content_end(answer)], []
        calls, leftover = self.tools.calls(answer[start:], final)
        return thinking, answer[:start] + leftover, calls

    def delta(self, text: str, final: bool) -> dict:
        """What is new since the last delta, as a chat chunk's `delta`."""
        thinking, content, calls = self.read(text, final)
        delta = {}
        if len(thinking) > self.sent_reasoning:
            delta["reasoning_content"] = thinking[self.sent_reasoning:]
        if len(content) > self.sent_content:
            delta["content"] = content[self.sent_content:]
        new_calls = [self._call(i, call) | {"index": i} for i, call in enumerate(calls) if i >= len(self.call_ids)]
        if new_calls:
            delta["tool_calls"] = new_calls
        self.sent_reasoning, self.sent_content = len(thinking), max(self.sent_content, len(content))
        return delta

    def message(self, text: str) -> dict:
        """The whole answer as a chat response's `message`."""
        thinking, content, calls = self.read(text, final=True)
        message = {"role": "assistant", "content": content}
        if self.reasoning is not None:
            message["reasoning_content"] = thinking or None
        if calls:
            message["content"] = content.strip() or None
            message["tool_calls"] = [self._call(i, call) for i, call in enumerate(calls)]
        return message

    @property
    def called(self) -> bool:
        return bool(self.call_ids)

    def _call(self, index: int, call: dict) -> dict:
        if index == len(self.call_ids):
            self.call_ids.append(f"call_{uuid.uuid4().hex[:24]}")
        return {"id": self.call_ids[index], "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}

"""Tool calls in a model's text, for the formats models are trained on, both ways.

Each parser finds its format's calls in generated text (the whole answer, or a stream of it:
`content_end` says how much text is surely not the start of a call) and writes the grammar that
makes a model produce that format with arguments that follow each function's JSON schema
(`tool_choice` "required" or a named function: the call always parses, even from a small model).

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (Hermes,
  Qwen 2.5 / 3). A template that knows no tools gets them in this format (see `tool_prompt`).
- llama3_json: the answer is `{"name": ..., "parameters": {...}}`, calls joined by "; ", after
  an optional `<|python_tag|>` (Llama 3.1 / 3.2's JSON tool calling).
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral's v3 tokenizers; the
  marker is a special token, so these requests keep special tokens in their text).
"""

from __future__ import annotations

import json
from typing import ClassVar

# JSON laid out as the structured-outputs grammars lay it out (tokenmill.grammar): one line
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_DECODER = json.JSONDecoder()


class ToolParser:
    """A format of tool calls. `calls` are dicts {"name", "arguments" (a JSON object)}."""

    name: ClassVar[str]
    arguments_key: ClassVar[str] = "arguments"  # what the format calls the arguments
    keeps_special_tokens: ClassVar[bool] = False  # its marker is a special token

    def start(self, text: str) -> int | None:
        """Where the tool calls begin in the text, or None if they have not begun."""
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        """How much of a partial answer (with no calls begun) is surely content: the rest may
        still turn out to open a call."""
        raise NotImplementedError

    def calls(self, section: str, final: bool) -> tuple[list[dict], str]:
        """The calls the text from `start` on holds, and what of it is not a call (text that does
        not parse: it is returned as content, not lost). Before the end (`final` false) only
        calls that are complete, and no leftover."""
        raise NotImplementedError

    def grammar(self, call_schemas: list[dict], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect) for one call, or several if `parallel`; each call
        is a JSON object matching one of `call_schemas`."""
        raise NotImplementedError

    def call_schema(self, name: str, parameters: dict) -> dict:
        """The JSON schema of one call to the named function in this format."""
        return {"type": "object", "properties": {"name": {"const": name}, self.arguments_key: parameters},
                "required": ["name", self.arguments_key], "additionalProperties": False}

    def _call(self, obj) -> dict | None:
        """{"name", "arguments"} from one parsed call object, or None if it is not a call."""
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        arguments = obj.get(self.arguments_key, obj.get("arguments", obj.get("parameters", {})))
        return {"name": obj["name"], "arguments": arguments} if isinstance(arguments, dict) else None


def _json_rule(call_schemas: list[dict]) -> str:
    schema = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
    return "%json " + json.dumps(schema | {"x-guidance": _JSON_LAYOUT})


def partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (it may be a marker arriving)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class _MarkedParser(ToolParser):
    """A format whose calls open with a marker, wherever it comes in the answer."""

    MARKER: ClassVar[str]

    def start(self, text: str) -> int | None:
        found = text.find(self.MARKER)
        return None if found < 0 else found

    def content_end(self, text: str) -> int:
        return len(text) - partial_marker(text, self.MARKER)


class HermesParser(_MarkedParser):
    name = "hermes"
    MARKER = OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    def calls(self, section: str, final: bool) -> tuple[list[dict], str]:
        calls, leftover, at = [], [], 0
        while (opened := section.find(self.OPEN, at)) >= 0:
            leftover.append(section[at:opened])
            closed = section.find(self.CLOSE, opened)
            if closed < 0 and not final:
                break
            end = len(section) if closed < 0 else closed + len(self.CLOSE)
            body = section[opened + len(self.OPEN): closed if closed >= 0 else len(section)]
            call = _parse_object(body, self._call)
            if call is None:
                leftover.append(section[opened:end])
            else:
                calls.append(call)
            at = end
        if final:
            leftover.append(section[at:])
        return calls, "".join(leftover).strip() if final else ""

    def grammar(self, call_schemas: list[dict], parallel: bool) -> str:
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        return f'{start}\ncall: "{self.OPEN}\\n" body "\\n{self.CLOSE}"\nbody: {_json_rule(call_schemas)}\n'


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    arguments_key = "parameters"
    TAG = "<|python_tag|>"

    def start(self, text: str) -> int | None:
        body = text.lstrip()
        return len(text) - len(body) if body.startswith((self.TAG, "{")) else None

    def content_end(self, text: str) -> int:
        body = text.lstrip()
        return 0 if not body or self.TAG.startswith(body) else len(text)  # calls open the answer or never

    def calls(self, section: str, final: bool) -> tuple[list[dict], str]:
        if not final:
            return [], ""  # the calls end with the answer
        text = section.strip().removeprefix(self.TAG)
        calls, at = [], 0
        while at < len(text):
            try:
                obj, at = _DECODER.raw_decode(text, at)
            except json.JSONDecodeError:
                return [], section.strip()
            call = self._call(obj)
            if call is None:
                return [], section.strip()
            calls.append(call)
            while at < len(text) and text[at] in " \n\t;":
                at += 1
        return calls, ""

    def grammar(self, call_schemas: list[dict], parallel: bool) -> str:
        start = 'start: body ("; " body)*' if parallel else "start: body"
        return f"{start}\nbody: {_json_rule(call_schemas)}\n"


class MistralParser(_MarkedParser):
    name = "mistral"
    keeps_special_tokens = True
    MARKER = "[TOOL_CALLS]"

    def calls(self, section: str, final: bool) -> tuple[list[dict], str]:
        if not final:
            return [], ""
        body = section[len(self.MARKER):].strip()
        try:
            parsed, _ = _DECODER.raw_decode(body)
        except json.JSONDecodeError:
            return [], section.strip()
        calls = [self._call(obj) for obj in (parsed if isinstance(parsed, list) else [parsed])]
        return ([], section.strip()) if not calls or None in calls else (calls, "")

    def grammar(self, call_schemas: list[dict], parallel: bool) -> str:
        schema = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
        array = {"type": "array", "items": schema, "minItems": 1} | ({} if parallel else {"maxItems": 1})
        return f'start: "{self.MARKER}" calls\ncalls: %json {json.dumps(array | {"x-guidance": _JSON_LAYOUT})}\n'


def _parse_object(text: str, to_call) -> dict | None:
    try:
        return to_call(json.loads(text))
    except json.JSONDecodeError:
        return None


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def template_renders_tools(template: str | None) -> bool:
    """Whether a chat template writes the `tools` it is given (else tool_prompt writes them)."""
    return bool(template) and "tools" in template


def parser_for(template: str | None, name: str | None = None) -> ToolParser:
    """The parser `--tool-call-parser` names, else the one the chat template's format implies
    (hermes for a template that knows no tools: tool_prompt teaches the model that format)."""
    if name is not None:
        return TOOL_PARSERS[name]()
    template = template or ""
    if not template_renders_tools(template) or "<tool_call>" in template:
        return HermesParser()
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3JsonParser()
    return HermesParser()


def tool_prompt(tools: list[dict]) -> str:
    """For a template that knows no tools: the tools and the hermes call format, as Qwen 2.5's
    template words them, to open the system message."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                template_kwargs: dict | None = None) -> str:
    """The conversation rendered by the tokenizer's template, with its tools: in the template's own
    format when it knows tools, else written into the messages in the hermes format."""
    if not template_renders_tools(tokenizer.chat_template):
        messages, tools = as_plain_messages(messages, tools), None
    return tokenizer.render_chat(messages, add_generation_prompt, tools, template_kwargs)


def as_plain_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation for a template that knows no tools, in the hermes format: the tools in the
    system message, each assistant call as a <tool_call> block, each tool result as a user turn
    in <tool_response> tags."""
    out = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            blocks = [f"<tool_call>\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>"
                      for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [content, *blocks]))})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tool_prompt(tools)}"}
        else:
            out.insert(0, {"role": "system", "content": tool_prompt(tools)})
    return out

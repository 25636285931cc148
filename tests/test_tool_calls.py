"""Tool calls and reasoning, read from text: each parser reads its format, streamed reading adds up
to the whole message, and a forced call sampled hot from a random model always parses and follows
its function's schema. (The server's round trips are in test_server.py.)"""

from __future__ import annotations

import json

import jsonschema
import pytest

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.entrypoints.openai.chat_output import AssistantMessage
from tokenmill.entrypoints.openai.reasoning import DeepSeekR1Parser, Qwen3Parser
from tokenmill.entrypoints.openai.tool_parsers import (HermesParser, Llama3JsonParser, MistralParser, as_plain_messages,
                                                       parser_for, render_chat)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["zone"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
CALLS = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"zone": 1}}]

# The same two calls after some content, in each format
TEXTS = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>'),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                    '{"name": "get_time", "parameters": {"zone": 1}}'),
    "mistral": ('Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "get_time", "arguments": {"zone": 1}}]'),
}
PARSERS = {"hermes": HermesParser(), "llama3_json": Llama3JsonParser(), "mistral": MistralParser()}


def streamed(message: AssistantMessage, text: str) -> dict:
    """The deltas of `text` arriving a character at a time, joined as a client joins them."""
    joined = {"reasoning_content": "", "content": "", "tool_calls": []}
    for end in range(1, len(text) + 1):
        delta = message.delta(text[:end], final=end == len(text))
        joined["reasoning_content"] += delta.get("reasoning_content", "")
        joined["content"] += delta.get("content", "")
        joined["tool_calls"] += delta.get("tool_calls", [])
    return joined


def as_calls(tool_calls: list[dict]) -> list[dict]:
    return [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])} for c in tool_calls]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_each_parser_reads_its_format_whole_and_streamed(name):
    parser, text = PARSERS[name], TEXTS[name]
    message = AssistantMessage(None, parser).message(text)
    assert as_calls(message["tool_calls"]) == CALLS
    expected_content = None if name == "llama3_json" else "Let me check."
    assert message["content"] == expected_content
    joined = streamed(AssistantMessage(None, parser), text)
    assert as_calls(joined["tool_calls"]) == CALLS
    assert [c["index"] for c in joined["tool_calls"]] == [0, 1]
    assert joined["content"].strip() == (expected_content or "")


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_text_that_is_not_a_call_stays_content(name):
    parser = PARSERS[name]
    for text in ["Just an answer, no tools.", "Use <tool_call> tags? No.", '{"name": 5}', "[TOOL_CALLS] nothing"]:
        message = AssistantMessage(None, parser).message(text)
        assert "tool_calls" not in message and message["content"].strip() == text.strip(), (text, message)
        joined = streamed(AssistantMessage(None, parser), text)
        assert joined["tool_calls"] == [] and joined["content"].strip() == text.strip()


def test_hermes_streams_a_call_as_soon_as_it_closes():
    message = AssistantMessage(None, HermesParser())
    first_closed = TEXTS["hermes"].index("</tool_call>") + len("</tool_call>")
    delta = {}
    for end in range(1, first_closed + 1):
        delta = message.delta(TEXTS["hermes"][:end], final=False)
    assert as_calls(delta["tool_calls"]) == CALLS[:1]


@pytest.mark.parametrize("parser, text, thinking, answer", [
    (DeepSeekR1Parser(), "Two and two.</think>\n\nIt is 4.", "Two and two.", "It is 4."),
    (DeepSeekR1Parser(), "<think>Hmm.</think>Yes.", "Hmm.", "Yes."),
    (DeepSeekR1Parser(), "Still thinking when cut", "Still thinking when cut", ""),
    (Qwen3Parser(), "<think>\nWhy not.\n</think>\n\nBecause.", "\nWhy not.\n", "Because."),
    (Qwen3Parser(), "No thinking here.", "", "No thinking here."),
])
def test_reasoning_is_split_whole_and_streamed(parser, text, thinking, answer):
    message = AssistantMessage(parser, None).message(text)
    assert (message["reasoning_content"] or "", message["content"]) == (thinking, answer)
    joined = streamed(AssistantMessage(parser, None), text)
    assert (joined["reasoning_content"], joined["content"]) == (thinking, answer)


def test_reasoning_then_a_call():
    text = '<think>The user wants weather.</think>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    message = AssistantMessage(Qwen3Parser(), HermesParser()).message(text)
    assert message["reasoning_content"] == "The user wants weather."
    assert as_calls(message["tool_calls"]) == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]


def test_the_parser_follows_the_template():
    assert isinstance(parser_for("{{ tools }} <tool_call>"), HermesParser)
    assert isinstance(parser_for("{% if tools %}[TOOL_CALLS]{% endif %}"), MistralParser)
    assert isinstance(parser_for("{% if tools %}<|python_tag|>{% endif %}"), Llama3JsonParser)
    assert isinstance(parser_for("{{ messages }}"), HermesParser)  # knows no tools: they are written in hermes
    assert isinstance(parser_for("{{ messages }}", "mistral"), MistralParser)


def test_a_template_without_tools_gets_them_in_the_system_message():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]
    plain = as_plain_messages(messages, tools)
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0]["content"].startswith("Be brief.") and '"get_weather"' in plain[0]["content"]
    (call,) = AssistantMessage(None, HermesParser()).message(plain[2]["content"])["tool_calls"]
    assert as_calls([call]) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert plain[3]["content"] == "<tool_response>\n18 C\n</tool_response>"


@pytest.fixture(scope="module")
def random_model(tiny_chat_model) -> LLM:
    return LLM(str(tiny_chat_model), dtype="float32", kv_cache_memory="32MiB", seed=0)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_forced_calls_sampled_hot_always_parse_and_follow_the_schema(random_model, name):
    """tool_choice "required": 40 samples at temperature 1.5 from a random model, each one call."""
    parser = PARSERS[name]
    grammar = parser.grammar([parser.call_schema(n, s) for n, s in SCHEMAS.items()], parallel=False)
    params = SamplingParams(n=40, temperature=1.5, max_tokens=120, skip_special_tokens=not parser.keeps_special_tokens,
                            structured_outputs=StructuredOutputsParams(grammar=grammar))
    (out,) = random_model.generate("Call a tool:", params, use_tqdm=False)
    names = set()
    for sample in out.outputs:
        assert sample.finish_reason == "stop", sample.text
        message = AssistantMessage(None, parser).message(sample.text)
        (call,) = as_calls(message["tool_calls"])
        jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])
        names.add(call["name"])
    assert names == set(SCHEMAS)  # both functions were chosen: really sampled


def test_parallel_forced_calls_parse(random_model):
    parser = HermesParser()
    grammar = parser.grammar([parser.call_schema("get_time", TIME)], parallel=True)
    params = SamplingParams(n=20, temperature=1.0, max_tokens=120, structured_outputs=StructuredOutputsParams(grammar=grammar))
    (out,) = random_model.generate("Call a tool:", params, use_tqdm=False)
    for sample in out.outputs:
        calls = as_calls(AssistantMessage(None, parser).message(sample.text).get("tool_calls", []))
        assert len(calls) == sample.text.count("</tool_call>"), sample.text  # each complete call parses
        assert calls or sample.finish_reason == "length"
        for call in calls:
            jsonschema.validate(call["arguments"], TIME)


def test_offline_chat_shows_the_tools_to_the_model(random_model):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
    chat = [{"role": "user", "content": "What time is it?"}]
    params = SamplingParams(temperature=0, max_tokens=1)
    (plain,) = random_model.chat(chat, params, use_tqdm=False)
    (with_tools,) = random_model.chat(chat, params, use_tqdm=False, tools=tools)
    assert '"get_time"' in with_tools.prompt and '"get_time"' not in plain.prompt


QWEN_LIKE = ("{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
             "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
             "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
             "</{{ m.role }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def test_a_template_that_knows_tools_renders_them_itself(random_model):
    """The tools and calls reach the template as Hugging Face templates expect: arguments as an object."""
    from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest
    from tokenmill.tokenizer import Tokenizer

    tokenizer = Tokenizer(random_model.engine.tokenizer.hf, QWEN_LIKE, [])
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get_time", "arguments": '{"zone": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "noon"}],
        "tools": [{"type": "function", "function": {"name": "get_time", "parameters": TIME}}]})
    text = render_chat(tokenizer, [m.as_template_input() for m in request.messages], True,
                       [t.model_dump(exclude_none=True) for t in request.tools])
    assert text.startswith('<tools>{"type": "function", "function": {"name": "get_time"')
    assert '<tool_call>{"name": "get_time", "arguments": {"zone": 1}}</tool_call>' in text
    assert "<tool>noon</tool><assistant>" in text

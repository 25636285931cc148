"""The OpenAI request bodies the server accepts, as pydantic models.

Ranges live in the field constraints so that a bad value is a 400 naming the parameter and
the OpenAPI document (which the fuzz test reads) states them. A field tokenmill does not act on
is refused by name (`unhonoured_field`) unless its value asks for nothing (null, false, empty):
a client that asks for something tokenmill cannot do must not get an answer that ignores it. Known fields with the wrong
type are rejected, booleans strictly (`"stream": "yes"` is not true, nor is `true` the number 1).
"""

from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, SkipValidation, StrictBool, ValidationInfo,
                      field_validator, model_validator)

from tokenmill.errors import InvalidParameterError
from tokenmill.sampling_params import (LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS, SEED_RANGE, SamplingParams,
                                       StructuredOutputsParams)

MAX_CHOICES = 128  # choices one request may ask for: n, and prompts x n on /v1/completions
MAX_USER_CHARS = 256  # `user` names a tenant (a metrics label under fair scheduling), not a document
MAX_TOOLS = 128  # OpenAI's limit on tools in one request


def _not_bool(value):
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


Integer = Annotated[int, BeforeValidator(_not_bool)]  # JSON true is not 1 here
Real = Annotated[float, BeforeValidator(_not_bool)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")  # `schema` would shadow BaseModel.schema
    strict: StrictBool | None = None  # the output always follows the schema, strict or not


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(BaseModel):
    """vLLM's `structured_outputs` object: one of these."""

    model_config = ConfigDict(extra="forbid")

    json_: dict | str | None = Field(default=None, alias="json")
    json_object: StrictBool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _Sampling(BaseModel):
    """Fields both endpoints share: the OpenAI ones, then tokenmill's (vLLM's) extensions."""

    # Unknown fields are noted by _note_unhonoured, not kept: with extra="allow" the OpenAPI
    # document would invite arbitrary fields, and the fuzz test would spend its time on them.
    model_config = ConfigDict(extra="ignore")
    _unhonoured: str | None = PrivateAttr(default=None)

    model: str | None = None
    temperature: Annotated[Real, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Real, Field(gt=0, le=1)] = 1.0
    n: Annotated[Integer, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: str | list[str] | None = None
    seed: Annotated[Integer, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    presence_penalty: Annotated[Real, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Real, Field(ge=-2, le=2)] = 0.0
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=MAX_USER_CHARS)] | None = None  # the tenant, for the fair scheduling policy and per-tenant length estimates
    # token id (as a string, JSON keys being strings) -> bias added to its logit
    logit_bias: Annotated[dict[str, Annotated[Real, Field(ge=LOGIT_BIAS_RANGE[0], le=LOGIT_BIAS_RANGE[1])]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    # extensions
    priority: Integer = 0  # lower runs first under the priority and aging policies (vLLM's field)
    top_k: Annotated[Integer, Field(ge=-1)] = 0
    min_p: Annotated[Real, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[Real, Field(gt=0, le=10)] = 1.0
    ignore_eos: StrictBool = False
    min_tokens: Annotated[Integer, Field(ge=0)] = 0
    stop_token_ids: list[Annotated[Integer, Field(ge=0)]] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    truncate_prompt_tokens: Annotated[Integer, Field(ge=1)] | None = None  # keep the prompt's last k tokens
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, stop):
        """One message for every bad shape (pydantic's union error would say "valid string");
        how many and how long: SamplingParams."""
        if stop is None or (isinstance(stop, str) and stop):
            return stop
        if isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
            return stop
        raise ValueError("must be a non-empty string or a list of non-empty strings")

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias):
        """JSON keys are strings: each must be a token id; the ids' range is the engine's to check."""
        if bias is None:
            return None
        try:
            return {int(key): value for key, value in bias.items()}
        except ValueError:
            raise ValueError(f"keys must be token ids (integers as strings), got {list(bias)[:5]}") from None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, defaults: dict,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """`defaults`: the model's generation_config values, for the fields the body leaves out."""
        fields = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                      repetition_penalty=self.repetition_penalty)
        fields |= {name: value for name, value in defaults.items()
                   if name in fields and name not in self.model_fields_set}
        return SamplingParams(
            n=self.n, **fields, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, max_tokens=max_tokens,
            min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, stop=self.stop, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, structured_outputs=self._structured_outputs(),
            logit_bias=self.logit_bias, prompt_logprobs=prompt_logprobs,
            truncate_prompt_tokens=self.truncate_prompt_tokens)

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """The one grammar the body asks for, whichever field it used (two are an error)."""
        asked = {}
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            asked["response_format"] = dict(json_object=True)
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise InvalidParameterError("response_format", "type json_schema needs a json_schema object")
            asked["response_format"] = dict(json=fmt.json_schema.schema_)
        if self.structured_outputs is not None:
            body = self.structured_outputs
            asked["structured_outputs"] = dict(json=body.json_, json_object=body.json_object, regex=body.regex,
                                               choice=body.choice, grammar=body.grammar)
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                asked[name] = {kind: getattr(self, name)}
        if len(asked) > 1:
            raise InvalidParameterError(sorted(asked)[1], f"give one of {', '.join(sorted(asked))}, not several")
        if not asked:
            return None
        (field, kwargs), = asked.items()
        return StructuredOutputsParams(**kwargs, field=field)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @model_validator(mode="wrap")
    @classmethod
    def _note_unhonoured(cls, data, handler):
        model = handler(data)
        if isinstance(data, dict):
            model._unhonoured = next((name for name, value in data.items()
                                      if name not in cls.model_fields and not _asks_nothing(name, value)), None)
        return model

    def unhonoured_field(self) -> str | None:
        """The first field of the body that tokenmill would ignore although it asks for something."""
        return self._unhonoured


def _asks_nothing(name: str, value) -> bool:
    """A value of an unsupported field that asks for nothing: null, false or empty."""
    if isinstance(value, (list, dict, str)):
        return not value
    return value is None or value is False


TokenIds = list[Annotated[Integer, Field(ge=0)]]


class CompletionRequest(_Sampling):
    prompt_field: ClassVar[str] = "prompt"  # the field an error about the prompt names
    # Checked by _prompt_shape alone: pydantic's own check of the union took 2.4 s for a 10 MB
    # list of token ids (it tries every shape and collects an error per element of each).
    prompt: SkipValidation[str | list[str] | TokenIds | list[TokenIds]]
    max_tokens: Annotated[Integer, Field(ge=0)] | None = 16  # 0 only with echo: the prompt's logprobs alone
    logprobs: Annotated[Integer, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False  # the text (and logprobs) start with the prompt's
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt, info: ValidationInfo):
        """Says which of the four shapes was meant and what is wrong with it (pydantic's union
        error would list every shape's complaint, the first "Input should be a valid string").
        With a `max_model_len` in the validation context, token ids that fill the context are
        refused here, so that a huge list is not handed on (or back from the parsing process)."""
        context = (info.context or {}).get("max_model_len")

        def ids_ok(ids) -> bool:
            if context is not None and len(ids) >= context:
                raise ValueError(prompt_too_long(len(ids), context))
            return all(type(t) is int and t >= 0 for t in ids)  # one Python loop: other threads get turns

        shapes = "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        if isinstance(prompt, str) or prompt == []:  # the server names an empty list
            return prompt
        if not isinstance(prompt, list):
            raise ValueError(shapes)
        if all(type(p) is str for p in prompt):
            return prompt
        if all(type(p) is list for p in prompt):
            if all(p and ids_ok(p) for p in prompt):
                return prompt
            raise ValueError("each list of token ids must be non-empty and hold non-negative integers")
        if ids_ok(prompt):  # the valid case takes one pass over a long list of ids
            return prompt
        if all(type(p) in (int, float, bool) for p in prompt):
            raise ValueError(f"token ids must be non-negative integers, got {prompt[:8]}")
        raise ValueError(shapes)

    def output_tokens(self, default: int | None) -> int | None:
        """max_tokens, or when the body leaves it out the model's default, else OpenAI's 16."""
        return default if "max_tokens" not in self.model_fields_set and default is not None else self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (a string, strings, token ids or lists of them)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and type(p[0]) is int:  # token ids (the validator checked every one)
            return [p]
        return list(p)


def prompt_too_long(tokens: int, max_model_len: int) -> str:
    return (f"the prompt has {tokens} tokens; this model's context is {max_model_len} tokens, "
            "which must leave room for an answer")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's form)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            parsed = json.loads(arguments)
        except ValueError as e:
            raise ValueError(f"must be a JSON object as text: {e}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"must be a JSON object as text, got a JSON {type(parsed).__name__}")
        return arguments


class ToolCall(BaseModel):
    """A call an earlier assistant turn made."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this result answers

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, content):
        """Names what is wrong (pydantic's union error would say "Input should be a valid string")."""
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError(f"must be a string or a list of text parts, got {type(content).__name__}")
        if not content:
            raise ValueError("the list of content parts is empty")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"only text parts are supported (this model reads text), got a part of type {kind!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text part needs a string 'text'")
        return content

    @field_validator("tool_calls")
    @classmethod
    def _assistant_only(cls, tool_calls, info: ValidationInfo):
        if tool_calls and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages carry tool calls")
        return tool_calls

    @property
    def text(self) -> str:
        content = self.content
        return "".join(part.text for part in content) if isinstance(content, list) else content or ""

    def as_template_input(self) -> dict:
        """The message as chat templates read it (Hugging Face's convention: a call's arguments
        as an object, not text)."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": json.loads(call.function.arguments)}}
                for call in self.tool_calls]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class FunctionDefinition(BaseModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object; none: no arguments
    strict: StrictBool | None = None  # forced calls always follow the schema, strict or not

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, parameters):
        """Arguments are a JSON object (OpenAI's rule): a schema of anything else could never be met."""
        if parameters and parameters.get("type", "object") != "object":
            raise ValueError(f"must be a JSON schema of an object (type \"object\"), got type {parameters['type']!r}")
        return parameters


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Sampling):
    prompt_field: ClassVar[str] = "messages"
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[Integer, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[Integer, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[Integer, Field(ge=0, le=20)] | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict | None = None  # more variables for the template, e.g. {"enable_thinking": false}
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto if tools, else none
    parallel_tool_calls: StrictBool = True

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools):
        names = [tool.function.name for tool in tools or []]
        if len(set(names)) < len(names):
            raise ValueError(f"two tools share a name: {sorted(n for n in set(names) if names.count(n) > 1)[0]!r}")
        return tools

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved(cls, kwargs):
        """The request's own fields say these; a template variable must not override them."""
        reserved = {"messages", "tools", "add_generation_prompt", "chat_template", "tokenize"} & set(kwargs or {})
        if reserved:
            raise ValueError(f"{sorted(reserved)[0]!r} is set by the request itself, not by chat_template_kwargs")
        return kwargs

    def tool_mode(self) -> tuple[str, str | None]:
        """("none" | "auto" | "required" | "named", the named function): what the answer may hold."""
        choice = self.tool_choice if self.tool_choice is not None else "auto" if self.tools else "none"
        if choice != "none" and not self.tools:
            raise InvalidParameterError("tool_choice", "needs tools to choose from")
        if isinstance(choice, NamedToolChoice):
            name = choice.function.name
            if name not in {tool.function.name for tool in self.tools}:
                raise InvalidParameterError("tool_choice", f"names the function {name!r}, which is not among tools")
            return "named", name
        return choice, None

    def output_tokens(self, default: int | None) -> int | None:
        """max_completion_tokens or max_tokens; when the body gives neither, the model's default, else
        the context."""
        given = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return given if given is not None else default

"""From OpenAI requests to engine requests, and from RequestOutputs to OpenAI responses.

One completion request may carry several prompts, each sampled n times: every prompt is
one engine request, and choice `prompt_index * n + i` is its i-th sample, as in OpenAI's and
vLLM's servers. Streaming sends each choice's new text (and logprobs) as it grows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from jinja2 import TemplateError

from tokenmill.engine.async_engine import AsyncLLMEngine, RequestStream, UnavailableError
from tokenmill.errors import InvalidParameterError, TokenmillError, require_unicode
from tokenmill.entrypoints.openai.chat_output import AssistantMessage
from tokenmill.entrypoints.openai.protocol import (MAX_CHOICES, ChatCompletionRequest, CompletionRequest, _Sampling,
                                                  prompt_too_long)
from tokenmill.entrypoints.openai.reasoning import REASONING_PARSERS, ReasoningParser
from tokenmill.entrypoints.openai.tool_parsers import ToolParser, parser_for, render_chat
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams


class ModelNotFoundError(TokenmillError):
    """The request names a model this server does not serve (the server answers 404)."""


@dataclass
class _Prompt:
    token_ids: list[int]
    text: str | None


# The default cap on one request's work (prompt tokens plus n x new tokens): this many full contexts.
MAX_REQUEST_CONTEXTS = 64


class OpenAIServing:
    """The completions and chat completions endpoints' logic, free of HTTP."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], max_request_tokens: int | None = None,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None):
        """`tool_call_parser`: the format of tool calls (default: the chat template's); `reasoning_parser`:
        how reasoning models mark their thinking (default: none, thinking stays in the content)."""
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        template = self.tokenizer.chat_template if self.tokenizer is not None else None
        self.tool_parser = parser_for(template, tool_call_parser)
        self.reasoning_parser = REASONING_PARSERS[reasoning_parser]() if reasoning_parser else None
        self.max_model_len = engine.engine.max_model_len
        self.max_request_tokens = max_request_tokens or MAX_REQUEST_CONTEXTS * self.max_model_len
        self.served_model_names = served_model_names
        self.speculative = engine.engine.speculative
        self.generation_defaults = engine.engine.generation_defaults  # the model's generation_config values

    def models(self) -> dict:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "tokenmill",
             "max_model_len": self.max_model_len} for name in self.served_model_names]}

    # ---- endpoints ----------------------------------------------------------------------------
    async def completion(self, req: CompletionRequest, tenant: str | None = None) -> dict | AsyncIterator[str]:
        """`tenant`: who sent it when the body has no `user` (the server reads the X-Tenant header)."""
        model = self._model_name(req)
        if len(req.prompts()) * req.n > MAX_CHOICES:  # one request's work is bounded like n alone
            raise InvalidParameterError("prompt", f"{len(req.prompts())} prompts x n={req.n} ask for more than "
                                                  f"{MAX_CHOICES} choices; split them over several requests")
        # tokenizing takes time in proportion to the text: off the event loop, which serves everyone
        prompts = await asyncio.to_thread(lambda: [self._completion_prompt(p) for p in req.prompts()])
        if not prompts:
            raise InvalidParameterError("prompt", "the prompt list is empty")
        prompts = _truncated(prompts, req.truncate_prompt_tokens)
        max_tokens = self._max_tokens(req, prompts)
        if max_tokens == 0 and not req.echo:
            raise InvalidParameterError("max_tokens", "must be at least 1 (0 only with echo, for the prompt's logprobs)")
        # echo with max_tokens 0 (lm-evaluation-harness's loglikelihood): the engine samples one token,
        # which the response leaves out, as in vLLM
        prompt_logprobs = req.logprobs if req.echo else None
        params = self._params(req, prompts, 1 if max_tokens == 0 else max_tokens, req.logprobs, prompt_logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._add(request_id, prompts, params, req.priority, req.user or tenant)
        fmt = _CompletionFormat(self, request_id, model, req.logprobs is not None, req.echo, max_tokens != 0)
        if req.stream:
            return self._stream(streams, fmt, req.n, req.include_usage)
        return await self._collect(streams, fmt, req.n)

    async def chat(self, req: ChatCompletionRequest, tenant: str | None = None) -> dict | AsyncIterator[str]:
        model = self._model_name(req)
        if req.top_logprobs and not req.logprobs:
            raise InvalidParameterError("top_logprobs", "needs logprobs set to true")
        tool_mode, function = req.tool_mode()
        prompts = _truncated([await asyncio.to_thread(self._chat_prompt, req, tool_mode != "none")],
                             req.truncate_prompt_tokens)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, prompts, self._max_tokens(req, prompts), logprobs)
        tools = self.tool_parser if tool_mode != "none" else None
        if tools is not None:
            params = self._tool_params(req, params, tool_mode, function)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._add(request_id, prompts, params, req.priority, req.user or tenant)
        fmt = _ChatFormat(self, request_id, model, req.logprobs, req.top_logprobs or 0, self.reasoning_parser, tools)
        if req.stream:
            return self._stream(streams, fmt, req.n, req.include_usage)
        return await self._collect(streams, fmt, req.n)

    # ---- requests in ----------------------------------------------------------------------------
    def _model_name(self, req: _Sampling) -> str:
        """The served model the request names; first, a field tokenmill would ignore is refused."""
        field = req.unhonoured_field()
        if field is not None:
            raise InvalidParameterError(field, f"tokenmill does not support '{field}' (yet); remove it rather "
                                               "than get an answer that ignores it")
        return self.served_model(req.model)

    def served_model(self, model: str | None) -> str:
        """The served model a request names (the first when it names none), else ModelNotFoundError."""
        if model is None:
            return self.served_model_names[0]
        if model not in self.served_model_names:
            raise ModelNotFoundError(f"the model {model!r} does not exist; this server serves "
                                     f"{', '.join(self.served_model_names)}")
        return model

    def _completion_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> _Prompt:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameterError("prompt", "this model has no tokenizer; send token ids")
            if not prompt:
                raise InvalidParameterError("prompt", "the prompt is empty")
            self._check_text("prompt", prompt)
            return _Prompt(self.tokenizer.encode(prompt, add_special_tokens), prompt)
        return _Prompt(list(prompt), None)

    def _chat_prompt(self, req: ChatCompletionRequest, with_tools: bool = True) -> _Prompt:
        """The rendered conversation; with its tools unless `with_tools` is false (tool_choice none)."""
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise InvalidParameterError("messages", "this model has no chat template; use /v1/completions")
        messages = [m.as_template_input() for m in req.messages]
        specials = self.tokenizer.special_tokens_pattern
        for i, message in enumerate(messages):
            found = specials.search("\n".join(_strings(message))) if specials else None
            if found:  # in the rendered text it would be that token: a message could forge turns
                raise InvalidParameterError("messages", f"message {i} holds the special token {found.group()!r}, "
                                                        "which would act as one; remove it")
        tools = [tool.model_dump(exclude_none=True) for tool in req.tools] if with_tools and req.tools else None
        found = specials.search("\n".join(_strings(tools))) if specials and tools else None
        if found:
            raise InvalidParameterError("tools", f"the tools hold the special token {found.group()!r}; remove it")
        try:
            text = render_chat(self.tokenizer, messages, req.add_generation_prompt, tools, req.chat_template_kwargs)
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            # the template runs on the client's messages and chat_template_kwargs: whatever it raises is theirs
            raise InvalidParameterError("messages", f"the chat template rejected them: {type(e).__name__}: {e}") from e
        self._check_text("messages", text)
        return _Prompt(self.tokenizer.encode(text, add_special_tokens=False), text)

    def _tool_params(self, req: ChatCompletionRequest, params: SamplingParams, mode: str,
                     function: str | None) -> SamplingParams:
        """A forced call ("required", or a named function) is generated under a grammar of the
        parser's format whose arguments follow the function's schema, so it always parses."""
        keep_specials = {"skip_special_tokens": False} if self.tool_parser.keeps_special_tokens else {}
        if mode == "auto":
            return dataclasses.replace(params, **keep_specials)
        if params.structured_outputs is not None:
            raise InvalidParameterError("tool_choice", f"a forced tool call has its own grammar; drop "
                                                       f"{params.structured_outputs.field} or set tool_choice to auto")
        allowed = [t.function for t in req.tools if mode == "required" or t.function.name == function]
        schemas = [self.tool_parser.call_schema(f.name, f.parameters or {"type": "object", "properties": {}})
                   for f in allowed]
        grammar = self.tool_parser.grammar(schemas, parallel=mode == "required" and req.parallel_tool_calls)
        return dataclasses.replace(params, structured_outputs=StructuredOutputsParams(grammar=grammar, field="tools"),
                                   **keep_specials)

    def _check_text(self, param: str, text: str) -> None:
        """Before tokenizing: text that cannot fit the context by its length alone, or that holds
        lone surrogates, is refused without the tokenizer's time."""
        limit = self.max_model_len * self.tokenizer.max_token_chars
        if len(text) > limit:
            raise InvalidParameterError(param, f"the text has {len(text)} characters; no text over {limit} "
                                               f"({self.max_model_len} tokens of at most "
                                               f"{self.tokenizer.max_token_chars} characters) fits this model's context")
        require_unicode(param, text)

    def _max_tokens(self, req: CompletionRequest | ChatCompletionRequest, prompts: list[_Prompt]) -> int | None:
        """What the body asks, or when it leaves it out the model's max_new_tokens (generation_config),
        cut to the context the longest prompt leaves (as vLLM does), else the endpoint's default."""
        default = self.generation_defaults.get("max_tokens")
        if default is not None:
            default = max(1, min(default, self.max_model_len - max(len(p.token_ids) for p in prompts)))
        return req.output_tokens(default)

    def _params(self, req: _Sampling, prompts: list[_Prompt], max_tokens: int | None,
                logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        longest = max(len(p.token_ids) for p in prompts)
        if longest >= self.max_model_len:
            raise InvalidParameterError(req.prompt_field, prompt_too_long(longest, self.max_model_len))
        if max_tokens is not None and longest + max_tokens > self.max_model_len:
            raise InvalidParameterError("max_tokens", f"{max_tokens} new tokens after a {longest}-token prompt "
                                                      f"exceed the context of {self.max_model_len} tokens")
        # the most tokens the request can make the engine compute: each prompt once, each choice's answer
        work = sum(len(p.token_ids) + req.n * (max_tokens or self.max_model_len - len(p.token_ids)) for p in prompts)
        if work > self.max_request_tokens:
            raise InvalidParameterError("max_tokens" if max_tokens else "n", (
                f"the request could take {work} tokens of work ({len(prompts)} prompt(s), n={req.n}, up to "
                f"{max_tokens or 'the context'} new tokens each), over this server's {self.max_request_tokens} "
                "(--max-request-tokens); lower n or max_tokens"))
        return req.sampling_params(max_tokens, logprobs, self.generation_defaults, prompt_logprobs)

    async def _add(self, base_id: str, prompts: list[_Prompt], params: SamplingParams, priority: int,
                   tenant: str | None) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                request_id = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await self.engine.add_request(request_id, prompt.token_ids, params, prompt.text,
                                                             priority, tenant))
        except BaseException:
            for stream in streams:
                stream.abort()
            raise
        return streams

    # ---- responses out --------------------------------------------------------------------------
    async def _collect(self, streams: list[RequestStream], fmt: "_Format", n: int) -> dict:
        async def last(stream: RequestStream) -> RequestOutput:
            output = None
            async for output in stream:
                pass
            return output

        tasks = [asyncio.ensure_future(last(s)) for s in streams]
        try:
            finals = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            for stream in streams:  # a no-op for finished ones; frees the rest if the client left
                stream.abort()
        choices = [fmt.choice(p * n + o.index, o, out) for p, out in enumerate(finals) for o in out.outputs]
        return fmt.response(choices, _usage(finals, self.speculative))

    async def _stream(self, streams: list[RequestStream], fmt: "_Format", n: int,
                      include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per choice that moved, then usage, then [DONE]."""
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        finals: dict[int, RequestOutput] = {}
        ended: set[int] = set()  # choices whose finish_reason was sent: later outputs repeat them
        usage_field = {"usage": None} if include_usage else {}
        try:
            for p in range(len(streams)):
                for i in range(n):
                    first = fmt.first_delta(p * n + i)
                    if first is not None:
                        yield _sse(fmt.chunk([first]) | usage_field)
            async for p, output in _merge(streams):
                choices = []
                for o in output.outputs:
                    index = p * n + o.index
                    text_from, tokens_from = sent_text.get(index, 0), sent_tokens.get(index, 0)
                    moved = len(o.text) > text_from or len(o.token_ids) > tokens_from
                    if index in ended or not (moved or o.finished()):
                        continue
                    if o.finished():
                        ended.add(index)
                    choice = fmt.delta(index, o, text_from, tokens_from, output)
                    if choice is not None:  # None: nothing settled to send yet (see AssistantMessage)
                        choices.append(choice)
                    sent_text[index], sent_tokens[index] = max(text_from, len(o.text)), len(o.token_ids)
                if choices:
                    yield _sse(fmt.chunk(choices) | usage_field)
                if output.finished:
                    finals[p] = output
            if include_usage:
                yield _sse(fmt.chunk([]) | {"usage": _usage(list(finals.values()), self.speculative)})
        except TokenmillError as e:  # nothing more can be sent as a status code once the stream started
            yield _sse({"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": 400}})
        except RuntimeError as e:  # a failed step (500); a shutdown that ran out of time or a lost replica (503)
            code = 503 if isinstance(e, UnavailableError) else 500
            yield _sse({"error": {"message": str(e), "type": "internal_error", "param": None, "code": code}})
        finally:
            for stream in streams:  # a no-op for finished ones; frees the rest if the client left
                stream.abort()
        yield "data: [DONE]\n\n"

    def token_text(self, token_id: int, skip_special_tokens: bool = False) -> str:
        """A token's text; a sampled special token (e.g. EOS) is "" as in the response text."""
        if self.tokenizer is None:
            return str(token_id)
        return self.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens)

    def prompt_text(self, output: RequestOutput) -> str:
        """The prompt as sent, or the decoding of its tokens (token ids sent, or a truncated prompt)."""
        if output.prompt is not None:
            return output.prompt
        return self.tokenizer.decode(output.prompt_token_ids) if self.tokenizer is not None else ""


def _truncated(prompts: list[_Prompt], keep_last: int | None) -> list[_Prompt]:
    """truncate_prompt_tokens: each prompt's last `keep_last` tokens (their text is their decoding)."""
    if keep_last is None:
        return prompts
    return [p if len(p.token_ids) <= keep_last else _Prompt(p.token_ids[-keep_last:], None) for p in prompts]


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the prompt index."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except Exception as e:  # noqa: BLE001  (handed to the consumer, which raises it)
            await queue.put((index, e))
        await queue.put((index, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _usage(finals: list[RequestOutput], speculative: bool = False) -> dict:
    prompt = sum(len(out.prompt_token_ids) for out in finals)
    completion = sum(len(o.token_ids) for out in finals for o in out.outputs)
    cached = sum(out.num_cached_tokens for out in finals)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_tokens_details": {"cached_tokens": cached}}
    if speculative:  # tokenmill's extension: the request's draft tokens and how many were kept
        usage["speculative"] = {"draft_tokens": sum(out.metrics.spec_draft_tokens for out in finals),
                                "accepted_tokens": sum(out.metrics.spec_accepted_tokens for out in finals)}
    return usage | _cost_usage([out.metrics for out in finals], completion)


def _cost_usage(metrics: list, completion_tokens: int) -> dict:
    """tokenmill's extension fields: the requests' share of energy, cost and roofline time."""
    if not metrics or any(m.energy_joules is None for m in metrics):
        return {}
    energy = sum(m.energy_joules for m in metrics)
    usage = {"energy_joules": energy,
             "energy_joules_per_output_token": energy / completion_tokens if completion_tokens else None,
             "energy_meter": metrics[0].energy_meter, "energy_estimated": metrics[0].energy_estimated}
    if all(m.cost_usd is not None for m in metrics):
        usage["cost_usd"] = sum(m.cost_usd for m in metrics)
    if all(m.idealized_time is not None for m in metrics):
        usage["idealized_time_s"] = sum(m.idealized_time for m in metrics)
    return usage


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Format:
    """The shape of one endpoint's responses."""

    object_name: str
    chunk_object_name: str

    def __init__(self, serving: OpenAIServing, request_id: str, model: str):
        self.serving = serving
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())

    def response(self, choices: list[dict], usage: dict) -> dict:
        return {"id": self.request_id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def chunk(self, choices: list[dict]) -> dict:
        return {"id": self.request_id, "object": self.chunk_object_name, "created": self.created,
                "model": self.model, "choices": choices}

    def first_delta(self, index: int) -> dict | None:
        return None

    def _entries(self, output: CompletionOutput, tokens_from: int):
        """(token text, sampled logprob, top entries sorted by rank) of each new token."""
        for token_id, entry in zip(output.token_ids[tokens_from:], output.logprobs[tokens_from:]):
            top = sorted(entry.items(), key=lambda kv: kv[1].rank)
            yield self.serving.token_text(token_id, skip_special_tokens=True), entry[token_id].logprob, top


class _CompletionFormat(_Format):
    """`echo`: each choice's text and logprobs start with the prompt's (its first token has no
    logprob, as in OpenAI's and vLLM's); `generate` False (echo with max_tokens 0): they hold only
    the prompt (the one token the engine sampled is left out, and counted in usage, as in vLLM)."""

    object_name = chunk_object_name = "text_completion"

    def __init__(self, serving: OpenAIServing, request_id: str, model: str, with_logprobs: bool,
                 echo: bool = False, generate: bool = True):
        super().__init__(serving, request_id, model)
        self.with_logprobs = with_logprobs
        self.echo = echo
        self.generate = generate
        self._prompt_entries: dict[str, dict] = {}  # request id -> its prompt's logprob lists, shared by its n choices

    def choice(self, index: int, output: CompletionOutput, request: RequestOutput) -> dict:
        return self.delta(index, output, 0, 0, request)

    def delta(self, index: int, output: CompletionOutput, text_from: int, tokens_from: int,
              request: RequestOutput) -> dict:
        prompt = self.serving.prompt_text(request) if self.echo else ""
        first = text_from == tokens_from == 0  # a choice's first piece carries the echoed prompt
        text = (prompt if first else "") + (output.text[text_from:] if self.generate else "")
        logprobs = None
        if self.with_logprobs:
            logprobs = _logprob_lists()
            if self.echo and first:
                if request.request_id not in self._prompt_entries:
                    self._prompt_entries[request.request_id] = self._prompt_logprobs(request)
                logprobs = {key: list(values) for key, values in self._prompt_entries[request.request_id].items()}
            if self.generate:
                generated = self._logprobs(output, tokens_from, len(prompt) + text_from)
                for key, values in generated.items():
                    logprobs[key] += values
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": output.finish_reason, "stop_reason": output.stop_reason}

    def _logprobs(self, output: CompletionOutput, tokens_from: int, offset: int) -> dict:
        result = _logprob_lists()
        for text, logprob, top in self._entries(output, tokens_from):
            result["tokens"].append(text)
            result["token_logprobs"].append(logprob)
            result["top_logprobs"].append({self.serving.token_text(t): lp.logprob for t, lp in top})
            result["text_offset"].append(offset)
            offset += len(text)
        return result

    def _prompt_logprobs(self, request: RequestOutput) -> dict:
        """The prompt tokens' entries: special tokens shown, the first token's logprob and top null."""
        result = _logprob_lists()
        offset = 0
        for token, entry in zip(request.prompt_token_ids, request.prompt_logprobs):
            text = self.serving.token_text(token)
            result["tokens"].append(text)
            result["token_logprobs"].append(None if entry is None else entry[token].logprob)
            result["top_logprobs"].append(None if entry is None else {
                self.serving.token_text(t): lp.logprob for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank)})
            result["text_offset"].append(offset)
            offset += len(text)
        return result


def _logprob_lists() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


class _ChatFormat(_Format):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, serving: OpenAIServing, request_id: str, model: str, with_logprobs: bool,
                 top_logprobs: int, reasoning: ReasoningParser | None = None, tools: ToolParser | None = None):
        super().__init__(serving, request_id, model)
        self.with_logprobs = with_logprobs
        self.top_logprobs = top_logprobs
        self.reasoning, self.tools = reasoning, tools
        self.messages: dict[int, AssistantMessage] = {}  # per choice

    def _message(self, index: int) -> AssistantMessage:
        if index not in self.messages:
            self.messages[index] = AssistantMessage(self.reasoning, self.tools)
        return self.messages[index]

    def choice(self, index: int, output: CompletionOutput, request: RequestOutput) -> dict:
        message = self._message(index)
        return {"index": index, "message": message.message(output.text),
                "logprobs": self._logprobs(output, 0) if self.with_logprobs else None,
                "finish_reason": _finish_reason(output, message), "stop_reason": output.stop_reason}

    def first_delta(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, output: CompletionOutput, text_from: int, tokens_from: int,
              request: RequestOutput) -> dict | None:
        message = self._message(index)
        delta = message.delta(output.text, output.finished())
        if not delta and not output.finished() and not self.with_logprobs:
            return None
        return {"index": index, "delta": delta,
                "logprobs": self._logprobs(output, tokens_from) if self.with_logprobs else None,
                "finish_reason": _finish_reason(output, message), "stop_reason": output.stop_reason}

    def _logprobs(self, output: CompletionOutput, tokens_from: int) -> dict:
        content = []
        for text, logprob, top in self._entries(output, tokens_from):
            alternatives = [self._token(self.serving.token_text(t), lp.logprob) for t, lp in top[: self.top_logprobs]]
            content.append(self._token(text, logprob) | {"top_logprobs": alternatives})
        return {"content": content}

    @staticmethod
    def _token(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _strings(value):
    """Every string in a JSON-like value, keys too: each one reaches the chat template."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _finish_reason(output: CompletionOutput, message: AssistantMessage) -> str | None:
    """"tool_calls" for an answer that ended in calls (not one cut off by max_tokens)."""
    return "tool_calls" if output.finish_reason == "stop" and message.called else output.finish_reason

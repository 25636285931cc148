"""/tokenize and /detokenize (vLLM's): the server's own tokenizer and chat template, for clients
that count tokens or build prompts. Each form takes the path its generation endpoint takes, so
a count here is the prompt_tokens that endpoint reports."""

from __future__ import annotations

import asyncio

from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest
from tokenmill.entrypoints.openai.serving import OpenAIServing
from tokenmill.entrypoints.openai.tokenize_protocol import DetokenizeRequest, TokenizeRequest
from tokenmill.errors import InvalidParameterError


async def tokenize(serving: OpenAIServing, req: TokenizeRequest) -> dict:
    serving.served_model(req.model)
    _needs_tokenizer(serving)
    _check_form(req)
    if req.prompt is not None:
        prompt = await asyncio.to_thread(serving._completion_prompt, req.prompt, req.add_special_tokens is not False)
    else:  # as a chat request of these messages: the chat endpoint's checks and template apply
        chat = ChatCompletionRequest.model_validate({
            "model": req.model, "messages": req.messages, "add_generation_prompt": req.add_generation_prompt,
            "tools": req.tools, "chat_template_kwargs": req.chat_template_kwargs})
        prompt = await asyncio.to_thread(serving._chat_prompt, chat)
    tokens = prompt.token_ids
    strs = serving.tokenizer.token_strs(tokens) if req.return_token_strs else None
    return {"count": len(tokens), "max_model_len": serving.max_model_len, "tokens": tokens, "token_strs": strs}


async def detokenize(serving: OpenAIServing, req: DetokenizeRequest) -> dict:
    serving.served_model(req.model)
    _needs_tokenizer(serving)
    vocab = serving.tokenizer.vocab_size
    outside = next((t for t in req.tokens if t >= vocab), None)
    if outside is not None:
        raise InvalidParameterError("tokens", f"{outside} is not a token id of this model's vocabulary "
                                              f"(0 to {vocab - 1})")
    text = await asyncio.to_thread(serving.tokenizer.decode, req.tokens, skip_special_tokens=False)
    return {"prompt": text}


def _check_form(req: TokenizeRequest) -> None:
    """Exactly one of prompt and messages, with no option only the other form has."""
    if (req.prompt is None) == (req.messages is None):
        raise InvalidParameterError("prompt" if req.prompt is None else "messages",
                                    "give either prompt (a text) or messages (a chat), "
                                    + ("not both" if req.prompt is not None else "neither was given"))
    if req.messages is not None and req.add_special_tokens:
        raise InvalidParameterError("add_special_tokens", "applies to prompt; with messages the chat template "
                                                          "writes the special tokens itself")
    for name in ("add_generation_prompt", "tools", "chat_template_kwargs"):
        if req.prompt is not None and name in req.model_fields_set:
            raise InvalidParameterError(name, "applies to messages, not to prompt")


def _needs_tokenizer(serving: OpenAIServing) -> None:
    if serving.tokenizer is None:
        raise InvalidParameterError("model", "this model has no tokenizer: its prompts are token ids")

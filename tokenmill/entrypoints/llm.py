"""The offline API: `LLM(model).generate(prompts, SamplingParams)` and `LLM.chat(...)`, as in vLLM."""

from __future__ import annotations

import itertools
from typing import Sequence as Seq

from tqdm import tqdm

from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import InvalidParameterError, RequestFailedError
from tokenmill.entrypoints.openai.tool_parsers import render_chat
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Runs a batch of prompts to completion with continuous batching.

    `engine_args`: the engine's options by their flat names, as LLMEngine takes them (EngineConfig's,
    the CLI's engine flags with underscores: dtype, max_num_seqs, kv_cache_memory, ...); a name that
    is not one raises UnknownOptionError (a TypeError) naming it."""

    def __init__(self, model: str | None = None, **engine_args):
        self.engine = LLMEngine(model, **engine_args)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block (see LLMEngine.reset_prefix_cache)."""
        return self.engine.reset_prefix_cache()

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: int | Seq[int] = 0,
                 user: str | Seq[str] | None = None) -> list[RequestOutput]:
        """`priority` (lower first; the priority and aging policies) and `user` (the tenant; the fair
        policy) are one value for every prompt or one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run([(p, None) for p in prompts], sampling_params, use_tqdm, priority, user)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, priority: int | Seq[int] = 0,
             user: str | Seq[str] | None = None, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them. `tools`:
        OpenAI function definitions the template shows the model (the server parses the calls);
        `chat_template_kwargs`: more template variables, e.g. {"enable_thinking": False}."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise InvalidParameterError("messages", "this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        items = []
        for conv in conversations:
            text = render_chat(tokenizer, conv, add_generation_prompt, tools, chat_template_kwargs)
            items.append((tokenizer.encode(text, add_special_tokens=False), text))
        return self._run(items, sampling_params, use_tqdm, priority, user)

    def _run(self, items: list[tuple[Prompt, str | None]], sampling_params, use_tqdm: bool,
             priority: int | Seq[int] = 0, user: str | Seq[str] | None = None) -> list[RequestOutput]:
        default = SamplingParams(**self.engine.generation_defaults)  # the model's generation_config values
        params = _per_prompt("sampling_params", sampling_params or default, len(items))
        priorities = _per_prompt("priority", priority, len(items))
        users = _per_prompt("user", user, len(items))
        ids = [f"offline-{next(self._ids)}" for _ in items]
        try:
            for request_id, (prompt, text), p, prio, tenant in zip(ids, items, params, priorities, users):
                self.engine.add_request(request_id, prompt, p, prompt_text=text, priority=prio, tenant=tenant)
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(items), desc="generating", disable=not use_tqdm or len(items) < 2)
        try:
            while len(finished) < len(items):
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
                failed = {rid: why for rid, why in self.engine.pop_failed().items() if rid in ids}
                if failed:
                    rid, error = next(iter(failed.items()))
                    if isinstance(error, InvalidParameterError):
                        raise error
                    raise RequestFailedError(
                        f"prompt {ids.index(rid)} failed the engine step: {type(error).__name__}: {error}")
        finally:
            bar.close()
            for request_id in ids:
                if request_id not in finished:
                    self.engine.abort_request(request_id)
        return [finished[i] for i in ids]


def _per_prompt(name: str, value, count: int) -> list:
    """One value for every prompt, or a list (or tuple) with one per prompt."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise InvalidParameterError(name, f"{len(values)} given for {count} prompts")
    return values

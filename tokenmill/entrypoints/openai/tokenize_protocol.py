"""The bodies of /tokenize and /detokenize (vLLM's endpoints), as pydantic models.

Unknown fields are refused by name: these endpoints have nothing to ignore.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

from tokenmill.entrypoints.openai.protocol import MAX_TOOLS, ChatMessage, TokenIds, Tool


class TokenizeRequest(BaseModel):
    """Either `prompt` (tokenized as /v1/completions does) or `messages` (rendered and tokenized
    as /v1/chat/completions does); the form's own options apply to it alone."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: StrictBool | None = None  # the prompt form's (default true); false is what messages do
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_generation_prompt: StrictBool = True  # the messages form's, as are the next two
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    chat_template_kwargs: dict | None = None
    return_token_strs: StrictBool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: TokenIds

    @field_validator("tokens", mode="before")
    @classmethod
    def _fits_context(cls, tokens, info: ValidationInfo):
        """More ids than the context holds are refused before each is checked (as a long prompt is)."""
        context = (info.context or {}).get("max_model_len")
        if context is not None and isinstance(tokens, list) and len(tokens) > context:
            raise ValueError(f"{len(tokens)} ids; at most {context} (this model's context) are decoded at once")
        return tokens

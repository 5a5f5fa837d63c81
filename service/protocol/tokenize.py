"""POST /tokenize and POST /detokenize, in vLLM's shapes (a prompt, or chat messages on the chat template)."""

from __future__ import annotations

from pydantic import Field, model_validator

from service.protocol import OpenAIBaseModel, RequestModel, invalid
from service.protocol.chat import ChatMessage
from service.protocol.sampling import TokenId


class TokenizeRequest(RequestModel):
    """vLLM's TokenizeCompletionRequest (`prompt`) or TokenizeChatRequest (`messages`), as one body."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (as vLLM)
    add_generation_prompt: bool = True  # messages only
    continue_final_message: bool = False  # messages only
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise invalid("prompt", "give either prompt or messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise invalid("continue_final_message", "cannot be true with add_generation_prompt true")
        return self


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str

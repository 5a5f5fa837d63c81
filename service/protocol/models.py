"""GET /v1/models: the base and every ready adapter, with the context length they are served with."""

from __future__ import annotations

from typing import Literal

from service.protocol import OpenAIBaseModel


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "d2lora"
    root: str  # the base model every adapter is fused into
    parent: str | None = None  # None for the base itself
    max_model_len: int  # longest prompt + completion (vLLM's field)


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

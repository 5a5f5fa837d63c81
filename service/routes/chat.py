"""POST /v1/chat/completions (the base model's chat template)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.auth import require_api_key
from service.inference import refuse_when_full
from service.protocol.chat import ChatCompletionRequest, ChatCompletionResponse

router = APIRouter(
    prefix="/v1", tags=["inference"], dependencies=[Depends(require_api_key), Depends(refuse_when_full)]
)  # 401, then 429


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    return await request.app.state.inference.chat(body, request)

"""POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.auth import require_api_key
from service.inference import refuse_when_full
from service.protocol.completions import CompletionRequest, CompletionResponse

router = APIRouter(
    prefix="/v1", tags=["inference"], dependencies=[Depends(require_api_key), Depends(refuse_when_full)]
)  # 401, then 429


@router.post("/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request):
    return await request.app.state.inference.complete(body, request)

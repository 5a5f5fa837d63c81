"""GET /v1/models: the base and every ready adapter."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.auth import require_api_key
from service.protocol.models import ModelList

router = APIRouter(prefix="/v1", tags=["inference"], dependencies=[Depends(require_api_key)])


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    return request.app.state.inference.models()

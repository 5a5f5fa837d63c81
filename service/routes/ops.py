"""GET /health (the process answers), GET /ready (the engine is up), GET /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.metrics import REGISTRY, record_gateway_state
from service.protocol import APIError

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict:
    if getattr(request.app.state, "engine_dead", False):
        raise APIError(
            503, "the engine died; the server is exiting so that its supervisor restarts it", code="engine_dead"
        )
    if not getattr(request.app.state, "ready", False):
        raise APIError(503, "the engine is starting", code="not_ready")
    return {"status": "ready"}


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    inference = getattr(request.app.state, "inference", None)
    if inference is not None:
        record_gateway_state(inference.scheduler.state())
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

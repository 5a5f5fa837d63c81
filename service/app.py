"""The app factory: `create_app(settings)` builds the FastAPI app; its lifespan starts everything.

Start: load the adapter registry (what dead servers left is recovered; see
service/registry.py for replicas sharing a data dir), read or create the admin token, start the
engine(s) and the scheduler, hand every ready adapter to the scheduler, then answer /ready.  Stop: the
reverse.  Handlers live in `app.state`: `inference`, `adapters`, `auth`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from merger.errors import D2LoraError
from service import metrics
from service.auth import Authenticator
from service.engines import engine_factory
from service.engines.context import resolve_max_model_len
from service.errors import install_error_handlers
from service.inference import InferenceHandler
from service.management import AdapterManager, upload_limits
from service.registry import AdapterRecord, Registry
from service.replica import ReplicaHeaders, replica_name
from service.routes import ROUTERS
from service.scheduling.scheduler import Scheduler
from service.settings import Settings
from service.upgrade import upgrade_records

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
ENGINE_WATCH_S = 1.0
EXIT_ENGINE_DEAD = 3


class ServeError(D2LoraError):
    """The server cannot start with these settings."""


def base_model_dir(settings: Settings) -> Path:
    if settings.base_dir is None:
        raise ServeError("no base model: give --base DIR (or set D2LORA_BASE_DIR)")
    if not (settings.base_dir / "config.json").is_file():
        raise ServeError(f"--base: {settings.base_dir} is not a model folder (no config.json)")
    return settings.base_dir


def resolve_settings(settings: Settings) -> Settings:
    """The settings a server starts with: a base model that exists and a max_model_len it supports."""
    base_dir = base_model_dir(settings)
    return settings.model_copy(update={"max_model_len": resolve_max_model_len(settings, base_dir)})


def restore_equivalence_gauges(records: list[AdapterRecord]) -> None:
    for record in records:
        diff = ((record.equivalence or {}).get("logits") or {}).get("max_abs_logit_diff")
        if isinstance(diff, (int, float)):
            metrics.EQUIVALENCE_MAX_ABS_LOGIT_DIFF.labels(model=record.name).set(diff)


async def start_scheduler(settings: Settings, base_dir: Path, registry: Registry) -> Scheduler:
    scheduler = await Scheduler.create(settings, base_dir, engine_factory(settings))
    for record in registry.all_serving():
        await scheduler.add_model(record.name, record.fused_tensors, record.per_request_form)
    return scheduler


async def watch_engines(app: FastAPI, scheduler: Scheduler) -> None:
    """An engine that dies is never a silent hang: /ready turns 503, then the process stops and exits non-zero."""
    while scheduler.alive:
        await asyncio.sleep(ENGINE_WATCH_S)
    logger.error("the engine died; stopping so that a supervisor restarts the server")
    app.state.ready, app.state.engine_dead = False, True
    app.state.shutdown()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    settings = resolve_settings(app.state.settings)
    base_dir = base_model_dir(settings)
    base_name = base_dir.resolve().name
    registry = Registry(settings.data_dir)
    registry.load()
    await asyncio.to_thread(upgrade_records, registry, base_dir, upload_limits(settings))
    restore_equivalence_gauges(registry.all_serving())
    app.state.auth = Authenticator.from_settings(settings)
    scheduler = await start_scheduler(settings, base_dir, registry)
    app.state.adapters = AdapterManager(settings, base_dir, base_name, registry, scheduler)
    max_model_len = resolve_max_model_len(settings, base_dir)
    app.state.inference = InferenceHandler(scheduler, registry, base_name, DEFAULT_MAX_TOKENS, max_model_len)
    app.state.ready = True
    watchdog = asyncio.create_task(watch_engines(app, scheduler), name="d2lora-engine-watch")
    logger.info("serving %s and %d adapters", base_name, len(registry.all_serving()))
    try:
        yield
    finally:
        watchdog.cancel()
        app.state.ready = False
        await app.state.adapters.close()
        await scheduler.stop()
        registry.close()


class RequestMetrics:
    """ASGI middleware: d2lora_requests_total and request latency, once the last byte is sent.

    `endpoint` is the matched route's template (bounded label values); `model`
    is what the route resolved into `request.state.model` (empty otherwise).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self._observe(scope, status[0], time.perf_counter() - start)

    @staticmethod
    def _observe(scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        model = scope.get("state", {}).get("model", "")
        metrics.REQUESTS.labels(model=model, endpoint=endpoint, status=str(status)).inc()
        metrics.REQUEST_LATENCY.labels(model=model, endpoint=endpoint).observe(seconds)


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="d2lora-serve", summary="D²-LoRA adapters merged, verified and served hot-swapped", lifespan=lifespan
    )
    app.state.settings = settings
    app.state.ready = False
    app.state.engine_dead = False
    app.state.shutdown = lambda: os.kill(os.getpid(), signal.SIGTERM)  # `d2lora serve` stops its uvicorn instead
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(RequestMetrics)
    app.add_middleware(ReplicaHeaders, replica=replica_name(settings), resident=lambda: resident_models(app))
    return app


def resident_models(app: FastAPI) -> list[str]:
    inference = getattr(app.state, "inference", None)
    return inference.scheduler.resident_models() if inference is not None else []

"""The ASGI application: settings, state, middleware and routers; models load in the lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from backend.auth import BasicAuthMiddleware
from backend.config import Settings, get_settings
from backend.metrics import Metrics
from backend.predictor import Predictor
from backend.routes import ls, metrics
from backend.state import ModelHolder, ProjectStore
from model import create_detector

log = logging.getLogger(__name__)


def load_predictor(settings: Settings) -> Predictor:
    """Load the detector named by the settings and wrap it for Label Studio requests."""
    detector = create_detector(
        settings.detector_checkpoint,
        revision=settings.detector_revision,
        device=settings.device,
        precision=settings.precision,
    )
    return Predictor(
        detector,
        batch_size=settings.batch_size,
        max_pixels=settings.image_max_pixels,
        download_threads=settings.image_download_threads,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the model starts loading on start-up, in the background."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.model.start()
        yield
        app.state.projects.close()
        app.state.model.wait(settings.model_load_timeout)

    app = FastAPI(title="dinolabel", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.projects = ProjectStore(settings)
    app.state.model = ModelHolder(lambda: load_predictor(settings))

    @app.middleware("http")
    async def record(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # unexpected: log the traceback, answer a reason without it
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            response = JSONResponse({"detail": "internal error; see the service log"}, status_code=500)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        metrics_ = app.state.metrics
        metrics_.requests.labels(name, request.method, str(response.status_code)).inc()
        metrics_.latency.labels(name).observe(time.perf_counter() - started)
        if response.status_code >= 500:
            metrics_.errors.labels(name).inc()
        return response

    if settings.basic_auth_user:
        app.add_middleware(BasicAuthMiddleware, settings=settings)
    app.include_router(ls.router)
    app.include_router(metrics.router)
    return app

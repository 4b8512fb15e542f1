"""The ASGI application: settings, Redis/queues, middleware and routers.

The model does not live here: it lives in workers (``dinolabel worker``), or, when no Redis URL is
configured, in one embedded worker thread next to an embedded Redis, started in the lifespan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request, Response

from backend import errors
from backend.auth import AuthMiddleware
from backend.body_limit import BodyLimitMiddleware
from backend.config import Settings, get_settings
from backend.index_cache import IndexCache
from backend.metrics import Metrics
from backend.routes import index, jobs, ls, metrics, priority, search
from backend.state import Service

log = logging.getLogger(__name__)

PREDICT_THREADS = 256
"""Threads that may wait on workers for /predict at once (apart from FastAPI's pool of 40)."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; Redis (embedded or not) and the embedded worker start with the lifespan."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(settings)
        app.state.service = service
        app.state.predict_limiter = anyio.CapacityLimiter(PREDICT_THREADS)
        app.state.index_cache = IndexCache(settings)
        if service.embedded is not None and settings.embedded_worker:
            service.start_embedded_worker()
        if settings.store_writer:
            service.start_store_writer()
        if settings.webhook_secret is None:
            log.warning(
                "DINOLABEL_WEBHOOK_SECRET is not set: /webhook refuses TASKS_CREATED (new tasks are not "
                "pre-annotated automatically) unless it carries this service's basic-auth credentials"
            )
        yield
        app.state.index_cache.close()
        service.close()

    app = FastAPI(title="dinolabel", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    # Innermost of our middleware: its 413s are counted by `record` below, and basic auth refuses first.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)

    errors.install(app)

    @app.middleware("http")
    async def record(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # unexpected: log the traceback, answer a reason without it
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            response = errors.SafeJSONResponse({"detail": "internal error; see the service log"}, status_code=500)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        app.state.metrics.observe(route, request.method, response.status_code, time.perf_counter() - started)
        return response

    if settings.basic_auth_user or settings.api_key is not None:
        app.add_middleware(AuthMiddleware, settings=settings)
    app.include_router(ls.router)
    app.include_router(jobs.router)
    app.include_router(index.router)
    app.include_router(search.router)
    app.include_router(priority.router)
    app.include_router(metrics.router)
    return app

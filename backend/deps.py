"""FastAPI dependencies: typed access to the process state that ``create_app`` builds."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from backend.config import Settings
from backend.index_cache import IndexCache
from backend.metrics import Metrics
from backend.state import Service


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _service(request: Request) -> Service:
    return request.app.state.service


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _index_cache(request: Request) -> IndexCache:
    return request.app.state.index_cache


SettingsDep = Annotated[Settings, Depends(_settings)]
ServiceDep = Annotated[Service, Depends(_service)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
IndexCacheDep = Annotated[IndexCache, Depends(_index_cache)]

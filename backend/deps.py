"""FastAPI dependencies: typed access to the process state that ``create_app`` builds."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from backend.config import Settings
from backend.metrics import Metrics
from backend.predictor import Predictor
from backend.state import ModelHolder, ProjectStore


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _projects(request: Request) -> ProjectStore:
    return request.app.state.projects


def _model(request: Request) -> ModelHolder[Predictor]:
    return request.app.state.model


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(_settings)]
ProjectsDep = Annotated[ProjectStore, Depends(_projects)]
ModelDep = Annotated[ModelHolder[Predictor], Depends(_model)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]

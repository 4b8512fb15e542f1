"""Process state behind the HTTP routes: the model (loaded once, in the background) and projects."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from backend.config import Settings
from backend.image_source import ImageFetcher
from model import DetectionParams, model_version

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelUnavailable(RuntimeError):
    """The model failed to load, or is still loading after the wait allowed."""


class ModelHolder(Generic[T]):
    """Loads a model on a background thread so ``/health`` answers at once, even during the load."""

    def __init__(self, loader: Callable[[], T]) -> None:
        self._loader = loader
        self._ready = threading.Event()
        self._value: T | None = None
        self.error: str | None = None
        self.load_seconds: float | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Begin loading (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self._value = self._loader()
        except Exception as exc:  # reported through /health and 503s, never crashes the server
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")
        finally:
            self.load_seconds = time.perf_counter() - started
            self._ready.set()

    def wait(self, timeout: float) -> None:
        """Let a load in progress finish (at shutdown: a thread killed mid-load aborts the process)."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def state(self) -> str:
        """``loading``, ``ready`` or ``failed``."""
        if not self._ready.is_set():
            return "loading"
        return "failed" if self.error else "ready"

    def get(self, timeout: float) -> T:
        """The model, waiting up to ``timeout`` seconds for the load to finish."""
        self.start()
        if not self._ready.wait(timeout):
            raise ModelUnavailable(f"the model is still loading after {timeout:.0f} s; try again shortly")
        if self._value is None:
            raise ModelUnavailable(f"the model failed to load: {self.error}")
        return self._value


@dataclass(frozen=True)
class Project:
    """What ``/setup`` told us about one Label Studio project."""

    label_config: str | None = None
    hostname: str | None = None
    access_token: str | None = None
    params: DetectionParams = field(default_factory=DetectionParams)


def project_key(project: Any) -> str:
    """Label Studio sends ``"<id>.<timestamp>"`` as the project; the id part names it."""
    return str(project).split(".", 1)[0] if project is not None else ""


class ProjectStore:
    """Per-project settings from ``/setup`` (label config, Label Studio address, threshold overrides)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default_params = DetectionParams(
            box_threshold=settings.box_threshold,
            text_threshold=settings.text_threshold,
            nms_iou=settings.nms_iou,
            max_boxes=settings.max_boxes,
        )
        self._projects: dict[str, Project] = {}
        self._fetchers: dict[tuple[str | None, str | None], ImageFetcher] = {}
        self._lock = threading.Lock()

    def get(self, project: Any) -> Project:
        with self._lock:
            return self._projects.get(project_key(project), Project(params=self.default_params))

    def update(self, project: Any, **changes: Any) -> Project:
        with self._lock:
            key = project_key(project)
            current = self._projects.get(key, Project(params=self.default_params))
            updated = replace(current, **changes)
            self._projects[key] = updated
            return updated

    def params_with(self, overrides: dict[str, Any] | None) -> DetectionParams:
        """The default detection parameters with a project's ``extra_params`` applied."""
        return replace(self.default_params, **(overrides or {}))

    def model_version(self, params: DetectionParams) -> str:
        s = self.settings
        return model_version(
            s.detector_checkpoint, revision=s.detector_revision, params=params, precision=s.precision
        )

    def fetcher(self, project: Project) -> ImageFetcher:
        """An image fetcher for the project's Label Studio; settings win over what /setup sent."""
        s = self.settings
        url = s.label_studio_url or project.hostname
        key = s.label_studio_api_key.get_secret_value() if s.label_studio_api_key else project.access_token
        with self._lock:
            if (url, key) not in self._fetchers:
                self._fetchers[(url, key)] = ImageFetcher(
                    label_studio_url=url,
                    api_key=key,
                    document_root=s.local_files_document_root,
                    media_root=s.media_root,
                    timeout=s.image_timeout,
                    max_bytes=s.image_max_bytes,
                )
            return self._fetchers[(url, key)]

    def close(self) -> None:
        with self._lock:
            for fetcher in self._fetchers.values():
                fetcher.close()
            self._fetchers.clear()

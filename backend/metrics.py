"""Prometheus metrics, on a registry of our own so several apps (tests) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The service's counters; ``/metrics`` renders ``registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dinolabel_http_requests",
            "HTTP requests by route, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dinolabel_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100, 300),
            registry=self.registry,
        )
        self.errors = Counter(
            "dinolabel_http_errors",
            "Requests answered with a 5xx status, by route.",
            ["route"],
            registry=self.registry,
        )
        self.tasks = Counter(
            "dinolabel_predicted_tasks",
            "Tasks predicted, by outcome (ok, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.boxes = Counter(
            "dinolabel_predicted_boxes", "Boxes returned to Label Studio.", registry=self.registry
        )
        self.model_load_seconds = Gauge(
            "dinolabel_model_load_seconds", "Time the detector took to load.", registry=self.registry
        )
        self.model_ready = Gauge(
            "dinolabel_model_ready",
            "1 once the detector is loaded, 0 while loading or failed.",
            registry=self.registry,
        )

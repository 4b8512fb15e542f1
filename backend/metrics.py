"""Prometheus metrics, on a registry of our own so several apps (tests) never collide.

Request metrics are counted in the API process. Queue depths, live workers and what the workers did
(batches, their seconds, tasks predicted or failed) are read from Redis at scrape time, so one scrape
of any API replica sees the whole cluster.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The service's metrics; ``/metrics`` renders ``registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dinolabel_http_requests", "HTTP requests by route, method and status code.",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "dinolabel_http_request_duration_seconds", "HTTP request latency by route.", ["route"],
            buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100, 300), registry=r,
        )  # fmt: skip
        self.errors = Counter("dinolabel_http_errors", "Requests answered 5xx, by route.", ["route"], registry=r)
        self.tasks = Counter(
            "dinolabel_predicted_tasks", "Tasks answered by /predict, by outcome (ok, failed).", ["outcome"], registry=r
        )
        self.handed_off = Counter(
            "dinolabel_predict_handed_off_tasks", "/predict tasks handed to a bulk job (too many, or deadline).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.boxes = Counter("dinolabel_predicted_boxes", "Boxes returned by /predict.", registry=r)
        self.queue_depth = Gauge("dinolabel_queue_depth", "Jobs waiting, by queue.", ["queue"], registry=r)
        self.workers = Gauge(
            "dinolabel_workers", "Live workers, by state (loading, ready, failed).", ["state"], registry=r
        )
        self.model_load_seconds = Gauge(
            "dinolabel_model_load_seconds", "Model load time, by live worker.", ["worker"], registry=r
        )
        self.worker_tasks = Gauge(
            "dinolabel_worker_tasks_total", "Tasks predicted by bulk batches (counter kept in Redis), by outcome.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.batches = Gauge("dinolabel_batches_total", "Bulk batches finished (counter kept in Redis).", registry=r)
        self.batch_seconds = Gauge(
            "dinolabel_batch_seconds_total", "Seconds spent in bulk batches (counter kept in Redis).", registry=r
        )

        self.job_progress = Gauge(
            "dinolabel_job_tasks", "Tasks of running bulk jobs, by job and state (done, skipped, failed, remaining).",
            ["job", "state"], registry=r,
        )  # fmt: skip
        self.job_rate = Gauge(
            "dinolabel_job_tasks_per_second",
            "Tasks predicted per second by each running bulk job.",
            ["job"],
            registry=r,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 500:
            self.errors.labels(route).inc()

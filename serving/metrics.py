"""Prometheus metrics of the gateway, correct under several gunicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``captioner serve`` sets it when it starts more than one
worker), every worker writes its samples there and ``/metrics`` aggregates them; otherwise a
registry of this process is used.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self):
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # Per-app registry: tests create several apps in one process.
        self.registry = None if self.multiprocess else CollectorRegistry()
        kw = {} if self.multiprocess else {"registry": self.registry}
        self.requests = Counter("captioner_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "method", "status"], **kw)
        self.latency = Histogram("captioner_request_latency_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, **kw)
        self.errors = Counter("captioner_errors_total", "Errors by kind", ["kind"], **kw)
        self.in_flight = Gauge("captioner_in_flight_requests", "Requests being served", **kw,
                               **({"multiprocess_mode": "livesum"} if self.multiprocess else {}))
        self.model_version = Gauge("captioner_model_version", "Model version being served", ["model"], **kw,
                                   **({"multiprocess_mode": "max"} if self.multiprocess else {}))
        self.started = Gauge("captioner_start_time_seconds", "Unix time the gateway started", **kw,
                             **({"multiprocess_mode": "min"} if self.multiprocess else {}))
        self.uptime = Gauge("captioner_uptime_seconds", "Seconds since the gateway started", **kw,
                            **({"multiprocess_mode": "max"} if self.multiprocess else {}))
        self.start_time = time.time()
        self.started.set(self.start_time)

    def exposition(self) -> tuple[bytes, str]:
        self.uptime.set(time.time() - self.start_time)
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        return generate_latest(registry), CONTENT_TYPE_LATEST

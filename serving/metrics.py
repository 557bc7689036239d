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
# One backend call (a signature) is much shorter than a request: finer buckets at the low end.
CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STEP_BUCKETS = (1, 2, 4, 6, 8, 10, 12, 15, 20, 25, 30, 40, 60)
# Rows (images x beams) of one batched model call; the default batch holds up to 128.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Time in the batch scheduler's queue: about the batch timeout (1 ms) when idle, up to an encode call when busy.
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


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
        # livemostrecent: the version that answered last among live workers. A dead worker's sample
        # goes with it (``mark_process_dead``), and a rollback shows at once, where ``max`` kept
        # the highest version any worker had ever served.
        self.model_version = Gauge("captioner_model_version", "Model version being served", ["model"], **kw,
                                   **({"multiprocess_mode": "livemostrecent"} if self.multiprocess else {}))
        self.started = Gauge("captioner_start_time_seconds", "Unix time the gateway started", **kw,
                             **({"multiprocess_mode": "min"} if self.multiprocess else {}))
        self.uptime = Gauge("captioner_uptime_seconds", "Seconds since the gateway started", **kw,
                            **({"multiprocess_mode": "livemax"} if self.multiprocess else {}))
        self.backend_latency = Histogram("captioner_backend_call_seconds",
                                         "Latency of one model call, by signature (encode, decode_step, metadata)",
                                         ["signature"], buckets=CALL_BUCKETS, **kw)
        self.decode_steps = Histogram("captioner_decode_steps", "Decode steps per request", buckets=STEP_BUCKETS,
                                      **kw)
        self.batch_rows = Histogram("captioner_batch_rows",
                                    "Rows (images x beams) of one model call of the local backend's batch scheduler, "
                                    "by signature (in_process_decode: a request decoded alone)",
                                    ["signature"], buckets=BATCH_BUCKETS, **kw)
        self.batch_queue = Histogram("captioner_batch_queue_seconds",
                                     "Time a request waited in the batch scheduler's queue before it was encoded",
                                     buckets=QUEUE_BUCKETS, **kw)
        self.start_time = time.time()
        self.started.set(self.start_time)

    def observe_call(self, signature: str, seconds: float) -> None:
        """Hook for backends (``backend.on_call``): one call of ``signature`` took ``seconds``."""
        self.backend_latency.labels(str(signature)).observe(float(seconds))

    def observe_decode(self, steps: int) -> None:
        """Hook for backends (``backend.on_decode``): one request's search ran ``steps`` steps."""
        self.decode_steps.observe(int(steps))

    def observe_batch(self, signature: str, rows: int) -> None:
        """Hook for backends (``backend.on_batch``): one batched call of ``signature`` had ``rows`` rows."""
        self.batch_rows.labels(str(signature)).observe(int(rows))

    def observe_queue(self, seconds: float) -> None:
        """Hook for backends (``backend.on_queue``): a request waited ``seconds`` to be scheduled."""
        self.batch_queue.observe(float(seconds))

    def exposition(self) -> tuple[bytes, str]:
        self.uptime.set(time.time() - self.start_time)
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        return generate_latest(registry), CONTENT_TYPE_LATEST

"""The service's Prometheus metrics, in a registry of its own (one per app, so that tests
can make several apps in one process), and the middleware that counts every request."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNMATCHED_ROUTE = "unmatched"  # any path no route serves: one label, not one per path


class ServiceMetrics:
    def __init__(
        self,
        waiting: Callable[[], int],
        in_queue: Callable[[], int],
        fetching: Callable[[], int],
        body_bytes: Callable[[], int],
    ):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "artstyle_requests",
            "HTTP requests answered, by route template and status.",
            ("route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "artstyle_request_seconds",
            "Time from a request's arrival to its answer, by route template.",
            ("route",),
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "artstyle_batch_size",
            "Images per model call (before padding to the batch shape).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.model_seconds = Histogram(
            "artstyle_model_seconds",
            "Time of one model call.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        queue_depth = Gauge(
            "artstyle_queue_depth",
            "Images waiting for the model.",
            registry=self.registry,
        )
        queue_depth.set_function(waiting)
        in_service = Gauge(
            "artstyle_requests_in_service",
            "Places taken in the queue: images from when their bytes are in hand (decoding, "
            "waiting, computing) until their answer.",
            registry=self.registry,
        )
        in_service.set_function(in_queue)
        being_fetched = Gauge(
            "artstyle_urls_in_service",
            "Places taken by URLs: from before they are fetched until their answer.",
            registry=self.registry,
        )
        being_fetched.set_function(fetching)
        bodies = Gauge(
            "artstyle_body_bytes",
            "Bytes of request bodies in memory: received so far, not yet answered.",
            registry=self.registry,
        )
        bodies.set_function(body_bytes)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.model_seconds.observe(seconds)


class RequestMetrics:
    """ASGI middleware: each HTTP request counted by its route's template (`/predict`, not
    the path a client made up) and its status, and timed."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped every handler

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

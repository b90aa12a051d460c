"""Prometheus metrics of the REST gateway (`llm-mesh gateway --metrics-port`, /metrics):

- llm_mesh_gateway_requests_total{route, code}    HTTP requests by route and status code (a stream
                                                  that fails after its 200 counts as 200)
- llm_mesh_gateway_request_seconds{route}         until the response is complete (streams: to the last event)
- llm_mesh_gateway_open_streams                   SSE responses being streamed now
- llm_mesh_etcd_lease_* (services/metrics.watch_lease, kind="gateway") when registered in etcd

`route` is the route's path, or "other" for any path the gateway does not serve (bounded
cardinality whatever clients send).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services import metrics

ASGIApp = Any  # (scope, receive, send) -> Awaitable[None]


class GatewayMetrics:
    def __init__(self, routes: Iterable[str], registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self._routes = frozenset(routes)
        self.requests = Counter("llm_mesh_gateway_requests", "HTTP requests", ["route", "code"], registry=r)
        self.seconds = Histogram("llm_mesh_gateway_request_seconds", "HTTP request duration", ["route"],
                                 buckets=metrics.LATENCY_BUCKETS, registry=r)
        self.open_streams = Gauge("llm_mesh_gateway_open_streams", "SSE responses being streamed", registry=r)

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """`app` as ASGI middleware that measures every HTTP request."""

        async def measured(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            route = scope["path"] if scope["path"] in self._routes else "other"
            started, status, streaming = time.monotonic(), 500, False

            async def observed_send(message: dict[str, Any]) -> None:
                nonlocal status, streaming
                if message["type"] == "http.response.start":
                    status = message["status"]
                    headers = dict(message.get("headers", ()))
                    streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
                    if streaming:
                        self.open_streams.inc()
                await send(message)

            try:
                await app(scope, receive, observed_send)
            finally:
                if streaming:
                    self.open_streams.dec()
                self.requests.labels(route, str(status)).inc()
                self.seconds.labels(route).observe(time.monotonic() - started)

        return measured

    def watch_lease(self, registration: metrics.LeaseState) -> None:
        metrics.watch_lease(self.registry, registration)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        metrics.serve(self.registry, port, host)

"""Prometheus metrics shared by every genloom server (exposed over HTTP when GENLOOM_METRICS_PORT >= 0)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

RPC_REQUESTS = Counter(
    "genloom_rpc_requests", "RPCs finished, by method and gRPC status code.", ["service", "method", "code"]
)
RPC_LATENCY = Histogram(
    "genloom_rpc_duration_seconds",
    "Wall time of an RPC from handler start to its last message.",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
RPC_IN_FLIGHT = Gauge("genloom_rpc_in_flight", "RPCs being handled now.", ["service", "method"])


def split_method(full_method: str) -> tuple[str, str]:
    """'/genloom.v1.TokenizerService/Tokenize' -> ('genloom.v1.TokenizerService', 'Tokenize')."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def serve_metrics(host: str, port: int) -> int:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return bound

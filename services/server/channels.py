"""gRPC channel settings the servers use when they call other genloom servers (the task service's channels to the
tokenizer and inference services, services/tasks/upstream.py), and the text by which gRPC reports an overloaded
server. The servers share only the protos with the SDK, never its client code: these values are the servers' own
(the SDK's client keeps the same ones for its channels, in genloom/_transport.py)."""

from __future__ import annotations

KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 20_000
# A server that stops answering without closing the connection (a frozen process, a lost node, a network
# partition) is noticed within keepalive time + timeout, so a call or stream on it fails with UNAVAILABLE instead
# of waiting for its deadline (or forever, without one). Pings go on while a call waits for data; genloom servers
# accept one every 5 s (services/server/app.py). gRPC core times a ping out after the shorter of
# keepalive_timeout and ping_timeout (default 1 minute), hence both.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),
)

OVERLOADED_SERVER_MESSAGE = "Concurrent RPC limit exceeded!"
"""The text grpcio itself sends (RESOURCE_EXHAUSTED, no details) when a server refuses a call over its
maximum_concurrent_rpcs (GENLOOM_MAX_CONCURRENT_RPCS, services/server/app.py): the call never ran, so it is safe
and worth retrying, like an answer with RetryInfo."""

"""Channels, metadata, deadlines, retries and error conversion for the sync and async clients."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio

from genloom._exceptions import APIStatusError, error_from_rpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 2
# Codes worth retrying: the server was not there or asked us to slow down. Anything else would fail again.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 8.0
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 20_000
# A server that stops answering without closing the connection (a frozen process, a lost node, a network
# partition) is noticed within keepalive time + timeout, so a call or stream on it fails with UNAVAILABLE instead
# of waiting for its deadline (or forever, without one). Pings go on while a call waits for data; genloom servers
# accept one every 5 s. gRPC core times a ping out after the shorter of keepalive_timeout and ping_timeout
# (default 1 minute), hence both. The task service's channels to its backends use these too.
KEEPALIVE_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),
)
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.lb_policy_name", "round_robin"),
    *KEEPALIVE_OPTIONS,
)
Response = TypeVar("Response")


@dataclass(frozen=True)
class ClientOptions:
    """What the sync and async clients share: resolved from arguments, then GENLOOM_* env vars, then defaults."""

    target: str
    api_key: str | None
    timeout: float | None
    max_retries: int
    tls: bool
    root_certificates: bytes | None
    metadata: tuple[tuple[str, str], ...]
    channel_options: tuple[tuple[str, Any], ...]

    @classmethod
    def resolve(
        cls,
        *,
        target: str | None,
        api_key: str | None,
        timeout: float | object | None,
        max_retries: int,
        tls: bool | None,
        root_certificates: bytes | None,
        metadata: Sequence[tuple[str, str]],
        channel_options: Sequence[tuple[str, Any]],
    ) -> ClientOptions:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        resolved_timeout: float | None
        if timeout is _DEFAULT:
            env = os.environ.get("GENLOOM_TIMEOUT")
            resolved_timeout = float(env) if env else DEFAULT_TIMEOUT
        else:
            resolved_timeout = timeout  # type: ignore[assignment]
        return cls(
            target=target or os.environ.get("GENLOOM_TARGET") or DEFAULT_TARGET,
            api_key=api_key if api_key is not None else os.environ.get("GENLOOM_API_KEY") or None,
            timeout=resolved_timeout,
            max_retries=max_retries,
            tls=bool(tls) or root_certificates is not None,
            root_certificates=root_certificates,
            metadata=tuple(metadata),
            # gRPC uses the first of two options with the same name: the caller's replace the defaults.
            channel_options=tuple({**dict(DEFAULT_CHANNEL_OPTIONS), **dict(channel_options)}.items()),
        )

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        md = [*self.metadata, ("x-request-id", uuid.uuid4().hex)]
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        return tuple(md)

    def credentials(self) -> grpc.ChannelCredentials | None:
        return grpc.ssl_channel_credentials(self.root_certificates) if self.tls else None


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


_DEFAULT: Any = _Default()
"""Sentinel: 'use the client's setting' (None is a meaningful timeout: no deadline)."""


def backoff_delay(attempt: int, error: APIStatusError) -> float:
    """Seconds to wait before retry number `attempt` (0-based): the server's RetryInfo if it sent one,
    else exponential from 0.5 s up to 8 s, with jitter so that many clients don't retry in lockstep."""
    if error.retry_after is not None:
        return min(max(float(error.retry_after), 0.0), 60.0)
    base = min(INITIAL_BACKOFF * 2.0**attempt, MAX_BACKOFF)
    return base * (1 - 0.25 * random.random())


class SyncTransport:
    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        creds = options.credentials()
        opts = list(options.channel_options)
        self.channel = (
            grpc.secure_channel(options.target, creds, opts) if creds else grpc.insecure_channel(options.target, opts)
        )

    def unary(
        self,
        method: Callable[..., Response],
        request: Any,
        *,
        timeout: float | object | None = _DEFAULT,
        retry: bool = True,
    ) -> Response:
        deadline = self.options.timeout if timeout is _DEFAULT else timeout
        attempts = self.options.max_retries + 1 if retry else 1
        metadata = self.options.call_metadata()  # one request id across retries
        for attempt in range(attempts):
            try:
                return method(request, timeout=deadline, metadata=metadata)
            except grpc.RpcError as rpc_error:
                error = error_from_rpc(rpc_error)
                if error.code not in RETRYABLE or attempt == attempts - 1:
                    raise error from None
                time.sleep(backoff_delay(attempt, error))
        raise AssertionError("unreachable")

    def stream(self, method: Callable[..., Any], request: Any, *, timeout: float | object | None = _DEFAULT) -> Any:
        """Start a server-streaming call; see `_StreamCall`."""
        deadline: float | None = self.options.timeout if timeout is _DEFAULT else timeout  # type: ignore[assignment]
        return _StreamCall(method, request, deadline, self.options.call_metadata(), self.options.max_retries)

    def close(self) -> None:
        self.channel.close()


class AsyncTransport:
    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        creds = options.credentials()
        opts = list(options.channel_options)
        self.channel = (
            grpc.aio.secure_channel(options.target, creds, opts)
            if creds
            else grpc.aio.insecure_channel(options.target, opts)
        )

    async def unary(
        self,
        method: Callable[..., Awaitable[Response]],
        request: Any,
        *,
        timeout: float | object | None = _DEFAULT,
        retry: bool = True,
    ) -> Response:
        deadline = self.options.timeout if timeout is _DEFAULT else timeout
        attempts = self.options.max_retries + 1 if retry else 1
        metadata = self.options.call_metadata()
        for attempt in range(attempts):
            try:
                return await method(request, timeout=deadline, metadata=metadata)
            except grpc.RpcError as rpc_error:
                error = error_from_rpc(rpc_error)
                if error.code not in RETRYABLE or attempt == attempts - 1:
                    raise error from None
                await asyncio.sleep(backoff_delay(attempt, error))
        raise AssertionError("unreachable")

    def stream(self, method: Callable[..., Any], request: Any, *, timeout: float | object | None = _DEFAULT) -> Any:
        """Start a server-streaming call; see `_AsyncStreamCall`."""
        deadline: float | None = self.options.timeout if timeout is _DEFAULT else timeout  # type: ignore[assignment]
        return _AsyncStreamCall(method, request, deadline, self.options.call_metadata(), self.options.max_retries)

    async def close(self) -> None:
        await self.channel.close()


class _StreamCallBase:
    """A server-streaming call that is started again, like a unary call, when it fails with a retryable code
    before its first message (a replica that was shutting down or died as the call began, an overloaded
    server): nothing was delivered, so nothing is repeated. After the first message a failure is the caller's
    to see. Iterating gives the messages; errors are the original grpc.RpcError; `cancel()` ends the call."""

    def __init__(
        self,
        method: Callable[..., Any],
        request: Any,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...],
        max_retries: int,
    ) -> None:
        self._method, self._request, self._timeout, self._metadata = method, request, timeout, metadata
        self._max_retries = max_retries
        self._cancelled = False
        self._call = self._start()

    def _start(self) -> Any:
        return self._method(self._request, timeout=self._timeout, metadata=self._metadata)

    def cancel(self) -> bool:
        self._cancelled = True
        return bool(self._call.cancel())

    def _retry_delay(self, rpc_error: grpc.RpcError, attempt: int, received: bool) -> float | None:
        """Seconds to wait before starting the call again, or None to give up."""
        if received or self._cancelled or attempt >= self._max_retries:
            return None
        error = error_from_rpc(rpc_error)
        return backoff_delay(attempt, error) if error.code in RETRYABLE else None


class _StreamCall(_StreamCallBase):
    def __iter__(self) -> Iterator[Any]:
        attempt = 0
        while True:
            received = False
            try:
                for message in self._call:
                    received = True
                    yield message
                return
            except grpc.RpcError as rpc_error:
                delay = self._retry_delay(rpc_error, attempt, received)
                if delay is None:
                    raise
            time.sleep(delay)
            attempt += 1
            self._call = self._start()


class _AsyncStreamCall(_StreamCallBase):
    async def __aiter__(self) -> AsyncIterator[Any]:
        attempt = 0
        while True:
            received = False
            try:
                async for message in self._call:
                    received = True
                    yield message
                return
            except grpc.RpcError as rpc_error:
                delay = self._retry_delay(rpc_error, attempt, received)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1
            self._call = self._start()

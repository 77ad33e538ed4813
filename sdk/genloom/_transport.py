"""Channels, metadata, deadlines, retries and error conversion for the sync and async clients."""

from __future__ import annotations

import asyncio
import logging
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
DEFAULT_MAX_RETRIES = 8
"""Retries of a call (see `is_retryable`). Under overload a call needs as many tries as it takes for a slot to
free up: with two, 15-16 of 40 clients got through a queue of 4 (tests/sdk/test_sdk_overload.py), with eight all of
them. Eight waits take 20-28 s on average (0.5 s doubling to 8 s, plus any RetryInfo), within the default 60 s
timeout, which bounds them all anyway."""
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 8.0
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 20_000
# A server that stops answering without closing the connection (a frozen process, a lost node, a network
# partition) is noticed within keepalive time + timeout, so a call or stream on it fails with UNAVAILABLE instead
# of waiting for its deadline (or forever, without one). Pings go on while a call waits for data; genloom servers
# accept one every 5 s. gRPC core times a ping out after the shorter of keepalive_timeout and ping_timeout
# (default 1 minute), hence both. (The servers' own channels use the same values: services/server/channels.py.)
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
logger = logging.getLogger(__name__)


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

    def retry_budget(self, method: Any, timeout: float | object | None, retry: bool = True) -> RetryBudget:
        """The attempts of one call: `timeout` (the client's by default) is its deadline, restarts included, and
        its metadata carries one request id across them."""
        resolved: float | None = self.timeout if timeout is _DEFAULT else timeout  # type: ignore[assignment]
        return RetryBudget(method, resolved, self.max_retries if retry else 0, self.call_metadata())


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


_DEFAULT: Any = _Default()
"""Sentinel: 'use the client's setting' (None is a meaningful timeout: no deadline)."""


OVERLOADED_SERVER_MESSAGE = "Concurrent RPC limit exceeded!"
"""What a gRPC server answers (RESOURCE_EXHAUSTED, no details) to a call over its maximum_concurrent_rpcs
(GENLOOM_MAX_CONCURRENT_RPCS): the call never ran, so it is safe and worth retrying like a RetryInfo answer."""
MAX_RETRY_INFO_DELAY = 60.0
"""The longest RetryInfo delay honoured; a server asking for more is waited on for this long."""


def is_retryable(error: APIStatusError) -> bool:
    """Whether a failed call is worth sending again: the server was not there (UNAVAILABLE) or said it is
    overloaded. RESOURCE_EXHAUSTED alone does not say that: gRPC also uses it for limits that fail the same way
    every time (a status over the client's metadata limit, a message over the size limit), which carry no
    RetryInfo. Only the server's overload answer does (or the bare refusal of a full maximum_concurrent_rpcs)."""
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return True
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error.retry_after is not None or error.message == OVERLOADED_SERVER_MESSAGE
    return False


def retry_floor(error: APIStatusError | None) -> float:
    """The least time to wait before retrying: the server's RetryInfo delay (capped), else 0."""
    if error is None or error.retry_after is None:
        return 0.0
    return min(max(float(error.retry_after), 0.0), MAX_RETRY_INFO_DELAY)


def backoff_delay(
    attempt: int,
    error: APIStatusError | None = None,
    *,
    within: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number `attempt` (0-based): the server's RetryInfo delay, if any, plus a
    uniformly random share of an exponential window (0.5 s doubling to 8 s). The server's delay is a floor,
    since retrying sooner only asks again what it just refused; the random part spreads clients that were
    refused at the same moment (all of them get the same RetryInfo), and the growing window thins retries out
    while the overload lasts. `within`: what is left of the call's deadline; the random part then ends halfway
    between the floor and the deadline, so that the retry has time left to run (the floor itself is never cut:
    callers give up when it does not fit)."""
    floor = retry_floor(error)
    window = min(INITIAL_BACKOFF * 2.0 ** max(attempt, 0), MAX_BACKOFF)
    if within is not None:
        window = max(0.0, min(window, (within - floor) / 2))
    return floor + (rng or random).uniform(0.0, window)


def _method_name(method: Any) -> str:
    name = getattr(method, "_method", None)  # grpc's multi-callables keep their "/package.Service/Method"
    return name.decode() if isinstance(name, bytes) else str(name or "call")


class RetryBudget:
    """The retries of one call: at most `max_retries`, all within one deadline (`timeout` seconds from now;
    None: no deadline). Each attempt gets what is left of the deadline as its gRPC deadline, and a retry is
    given up rather than started after the deadline. Attempts and delays are logged at DEBUG."""

    def __init__(
        self, method: Any, timeout: float | None, max_retries: int, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.metadata = metadata
        """Sent with every attempt: one request id (x-request-id) for all of them."""
        request_id = next((value for key, value in metadata if key == "x-request-id"), "")
        self.name = f"{_method_name(method)} (request {request_id})" if request_id else _method_name(method)
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.max_retries = max_retries
        self.attempts = 0
        """Attempts started so far."""

    def start(self) -> float | None:
        """Count an attempt; its gRPC timeout (what is left of the deadline)."""
        self.attempts += 1
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.0)

    def next_delay(self, error: APIStatusError) -> float | None:
        """Seconds to wait before the next attempt after `error`, or None to give up with it."""
        if not is_retryable(error):
            if self.attempts > 1:
                logger.debug("%s: attempt %d failed with %s; not retryable", self.name, self.attempts, error.code.name)
            return None
        if self.attempts > self.max_retries:
            logger.debug(
                "%s: giving up after %d attempts (max_retries=%d): %s",
                self.name,
                self.attempts,
                self.max_retries,
                error.code.name,
            )
            return None
        remaining = None if self.deadline is None else self.deadline - time.monotonic()
        if remaining is not None and retry_floor(error) >= remaining:
            logger.debug(
                "%s: giving up after %d attempts: %s asks to wait %.2f s, %.2f s is left of the %s s timeout",
                self.name,
                self.attempts,
                error.code.name,
                retry_floor(error),
                max(remaining, 0.0),
                self.timeout,
            )
            return None
        delay = backoff_delay(self.attempts - 1, error, within=remaining)
        logger.debug(
            "%s: attempt %d failed with %s (RetryInfo %s s); retry %d of %d in %.2f s (%s)",
            self.name,
            self.attempts,
            error.code.name,
            error.retry_after,
            self.attempts,
            self.max_retries,
            delay,
            "no timeout" if remaining is None else f"{remaining:.2f} s left of the {self.timeout} s timeout",
        )
        return delay


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
        budget = self.options.retry_budget(method, timeout, retry)
        while True:
            try:
                return method(request, timeout=budget.start(), metadata=budget.metadata)
            except grpc.RpcError as rpc_error:
                error = error_from_rpc(rpc_error, attempts=budget.attempts)
                delay = budget.next_delay(error)
                if delay is None:
                    raise error from None
            time.sleep(delay)

    def stream(self, method: Callable[..., Any], request: Any, *, timeout: float | object | None = _DEFAULT) -> Any:
        """Start a server-streaming call; see `_StreamCall`."""
        return _StreamCall(method, request, self.options.retry_budget(method, timeout))

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
        budget = self.options.retry_budget(method, timeout, retry)
        while True:
            try:
                return await method(request, timeout=budget.start(), metadata=budget.metadata)
            except grpc.RpcError as rpc_error:
                error = error_from_rpc(rpc_error, attempts=budget.attempts)
                delay = budget.next_delay(error)
                if delay is None:
                    raise error from None
            await asyncio.sleep(delay)

    def stream(self, method: Callable[..., Any], request: Any, *, timeout: float | object | None = _DEFAULT) -> Any:
        """Start a server-streaming call; see `_AsyncStreamCall`."""
        return _AsyncStreamCall(method, request, self.options.retry_budget(method, timeout))

    async def close(self) -> None:
        await self.channel.close()


class _StreamCallBase:
    """A server-streaming call that is started again, like a unary call, when it fails with a retryable code
    before its first message (a replica that was shutting down or died as the call began, an overloaded
    server): nothing was delivered, so nothing is repeated. After the first message a failure is the caller's
    to see. The timeout covers the whole stream, restarts included. Iterating gives the messages; errors are the
    original grpc.RpcError; `cancel()` ends the call."""

    def __init__(self, method: Callable[..., Any], request: Any, budget: RetryBudget) -> None:
        self._method, self._request, self._budget = method, request, budget
        self._cancelled = False
        self._call = self._start()

    def _start(self) -> Any:
        return self._method(self._request, timeout=self._budget.start(), metadata=self._budget.metadata)

    def cancel(self) -> bool:
        self._cancelled = True
        return bool(self._call.cancel())

    def _retry_delay(self, rpc_error: grpc.RpcError, received: bool) -> float | None:
        """Seconds to wait before starting the call again, or None to give up."""
        if received or self._cancelled:
            return None
        return self._budget.next_delay(error_from_rpc(rpc_error, attempts=self._budget.attempts))


class _StreamCall(_StreamCallBase):
    def __iter__(self) -> Iterator[Any]:
        while True:
            received = False
            try:
                for message in self._call:
                    received = True
                    yield message
                return
            except grpc.RpcError as rpc_error:
                delay = self._retry_delay(rpc_error, received)
                if delay is None:
                    raise
            time.sleep(delay)
            self._call = self._start()


class _AsyncStreamCall(_StreamCallBase):
    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            received = False
            try:
                async for message in self._call:
                    received = True
                    yield message
                return
            except grpc.RpcError as rpc_error:
                delay = self._retry_delay(rpc_error, received)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            self._call = self._start()

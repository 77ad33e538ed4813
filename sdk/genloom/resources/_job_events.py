"""Watching a job: `JobEventStream` (sync) and `AsyncJobEventStream` (asyncio), which reopen a dropped
WatchJob stream after the last event received, so the caller sees each event once, in order. Returned by
`client.finetune.watch()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any

import grpc

from genloom._exceptions import APIStatusError, UnavailableError, WaitTimeoutError, error_from_rpc
from genloom._transport import INITIAL_BACKOFF, MAX_BACKOFF, backoff_delay, is_retryable
from genloom.types._finetune_enums import JobStateName
from genloom.types._finetune_records import JobEvent, JobMetrics
from genloom.v1 import finetune_pb2

DEFAULT_MAX_RECONNECTS = 8
"""Consecutive reconnections `watch()` tries without receiving an event (about a minute of backoff) before it
raises: long enough for a server restart, short enough to notice one that is gone."""
# Codes after which the same WatchJob is worth reopening: the connection or server went away (UNAVAILABLE), the
# server cancelled the call while shutting down (CANCELLED, when not our own close()); and, through is_retryable,
# the server's overload answer (not every RESOURCE_EXHAUSTED: a status over the metadata limit would come back).
_RECONNECT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})


class _WatchState:
    """What the sync and async event streams share: the resume point, de-duplication, the latest state and
    metrics, and the reconnection policy."""

    def __init__(
        self,
        job_id: str,
        after_event_id: str | None,
        follow: bool,
        timeout: float | None,
        max_reconnects: int,
        metadata: Callable[[], Any],
    ) -> None:
        if not job_id:
            raise ValueError("job_id must not be empty")
        if max_reconnects < 0:
            raise ValueError("max_reconnects must be 0 or more")
        self.job_id = job_id
        """The job watched."""
        self.last_event_id = after_event_id or ""
        """The id of the last event received ("" before any): where a reconnection resumes."""
        self.state: JobStateName | None = None
        """The job's state as of the last state-change event received (None before one)."""
        self.metrics: JobMetrics | None = None
        """The latest metrics received."""
        self.final: JobEvent | None = None
        """The job's terminal state-change event, once received (the stream ends there)."""
        self.reconnects = 0
        """How many times the stream was reopened."""
        self._follow = follow
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._max_reconnects = max_reconnects
        self._metadata = metadata
        self._seen: set[str] = set()
        self._call: Any = None
        self._closed = False

    def _request(self) -> finetune_pb2.WatchJobRequest:
        request = finetune_pb2.WatchJobRequest(job_id=self.job_id, after_event_id=self.last_event_id)
        request.follow = self._follow
        return request

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeoutError(f"stopped watching job {self.job_id}: the timeout passed (the job carries on)")
        return remaining

    def _accept(self, message: finetune_pb2.WatchJobResponse) -> JobEvent | None:
        """The event, or None for one already delivered (a server that resent it after a reconnection)."""
        event = JobEvent.from_pb(message.event)
        if event.id and event.id in self._seen:
            return None
        if event.id:
            self._seen.add(event.id)
            self.last_event_id = event.id
        if event.type == "state_change" and event.state is not None:
            self.state = event.state
        if event.metrics is not None:
            self.metrics = event.metrics
        if event.is_terminal:
            self.final = event
        return event

    def _after_break(self, error: APIStatusError | None, failures: int) -> float:
        """Decide about a stream that ended before the job's terminal event: raise, or return seconds to wait
        before reopening it. `error` is None for a stream the server closed normally."""
        if error is not None:
            if self._closed:
                raise error
            code = error.code
            retryable = (
                code in _RECONNECT
                or is_retryable(error)
                or (code == grpc.StatusCode.INTERNAL and "RST_STREAM" in error.message)
            )
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and self._deadline is not None:
                self._remaining()
            if not retryable:
                raise error
        if failures > self._max_reconnects:
            if error is not None:
                raise error
            raise UnavailableError(
                f"the event stream of job {self.job_id} kept ending before the job finished "
                f"({failures} times in a row without an event)"
            )
        delay = (
            backoff_delay(failures - 1, error)
            if error is not None
            else min(INITIAL_BACKOFF * 2.0 ** (failures - 1), MAX_BACKOFF)
        )
        remaining = self._remaining()
        if remaining is not None and delay >= remaining:
            raise WaitTimeoutError(f"stopped watching job {self.job_id}: the timeout passed (the job carries on)")
        self.reconnects += 1
        return delay

    def close(self) -> None:
        """Stop watching (cancels the open call; the job itself carries on)."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()


class JobEventStream(_WatchState):
    """A job's events, oldest first, as `JobEvent`s; with follow (the default) it ends after the job's terminal
    state-change event (`final`). A dropped stream is reopened after the last event received, so no event is
    missed or repeated. Use it as a context manager, or `close()` it, to stop early."""

    def __init__(
        self,
        stub: Any,
        job_id: str,
        *,
        after_event_id: str | None,
        follow: bool,
        timeout: float | None,
        max_reconnects: int,
        metadata: Callable[[], Any],
    ) -> None:
        super().__init__(
            job_id,
            after_event_id=after_event_id,
            follow=follow,
            timeout=timeout,
            max_reconnects=max_reconnects,
            metadata=metadata,
        )
        self._stub = stub

    def __iter__(self) -> Iterator[JobEvent]:
        failures = 0
        try:
            while not self._closed:
                error: APIStatusError | None = None
                self._call = self._stub.WatchJob(self._request(), timeout=self._remaining(), metadata=self._metadata())
                try:
                    for message in self._call:
                        event = self._accept(message)
                        if event is None:
                            continue
                        failures = 0
                        yield event
                        if self.final is not None:
                            return
                except grpc.RpcError as err:
                    error = error_from_rpc(err)
                    if self._closed:
                        return
                else:
                    if not self._follow or self._closed:
                        return
                failures += 1
                time.sleep(self._after_break(error, failures))
        finally:
            self.close()

    def __enter__(self) -> JobEventStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncJobEventStream(_WatchState):
    """`JobEventStream` for asyncio: `async for event in stream`."""

    def __init__(
        self,
        stub: Any,
        job_id: str,
        *,
        after_event_id: str | None,
        follow: bool,
        timeout: float | None,
        max_reconnects: int,
        metadata: Callable[[], Any],
    ) -> None:
        super().__init__(
            job_id,
            after_event_id=after_event_id,
            follow=follow,
            timeout=timeout,
            max_reconnects=max_reconnects,
            metadata=metadata,
        )
        self._stub = stub

    async def __aiter__(self) -> AsyncIterator[JobEvent]:
        failures = 0
        try:
            while not self._closed:
                error: APIStatusError | None = None
                self._call = self._stub.WatchJob(self._request(), timeout=self._remaining(), metadata=self._metadata())
                try:
                    async for message in self._call:
                        event = self._accept(message)
                        if event is None:
                            continue
                        failures = 0
                        yield event
                        if self.final is not None:
                            return
                except grpc.RpcError as err:
                    error = error_from_rpc(err)
                    if self._closed:
                        return
                except asyncio.CancelledError:
                    if self._closed:  # our own close() from another task cancelled the call
                        return
                    raise
                else:
                    if not self._follow or self._closed:
                        return
                failures += 1
                await asyncio.sleep(self._after_break(error, failures))
        finally:
            self.close()

    async def __aenter__(self) -> AsyncJobEventStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

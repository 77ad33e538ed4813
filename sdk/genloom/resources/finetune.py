"""`client.finetune`: fine-tuning jobs (create, get, list, cancel, checkpoints, watch, wait) and
`client.finetune.sweeps`: hyperparameter sweeps.

Like openai-python's `fine_tuning.jobs`: `list()` returns a page that iterates over every job of every page,
fetching the next page as it goes. `watch()` streams a job's events and survives a server restart or a dropped
connection: it reconnects with the last event id it received, so the caller sees each event once, in order.
`create()` sends an idempotency key (made up when none is given) so that a retried call never creates two jobs.
"""

from __future__ import annotations

import asyncio
import builtins
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc

from genloom._exceptions import APIStatusError, GenLoomError, UnavailableError, error_from_rpc
from genloom._transport import (
    _DEFAULT,
    INITIAL_BACKOFF,
    MAX_BACKOFF,
    AsyncTransport,
    SyncTransport,
    backoff_delay,
    is_retryable,
)
from genloom.types.finetune import (
    JOB_STATES,
    SORT_ORDERS,
    SWEEP_METHODS,
    SWEEP_OBJECTIVES,
    SWEEP_STATES,
    Checkpoint,
    DataFormatName,
    FineTuneJob,
    FineTuneMethodName,
    FineTuneSpec,
    HyperparametersLike,
    JobEvent,
    JobMetrics,
    JobStateName,
    SearchSpaceLike,
    SortOrderName,
    Sweep,
    SweepMethodName,
    SweepObjectiveName,
    SweepStateName,
    TaskOptions,
    TrainingFile,
    WaitTimeoutError,
    _states,
    search_space_to_pb,
    webhook_to_pb,
)
from genloom.types.tasks import TaskName, enum_value
from genloom.v1 import finetune_pb2, finetune_pb2_grpc

T = TypeVar("T")

DEFAULT_MAX_RECONNECTS = 8
"""Consecutive reconnections `watch()` tries without receiving an event (about a minute of backoff) before it
raises: long enough for a server restart, short enough to notice one that is gone."""
# Codes after which the same WatchJob is worth reopening: the connection or server went away (UNAVAILABLE), the
# server cancelled the call while shutting down (CANCELLED, when not our own close()); and, through is_retryable,
# the server's overload answer (not every RESOURCE_EXHAUSTED: a status over the metadata limit would come back).
_RECONNECT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})
_TERMINAL_SETTLE_POLLS = 10
_TERMINAL_SETTLE_DELAY = 0.2


def _new_idempotency_key(key: str | None) -> str:
    """The caller's key; "" for none; a fresh one for None, so the transport's retries reuse it."""
    return f"genloom-sdk-{uuid.uuid4().hex}" if key is None else key


def _create_job_request(spec: FineTuneSpec, options: Mapping[str, Any]) -> finetune_pb2.CreateJobRequest:
    request = finetune_pb2.CreateJobRequest(
        spec=spec.to_pb(), idempotency_key=_new_idempotency_key(options["idempotency_key"])
    )
    webhook = webhook_to_pb(options["webhook_url"], options["webhook_secret"])
    if webhook is not None:
        request.webhook.CopyFrom(webhook)
    return request


def _job_spec(arguments: Mapping[str, Any]) -> FineTuneSpec:
    """The FineTuneSpec of `create()`'s arguments."""
    names = FineTuneSpec.__dataclass_fields__
    return FineTuneSpec(**{k: v for k, v in arguments.items() if k in names})


def _list_jobs_request(
    state: Any, base_model: str | None, sweep_id: str | None, limit: int, order: SortOrderName
) -> finetune_pb2.ListJobsRequest:
    if limit < 1:
        raise ValueError("limit (the page size) must be at least 1")
    return finetune_pb2.ListJobsRequest(
        page_size=limit,
        states=_states(JOB_STATES, state, "state"),
        base_model=base_model or "",
        sweep_id=sweep_id or "",
        order=enum_value(SORT_ORDERS, order, "order"),
    )


def _create_sweep_request(
    base_job: FineTuneSpec | Mapping[str, Any],
    search_space: Mapping[str, SearchSpaceLike],
    options: Mapping[str, Any],
) -> finetune_pb2.CreateSweepRequest:
    for name, value in (("max_trials", options["max_trials"]), ("parallelism", options["parallelism"])):
        if value < 0:
            raise ValueError(f"{name} must be 0 (the server's default) or more")
    spec = finetune_pb2.SweepSpec(
        base_job=FineTuneSpec.coerce(base_job).to_pb(),
        search_space=search_space_to_pb(search_space),
        method=enum_value(SWEEP_METHODS, options["method"], "method"),
        max_trials=options["max_trials"],
        parallelism=options["parallelism"],
        objective=enum_value(SWEEP_OBJECTIVES, options["objective"], "objective")
        if options["objective"]
        else finetune_pb2.SWEEP_OBJECTIVE_UNSPECIFIED,
        seed=options["seed"],
    )
    request = finetune_pb2.CreateSweepRequest(
        spec=spec, idempotency_key=_new_idempotency_key(options["idempotency_key"])
    )
    webhook = webhook_to_pb(options["webhook_url"], options["webhook_secret"])
    if webhook is not None:
        request.webhook.CopyFrom(webhook)
    return request


def _list_sweeps_request(state: Any, limit: int, order: SortOrderName) -> finetune_pb2.ListSweepsRequest:
    if limit < 1:
        raise ValueError("limit (the page size) must be at least 1")
    return finetune_pb2.ListSweepsRequest(
        page_size=limit, states=_states(SWEEP_STATES, state, "state"), order=enum_value(SORT_ORDERS, order, "order")
    )


# --- pages ---------------------------------------------------------------------------------------------------------


class Page(Generic[T]):
    """One page of a list call. Iterating it yields every item of this page and of the pages after it (each
    fetched when reached); `data` is this page's items only."""

    def __init__(self, data: builtins.list[T], next_page_token: str, fetch: Callable[[str], Page[T]]) -> None:
        self.data = data
        """This page's items."""
        self.next_page_token = next_page_token
        """The token of the next page ("" on the last page)."""
        self._fetch = fetch

    def has_next_page(self) -> bool:
        return bool(self.next_page_token)

    def get_next_page(self) -> Page[T]:
        """Fetch the next page (a GenLoomError on the last page)."""
        if not self.next_page_token:
            raise GenLoomError("this is the last page")
        return self._fetch(self.next_page_token)

    def iter_pages(self) -> Iterator[Page[T]]:
        """This page and every page after it."""
        page: Page[T] = self
        yield page
        while page.has_next_page():
            page = page.get_next_page()
            yield page

    def __iter__(self) -> Iterator[T]:
        for page in self.iter_pages():
            yield from page.data


class AsyncPage(Generic[T]):
    """`Page` for asyncio: `async for item in page` yields every item of this and the following pages."""

    def __init__(
        self, data: builtins.list[T], next_page_token: str, fetch: Callable[[str], Awaitable[AsyncPage[T]]]
    ) -> None:
        self.data = data
        """This page's items."""
        self.next_page_token = next_page_token
        """The token of the next page ("" on the last page)."""
        self._fetch = fetch

    def has_next_page(self) -> bool:
        return bool(self.next_page_token)

    async def get_next_page(self) -> AsyncPage[T]:
        """Fetch the next page (a GenLoomError on the last page)."""
        if not self.next_page_token:
            raise GenLoomError("this is the last page")
        return await self._fetch(self.next_page_token)

    async def iter_pages(self) -> AsyncIterator[AsyncPage[T]]:
        """This page and every page after it."""
        page: AsyncPage[T] = self
        yield page
        while page.has_next_page():
            page = await page.get_next_page()
            yield page

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.iter_pages():
            for item in page.data:
                yield item


class AsyncPager(Generic[T]):
    """What the async `list()` methods return: `await` it for the first `AsyncPage`, or `async for` over it
    directly for every item of every page."""

    def __init__(self, first: Callable[[], Awaitable[AsyncPage[T]]]) -> None:
        self._first = first

    def __await__(self) -> Generator[Any, None, AsyncPage[T]]:
        return self._first().__await__()

    async def __aiter__(self) -> AsyncIterator[T]:
        page = await self._first()
        async for item in page:
            yield item


# --- watching ------------------------------------------------------------------------------------------------------


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

    def __init__(self, stub: Any, job_id: str, **options: Any) -> None:
        super().__init__(job_id, **options)
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

    def __init__(self, stub: Any, job_id: str, **options: Any) -> None:
        super().__init__(job_id, **options)
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


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None, what: str) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise WaitTimeoutError(f"stopped waiting for {what}: the timeout passed (it carries on)")
    return remaining


# --- resources -----------------------------------------------------------------------------------------------------


class Sweeps:
    """Hyperparameter sweeps, synchronously: `client.finetune.sweeps`."""

    def __init__(self, transport: SyncTransport, stub: Any) -> None:
        self._t = transport
        self._stub = stub

    def create(
        self,
        base_job: FineTuneSpec | Mapping[str, Any],
        *,
        search_space: Mapping[str, SearchSpaceLike],
        method: SweepMethodName = "grid",
        max_trials: int = 0,
        parallelism: int = 0,
        objective: SweepObjectiveName | None = None,
        seed: int = 0,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        timeout: float | None = _DEFAULT,
    ) -> Sweep:
        """Start a hyperparameter sweep: trials are jobs with `base_job`'s spec and the searched values applied.

        Args:
            base_job: what every trial trains: a FineTuneSpec, a mapping of `finetune.create()`'s arguments
                ({"training_file": "train.jsonl", "method": "lora", "hyperparameters": {...}}), or a job record's
                `spec` (to reuse its stored data).
            search_space: {hyperparameter: values}: a list of values to try in order (["linear", "cosine"]),
                FloatRange(1e-5, 1e-3, log=True), IntRange(4, 16, step=4), range(4, 17, 4), or a (min, max) tuple
                of two numbers. 1 to 16 dimensions.
            method: "grid" (every combination, last dimension fastest) or "bayesian" (seeded TPE).
            max_trials: grid: the first N combinations (0: all); bayesian: N trials (0: 10).
            parallelism: trials queued or running at once (0: 2).
            objective: "validation_loss" (default; needs validation data or a split) or "train_loss".
            seed: the Bayesian sampler's seed.
            idempotency_key, webhook_url, webhook_secret: as in `finetune.create()` (the webhook is called once,
                when the sweep ends).
        """
        request = _create_sweep_request(base_job, search_space, locals())
        response = self._t.unary(self._stub.CreateSweep, request, timeout=timeout)
        return Sweep.from_pb(response.sweep, created=response.created)

    def get(self, sweep_id: str, *, timeout: float | None = _DEFAULT) -> Sweep:
        """A sweep with every trial and the best so far (NotFoundError for an unknown id)."""
        request = finetune_pb2.GetSweepRequest(sweep_id=sweep_id)
        return Sweep.from_pb(self._t.unary(self._stub.GetSweep, request, timeout=timeout).sweep)

    def list(
        self,
        *,
        state: SweepStateName | Iterable[SweepStateName] | None = None,
        limit: int = 20,
        order: SortOrderName = "desc",
        timeout: float | None = _DEFAULT,
    ) -> Page[Sweep]:
        """Sweeps, newest first ("asc": oldest first), optionally only in `state` (one or several). `limit` is
        the page size (at most 100); iterating the result walks every page."""
        request = _list_sweeps_request(state, limit, order)

        def fetch(token: str) -> Page[Sweep]:
            page_request = finetune_pb2.ListSweepsRequest()
            page_request.CopyFrom(request)
            page_request.page_token = token
            response = self._t.unary(self._stub.ListSweeps, page_request, timeout=timeout)
            return Page([Sweep.from_pb(s) for s in response.sweeps], response.next_page_token, fetch)

        return fetch("")

    def cancel(self, sweep_id: str, *, timeout: float | None = _DEFAULT) -> Sweep:
        """Stop a sweep: no further trials start and running ones are cancelled (FailedPreconditionError when
        it already ended)."""
        request = finetune_pb2.CancelSweepRequest(sweep_id=sweep_id)
        return Sweep.from_pb(self._t.unary(self._stub.CancelSweep, request, timeout=timeout).sweep)

    def wait(
        self,
        sweep_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 5.0,
        on_update: Callable[[Sweep], None] | None = None,
    ) -> Sweep:
        """Poll a sweep until it ends and return it (check `state`, or call `raise_for_status()`). Sweeps have no
        event stream; follow a trial's job with `finetune.watch(trial.job_id)`.

        Args:
            timeout: seconds to wait at most (WaitTimeoutError after; the sweep carries on). None: no limit.
            poll_interval: seconds between polls.
            on_update: called with the sweep after every poll.
        """
        deadline = _deadline(timeout)
        while True:
            sweep = self.get(sweep_id, timeout=_DEFAULT)
            if on_update is not None:
                on_update(sweep)
            if sweep.is_terminal:
                return sweep
            remaining = _left(deadline, f"sweep {sweep_id}")
            time.sleep(poll_interval if remaining is None else min(poll_interval, remaining))


class FineTuning:
    """Fine-tuning jobs, synchronously: `client.finetune`."""

    sweeps: Sweeps
    """Hyperparameter sweeps."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport
        self._stub = finetune_pb2_grpc.FineTuningServiceStub(transport.channel)
        self.sweeps = Sweeps(transport, self._stub)

    def create(
        self,
        training_file: TrainingFile,
        *,
        model: str = "",
        method: FineTuneMethodName = "lora",
        validation_file: TrainingFile | None = None,
        data_format: DataFormatName | None = None,
        task: TaskName | None = None,
        task_options: TaskOptions | Mapping[str, Any] | None = None,
        hyperparameters: HyperparametersLike | None = None,
        suffix: str = "",
        validation_split: float | None = None,
        truncate_long_examples: bool = False,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        send_path: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> FineTuneJob:
        """Submit a fine-tuning job. It comes back "validating": the data is checked on the server, then the job
        is queued and trained; follow it with `watch()` or `wait()`.

        Args:
            training_file: a local JSONL file's path (read here and sent with the request), the JSONL bytes, or a
                list of records (mappings; ClassifyExample/SummarizeExample/AnswerExample; or conversations as
                lists of {"role", "content"}), at most 32 MiB. With send_path=True a path is sent for the server to
                read (inside its GENLOOM_FINETUNE_DATA_ROOT).
            model: the base model ("" = the server's default). method: "lora" or "full".
            validation_file: validation data, same forms (None: hold out validation_split of the training data).
            data_format: "chat", "prompt_completion" or "task_records"; None: detected from the first line, or
                "task_records" when `task` is set.
            task, task_options: for task records: "classify", "summarize" or "answer", and the prompt options
                (TaskOptions or a mapping such as {"labels": ["pos", "neg"]}), to serve the result with.
            hyperparameters: a mapping of Hyperparameters field names ({"epochs": 2, "learning_rate": 1e-4,
                "lr_scheduler": "cosine", "precision": "bf16"}) or Hyperparameters. An unknown name or a value of
                the wrong kind is a ValueError before anything is sent.
            suffix: part of the result's name "ft:<base>:<suffix>:<job-id>".
            validation_split, truncate_long_examples, metadata: see FineTuneSpec.
            idempotency_key: repeat a call safely: the same key returns the first job (`created` False). None: a
                fresh key, so that this call's own retries are safe; "": none.
            webhook_url, webhook_secret: POSTed the job record when it ends (signed with the secret).
            timeout: seconds (default: the client's).
        """
        spec = _job_spec(locals())
        request = _create_job_request(spec, locals())
        response = self._t.unary(self._stub.CreateJob, request, timeout=timeout)
        return FineTuneJob.from_pb(response.job, created=response.created)

    def get(self, job_id: str, *, timeout: float | None = _DEFAULT) -> FineTuneJob:
        """A job's current record (NotFoundError for an unknown id)."""
        request = finetune_pb2.GetJobRequest(job_id=job_id)
        return FineTuneJob.from_pb(self._t.unary(self._stub.GetJob, request, timeout=timeout).job)

    def list(
        self,
        *,
        state: JobStateName | Iterable[JobStateName] | None = None,
        base_model: str | None = None,
        sweep_id: str | None = None,
        limit: int = 20,
        order: SortOrderName = "desc",
        timeout: float | None = _DEFAULT,
    ) -> Page[FineTuneJob]:
        """Jobs, newest first ("asc": oldest first), optionally only those in `state` (one or several), on
        `base_model`, or of sweep `sweep_id`. `limit` is the page size (at most 100): `for job in
        client.finetune.list()` walks every page; `.data` is the first page only."""
        request = _list_jobs_request(state, base_model, sweep_id, limit, order)

        def fetch(token: str) -> Page[FineTuneJob]:
            page_request = finetune_pb2.ListJobsRequest()
            page_request.CopyFrom(request)
            page_request.page_token = token
            response = self._t.unary(self._stub.ListJobs, page_request, timeout=timeout)
            return Page([FineTuneJob.from_pb(j) for j in response.jobs], response.next_page_token, fetch)

        return fetch("")

    def cancel(self, job_id: str, *, timeout: float | None = _DEFAULT) -> FineTuneJob:
        """Cancel a job: at once when validating or queued, at its next step when running (`cancel_requested`
        until then). FailedPreconditionError when it already succeeded or failed."""
        request = finetune_pb2.CancelJobRequest(job_id=job_id)
        return FineTuneJob.from_pb(self._t.unary(self._stub.CancelJob, request, timeout=timeout).job)

    def checkpoints(self, job_id: str, *, timeout: float | None = _DEFAULT) -> builtins.list[Checkpoint]:
        """A job's kept checkpoints, by step."""
        request = finetune_pb2.ListCheckpointsRequest(job_id=job_id)
        response = self._t.unary(self._stub.ListCheckpoints, request, timeout=timeout)
        return [Checkpoint.from_pb(c) for c in response.checkpoints]

    def watch(
        self,
        job_id: str,
        *,
        after_event_id: str | None = None,
        follow: bool = True,
        timeout: float | None = None,
        max_reconnects: int = DEFAULT_MAX_RECONNECTS,
    ) -> JobEventStream:
        """Stream a job's events (`JobEvent`), oldest first.

        Args:
            after_event_id: start after this event (e.g. `job.last_event_id`); None: from the first event.
            follow: keep streaming new events until the job's terminal state-change event (then the iteration
                ends). False: the stored events only.
            timeout: seconds to watch at most (WaitTimeoutError after; the job carries on). None: no limit.
            max_reconnects: a broken stream (UNAVAILABLE, a server restart, a stream that ends early) is reopened
                after the last event received, with backoff; this many attempts in a row without an event, then
                the error is raised.
        """
        return JobEventStream(
            self._stub,
            job_id,
            after_event_id=after_event_id,
            follow=follow,
            timeout=timeout,
            max_reconnects=max_reconnects,
            metadata=self._t.options.call_metadata,
        )

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[JobEvent], None] | None = None,
    ) -> FineTuneJob:
        """Follow a job until it ends and return its final record. A failed or cancelled job is returned, not
        raised: check `state`, or call `raise_for_status()` to raise FineTuneJobFailed for a failure.

        Args:
            timeout: seconds to wait at most (WaitTimeoutError after; the job carries on). None: no limit.
            on_event: called with each event from now on (the job's earlier events are not replayed).
        """
        deadline = _deadline(timeout)
        job = self.get(job_id)
        if job.is_terminal:
            return job
        with self.watch(job_id, after_event_id=job.last_event_id or None, timeout=_left(deadline, job_id)) as events:
            for event in events:
                if on_event is not None:
                    on_event(event)
        # The record is written before the terminal event is published; poll briefly in case a replica lags.
        for _ in range(_TERMINAL_SETTLE_POLLS):
            job = self.get(job_id)
            if job.is_terminal:
                break
            time.sleep(_TERMINAL_SETTLE_DELAY)
        return job


class AsyncSweeps:
    """Hyperparameter sweeps, for asyncio: `client.finetune.sweeps`. Same methods as `Sweeps`."""

    def __init__(self, transport: AsyncTransport, stub: Any) -> None:
        self._t = transport
        self._stub = stub

    async def create(
        self,
        base_job: FineTuneSpec | Mapping[str, Any],
        *,
        search_space: Mapping[str, SearchSpaceLike],
        method: SweepMethodName = "grid",
        max_trials: int = 0,
        parallelism: int = 0,
        objective: SweepObjectiveName | None = None,
        seed: int = 0,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        timeout: float | None = _DEFAULT,
    ) -> Sweep:
        """See `Sweeps.create`."""
        request = _create_sweep_request(base_job, search_space, locals())
        response = await self._t.unary(self._stub.CreateSweep, request, timeout=timeout)
        return Sweep.from_pb(response.sweep, created=response.created)

    async def get(self, sweep_id: str, *, timeout: float | None = _DEFAULT) -> Sweep:
        """See `Sweeps.get`."""
        request = finetune_pb2.GetSweepRequest(sweep_id=sweep_id)
        return Sweep.from_pb((await self._t.unary(self._stub.GetSweep, request, timeout=timeout)).sweep)

    def list(
        self,
        *,
        state: SweepStateName | Iterable[SweepStateName] | None = None,
        limit: int = 20,
        order: SortOrderName = "desc",
        timeout: float | None = _DEFAULT,
    ) -> AsyncPager[Sweep]:
        """See `Sweeps.list`: `await` it for the first page, or `async for` over every sweep."""
        request = _list_sweeps_request(state, limit, order)

        async def fetch(token: str) -> AsyncPage[Sweep]:
            page_request = finetune_pb2.ListSweepsRequest()
            page_request.CopyFrom(request)
            page_request.page_token = token
            response = await self._t.unary(self._stub.ListSweeps, page_request, timeout=timeout)
            return AsyncPage([Sweep.from_pb(s) for s in response.sweeps], response.next_page_token, fetch)

        return AsyncPager(lambda: fetch(""))

    async def cancel(self, sweep_id: str, *, timeout: float | None = _DEFAULT) -> Sweep:
        """See `Sweeps.cancel`."""
        request = finetune_pb2.CancelSweepRequest(sweep_id=sweep_id)
        return Sweep.from_pb((await self._t.unary(self._stub.CancelSweep, request, timeout=timeout)).sweep)

    async def wait(
        self,
        sweep_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 5.0,
        on_update: Callable[[Sweep], None] | None = None,
    ) -> Sweep:
        """See `Sweeps.wait`."""
        deadline = _deadline(timeout)
        while True:
            sweep = await self.get(sweep_id)
            if on_update is not None:
                on_update(sweep)
            if sweep.is_terminal:
                return sweep
            remaining = _left(deadline, f"sweep {sweep_id}")
            await asyncio.sleep(poll_interval if remaining is None else min(poll_interval, remaining))


class AsyncFineTuning:
    """Fine-tuning jobs, for asyncio: `client.finetune`. Same methods as `FineTuning`; `list()` returns an
    `AsyncPager` and `watch()` an async iterator."""

    sweeps: AsyncSweeps
    """Hyperparameter sweeps."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = finetune_pb2_grpc.FineTuningServiceStub(transport.channel)
        self.sweeps = AsyncSweeps(transport, self._stub)

    async def create(
        self,
        training_file: TrainingFile,
        *,
        model: str = "",
        method: FineTuneMethodName = "lora",
        validation_file: TrainingFile | None = None,
        data_format: DataFormatName | None = None,
        task: TaskName | None = None,
        task_options: TaskOptions | Mapping[str, Any] | None = None,
        hyperparameters: HyperparametersLike | None = None,
        suffix: str = "",
        validation_split: float | None = None,
        truncate_long_examples: bool = False,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        send_path: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> FineTuneJob:
        """See `FineTuning.create`. A local file is read synchronously (it is at most 32 MiB)."""
        spec = _job_spec(locals())
        request = _create_job_request(spec, locals())
        response = await self._t.unary(self._stub.CreateJob, request, timeout=timeout)
        return FineTuneJob.from_pb(response.job, created=response.created)

    async def get(self, job_id: str, *, timeout: float | None = _DEFAULT) -> FineTuneJob:
        """See `FineTuning.get`."""
        request = finetune_pb2.GetJobRequest(job_id=job_id)
        return FineTuneJob.from_pb((await self._t.unary(self._stub.GetJob, request, timeout=timeout)).job)

    def list(
        self,
        *,
        state: JobStateName | Iterable[JobStateName] | None = None,
        base_model: str | None = None,
        sweep_id: str | None = None,
        limit: int = 20,
        order: SortOrderName = "desc",
        timeout: float | None = _DEFAULT,
    ) -> AsyncPager[FineTuneJob]:
        """See `FineTuning.list`: `await` it for the first page, or `async for` over every job."""
        request = _list_jobs_request(state, base_model, sweep_id, limit, order)

        async def fetch(token: str) -> AsyncPage[FineTuneJob]:
            page_request = finetune_pb2.ListJobsRequest()
            page_request.CopyFrom(request)
            page_request.page_token = token
            response = await self._t.unary(self._stub.ListJobs, page_request, timeout=timeout)
            return AsyncPage([FineTuneJob.from_pb(j) for j in response.jobs], response.next_page_token, fetch)

        return AsyncPager(lambda: fetch(""))

    async def cancel(self, job_id: str, *, timeout: float | None = _DEFAULT) -> FineTuneJob:
        """See `FineTuning.cancel`."""
        request = finetune_pb2.CancelJobRequest(job_id=job_id)
        return FineTuneJob.from_pb((await self._t.unary(self._stub.CancelJob, request, timeout=timeout)).job)

    async def checkpoints(self, job_id: str, *, timeout: float | None = _DEFAULT) -> builtins.list[Checkpoint]:
        """See `FineTuning.checkpoints`."""
        request = finetune_pb2.ListCheckpointsRequest(job_id=job_id)
        response = await self._t.unary(self._stub.ListCheckpoints, request, timeout=timeout)
        return [Checkpoint.from_pb(c) for c in response.checkpoints]

    def watch(
        self,
        job_id: str,
        *,
        after_event_id: str | None = None,
        follow: bool = True,
        timeout: float | None = None,
        max_reconnects: int = DEFAULT_MAX_RECONNECTS,
    ) -> AsyncJobEventStream:
        """See `FineTuning.watch`: `async for event in client.finetune.watch(job_id)`."""
        return AsyncJobEventStream(
            self._stub,
            job_id,
            after_event_id=after_event_id,
            follow=follow,
            timeout=timeout,
            max_reconnects=max_reconnects,
            metadata=self._t.options.call_metadata,
        )

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[JobEvent], None] | None = None,
    ) -> FineTuneJob:
        """See `FineTuning.wait`."""
        deadline = _deadline(timeout)
        job = await self.get(job_id)
        if job.is_terminal:
            return job
        stream = self.watch(job_id, after_event_id=job.last_event_id or None, timeout=_left(deadline, job_id))
        async with stream:
            async for event in stream:
                if on_event is not None:
                    on_event(event)
        for _ in range(_TERMINAL_SETTLE_POLLS):
            job = await self.get(job_id)
            if job.is_terminal:
                break
            await asyncio.sleep(_TERMINAL_SETTLE_DELAY)
        return job

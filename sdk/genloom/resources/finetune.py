"""`client.finetune`: fine-tuning jobs (create, get, list, cancel, checkpoints, watch, wait) and
`client.finetune.sweeps`: hyperparameter sweeps.

Like openai-python's `fine_tuning.jobs`: `list()` returns a page that iterates over every job of every page,
fetching the next page as it goes. `watch()` streams a job's events and survives a server restart or a dropped
connection: it reconnects with the last event id it received, so the caller sees each event once, in order.
`create()` sends an idempotency key (made up when none is given) so that a retried call never creates two jobs.

This module holds the jobs resources and is the public import path; sweeps live in `_sweeps`, pages in `_pages`,
the event streams in `_job_events` and the request building in `_finetune_requests`.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from genloom._transport import _DEFAULT, AsyncTransport, SyncTransport
from genloom.resources._finetune_requests import (
    _create_job_request,
    _deadline,
    _job_spec,
    _left,
    _list_jobs_request,
)
from genloom.resources._job_events import DEFAULT_MAX_RECONNECTS, AsyncJobEventStream, JobEventStream
from genloom.resources._pages import AsyncPage, AsyncPager, Page
from genloom.resources._sweeps import AsyncSweeps, Sweeps
from genloom.types._finetune_enums import DataFormatName, FineTuneMethodName, JobStateName, SortOrderName
from genloom.types._finetune_records import Checkpoint, FineTuneJob, JobEvent
from genloom.types._finetune_spec import TaskOptions
from genloom.types._hyperparameters import HyperparametersLike
from genloom.types._task_inputs import TaskName
from genloom.types._training_data import TrainingFile
from genloom.v1 import finetune_pb2, finetune_pb2_grpc

__all__ = [
    "DEFAULT_MAX_RECONNECTS",
    "AsyncFineTuning",
    "AsyncJobEventStream",
    "AsyncPage",
    "AsyncPager",
    "AsyncSweeps",
    "FineTuning",
    "JobEventStream",
    "Page",
    "Sweeps",
]

_TERMINAL_SETTLE_POLLS = 10
_TERMINAL_SETTLE_DELAY = 0.2


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

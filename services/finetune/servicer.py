"""FineTuningService: jobs and sweeps over Redis, trained by `genloom worker` processes.

The RPCs are thin: JobManager and SweepController (shared with the workers) do the work, called in threads since
they use the synchronous Redis client the training loop needs. WatchJob reads the job's event stream with a
blocking XREAD on an asyncio Redis client, so a watcher costs no thread. A background loop re-queues jobs whose
worker died, re-validates jobs whose validator died and advances sweeps.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import grpc
import redis
import redis.asyncio as aioredis

from genloom.services.finetune import search
from genloom.services.finetune import spec as spec_mod
from genloom.services.finetune.ids import JOB_ID, SWEEP_ID, new_sweep_id
from genloom.services.finetune.jobs import JobManager
from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.finetune.store import (
    SWEEP_TERMINAL,
    TERMINAL,
    P,
    Store,
    async_redis_client,
    events_key,
    page_token,
    read_page_token,
)
from genloom.services.finetune.sweeps import SweepController
from genloom.services.finetune.worker import make_celery, sender
from genloom.services.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
    quote,
)
from genloom.services.server.settings import ModelSettings
from genloom.v1 import finetune_pb2, finetune_pb2_grpc

logger = logging.getLogger(__name__)

S = finetune_pb2
T = TypeVar("T")
DEFAULT_PAGE = 20
MAX_PAGE = 100


# What a client is told when Redis can't be reached (after the client's own retries of stale connections):
# the setting to check, never the address or the driver's error, which names the host and port.
STORE_UNAVAILABLE = "the job store is unavailable; retry later (operators: check GENLOOM_REDIS_URL)"


def _store_unavailable(rpc: str, err: Exception) -> Unavailable:
    logger.warning("%s: the job store (Redis) is unreachable: %r", rpc, err)
    return Unavailable(STORE_UNAVAILABLE)


def _redis_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Redis unreachable -> UNAVAILABLE (the caller may retry), never INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise _store_unavailable(fn.__name__, err) from None

    return wrapper


def _redis_errors_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            async for item in fn(*args, **kwargs):
                yield item
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise _store_unavailable(fn.__name__, err) from None

    return wrapper


class FineTuningServicer(finetune_pb2_grpc.FineTuningServiceServicer):
    name = finetune_pb2.DESCRIPTOR.services_by_name["FineTuningService"].full_name

    def __init__(self, models: ModelSettings, settings: FinetuneSettings | None = None) -> None:
        self.models = models
        self.settings = settings or FinetuneSettings()
        self.store = Store.from_url(models.redis_url)
        self.celery = make_celery(models, self.settings)
        self.manager = JobManager(self.store, models, self.settings, sender(self.celery, self.settings))
        self.sweeps = SweepController(self.manager)
        self.manager.on_finished = self.sweeps.trial_finished
        self._aio: aioredis.Redis | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        finetune_pb2_grpc.add_FineTuningServiceServicer_to_server(self, server)

    async def start(self) -> None:
        # socket_timeout above XREAD's 5 s block, so a quiet stream is not a timeout.
        self._aio = async_redis_client(self.models.redis_url, socket_timeout=30)
        # Resolve the default model once now (it may be converted on first use), so CreateJob is quick.
        try:
            await asyncio.to_thread(self.manager.tokenizer, self.manager.base_model(""))
        except Exception:
            logger.warning("could not load the default model's tokenizer at start", exc_info=True)
        self._reaper = asyncio.create_task(self._reap_forever(), name="genloom-finetune-reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._aio is not None:
            await self._aio.aclose()

    # -- background ---------------------------------------------------------------------------------------------

    def _background(self, fn: Callable[..., Any], *args: Any) -> None:
        task = asyncio.create_task(asyncio.to_thread(fn, *args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reap_interval)
            try:
                await asyncio.to_thread(self._reap_once)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("fine-tuning reaper pass failed", exc_info=True)

    def _reap_once(self) -> None:
        # One replica reaps per interval.
        if not self.store.r.set(P + "reaper", "1", nx=True, px=int(self.settings.reap_interval * 900)):
            return
        for job_id in self.manager.reap():
            self.manager.validate(job_id)
        for sweep_id, _ in self.store.list_sweeps(None, False, 1000):
            sweep = self.store.get_sweep(sweep_id)
            if sweep is not None and sweep.state not in SWEEP_TERMINAL:
                self.sweeps.advance(sweep_id)

    # -- jobs ----------------------------------------------------------------------------------------------------

    @_redis_errors
    async def CreateJob(
        self, request: finetune_pb2.CreateJobRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.CreateJobResponse:
        job, created = await asyncio.to_thread(self.manager.create, request)
        if created:
            self._background(self.manager.validate, job.id)
        return finetune_pb2.CreateJobResponse(job=job, created=created)

    @_redis_errors
    async def GetJob(
        self, request: finetune_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.GetJobResponse:
        return finetune_pb2.GetJobResponse(job=await asyncio.to_thread(self._job, request.job_id))

    def _job(self, job_id: str, field: str = "job_id") -> finetune_pb2.Job:
        _check_id(job_id, JOB_ID, field, "ftjob-")
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return self.store.with_last_event(job)

    @_redis_errors
    async def ListJobs(
        self, request: finetune_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.ListJobsResponse:
        _check_listing(request, S.JobState, "job")
        filters = spec_mod.request_digest(
            finetune_pb2.ListJobsRequest(
                states=request.states, base_model=request.base_model, sweep_id=request.sweep_id, order=request.order
            )
        )
        wanted = set(request.states)

        def keep(job: finetune_pb2.Job) -> bool:
            return (
                (not wanted or job.state in wanted)
                and (not request.base_model or job.spec.base_model == request.base_model)
                and (not request.sweep_id or job.sweep_id == request.sweep_id)
            )

        page, token = await asyncio.to_thread(
            self._page,
            request.page_size,
            request.page_token,
            filters,
            request.order,
            self.store.list_jobs,
            self.store.get_jobs,
            keep,
        )
        jobs = [self.store.with_last_event(j) for j in page]
        return finetune_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    def _page(
        self,
        size: int,
        token: str,
        filters: str,
        order: int,
        ids: Callable[[float | None, bool, int], list[tuple[str, float]]],
        load: Callable[[Sequence[str]], list[Any]],
        keep: Callable[[Any], bool],
    ) -> tuple[list[Any], str]:
        size = min(size or DEFAULT_PAGE, MAX_PAGE)
        after: float | None = None
        if token:
            try:
                after, digest = read_page_token(token)
            except (ValueError, KeyError, TypeError):
                raise InvalidArgument.field("page_token", "not a token from a previous page") from None
            if digest != filters:
                raise InvalidArgument.field("page_token", "the filters or order changed since the previous page")
        ascending = order == 2
        found: list[Any] = []
        last = after
        while len(found) < size:
            batch = ids(last, ascending, max(size * 2, 50))
            if not batch:
                return found, ""
            for (_record_id, score), record in zip(batch, load([i for i, _ in batch]), strict=True):
                last = score
                if record is not None and keep(record):
                    found.append(record)
                    if len(found) == size:
                        break
        more = ids(last, ascending, 1)
        return found, page_token(last, filters) if more and last is not None else ""

    @_redis_errors
    async def CancelJob(
        self, request: finetune_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.CancelJobResponse:
        _check_id(request.job_id, JOB_ID, "job_id", "ftjob-")
        return finetune_pb2.CancelJobResponse(job=await asyncio.to_thread(self.manager.cancel, request.job_id))

    @_redis_errors_stream
    async def WatchJob(
        self, request: finetune_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[finetune_pb2.WatchJobResponse]:
        job = await asyncio.to_thread(self._job, request.job_id)
        assert self._aio is not None
        key = events_key(job.id)
        after = request.after_event_id
        if after:
            found = await self._aio.xrange(key, min=after, max=after, count=1) if _stream_id(after) else []
            if not found:
                raise InvalidArgument.field("after_event_id", f"{quote(after)} is not an event of job {job.id}")
        follow = request.follow if request.HasField("follow") else True
        if follow and after and await self._ended_before(key, after):
            follow = False  # resuming after the end: send what came after it (webhook warnings) and stop
        cursor = after or "0-0"
        while True:
            rows = await self._aio.xrange(key, min=f"({cursor}" if cursor != "0-0" else "-", max="+", count=200)
            if not rows and follow:
                answer = await self._aio.xread({key: cursor}, block=5000, count=200)
                rows = answer[0][1] if answer else []
            if not rows:
                if not follow:
                    return
                # Nothing new for a while: make sure the job has not ended (its last event may predate `cursor`).
                current = await asyncio.to_thread(self.store.get_job, job.id)
                if current is None:
                    raise NotFound(f"job {job.id} was deleted while it was being watched")
                if current.state in TERMINAL and await self._ended_before(key, cursor):
                    return
                continue
            for event_id, fields in rows:
                cursor = event_id.decode()
                event = finetune_pb2.JobEvent.FromString(fields[b"e"])
                event.id = cursor
                yield finetune_pb2.WatchJobResponse(event=event)
                if follow and event.type == S.JOB_EVENT_TYPE_STATE_CHANGE and event.state in TERMINAL:
                    return  # (without follow every stored event is sent: a webhook warning comes after the end)

    async def _ended_before(self, key: str, cursor: str) -> bool:
        """Whether a terminal state event is at or before `cursor` (a watcher resuming after the end)."""
        assert self._aio is not None
        for _, fields in await self._aio.xrevrange(key, max=cursor, min="-", count=50):
            event = finetune_pb2.JobEvent.FromString(fields[b"e"])
            if event.type == S.JOB_EVENT_TYPE_STATE_CHANGE and event.state in TERMINAL:
                return True
        return False

    @_redis_errors
    async def ListCheckpoints(
        self, request: finetune_pb2.ListCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.ListCheckpointsResponse:
        await asyncio.to_thread(self._job, request.job_id)
        rows = await asyncio.to_thread(self.store.checkpoints, request.job_id)
        return finetune_pb2.ListCheckpointsResponse(checkpoints=rows)

    # -- sweeps --------------------------------------------------------------------------------------------------

    @_redis_errors
    async def CreateSweep(
        self, request: finetune_pb2.CreateSweepRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.CreateSweepResponse:
        sweep, created = await asyncio.to_thread(self._create_sweep, request)
        if created:
            self._background(self.sweeps.advance, sweep.id)
        return finetune_pb2.CreateSweepResponse(sweep=sweep, created=created)

    def _create_sweep(self, request: finetune_pb2.CreateSweepRequest) -> tuple[finetune_pb2.Sweep, bool]:
        violations = search.check_sweep_spec(request.spec, self.settings, field="spec")
        if request.HasField("webhook"):
            violations += spec_mod.check_webhook(request.webhook, field="webhook", policy=self.manager.webhook_policy)
        violations += spec_mod.check_idempotency_key(request.idempotency_key)
        spec_mod.raise_if(violations)
        spec = search.effective_sweep_spec(request.spec, self.settings)
        base = self.manager.base_model(spec.base_job.base_model, "spec.base_job.base_model")
        spec.base_job.base_model = base.name
        # Inline data is stored once for every trial (trials then name the stored file).
        sweep_id = new_sweep_id()
        spec.base_job.training_data.CopyFrom(self.manager.store_data(spec.base_job.training_data, sweep_id, "training"))
        if spec.base_job.HasField("validation_data"):
            spec.base_job.validation_data.CopyFrom(
                self.manager.store_data(spec.base_job.validation_data, sweep_id, "validation")
            )
        sweep = finetune_pb2.Sweep(
            id=sweep_id, state=S.SWEEP_STATE_RUNNING, spec=spec, idempotency_key=request.idempotency_key
        )
        if request.HasField("webhook") and request.webhook.url:
            sweep.webhook.url = request.webhook.url
            sweep.webhook.has_secret = bool(request.webhook.secret)
        sweep.created_at.GetCurrentTime()
        sweep.updated_at.CopyFrom(sweep.created_at)
        try:
            return self.store.create_sweep(
                sweep,
                digest=spec_mod.request_digest(request),
                webhook_secret=request.webhook.secret if request.HasField("webhook") else "",
            )
        except KeyError as err:
            raise AlreadyExists(
                f"idempotency_key {request.idempotency_key!r} was used for a different request (sweep {err.args[0]})"
            ) from None

    def _sweep(self, sweep_id: str) -> finetune_pb2.Sweep:
        _check_id(sweep_id, SWEEP_ID, "sweep_id", "ftsweep-")
        sweep = self.store.get_sweep(sweep_id)
        if sweep is None:
            raise NotFound(f"no sweep {sweep_id!r}")
        return sweep

    @_redis_errors
    async def GetSweep(
        self, request: finetune_pb2.GetSweepRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.GetSweepResponse:
        sweep = await asyncio.to_thread(self._sweep, request.sweep_id)
        if sweep.state not in SWEEP_TERMINAL:
            sweep = await asyncio.to_thread(self.sweeps.view, sweep)  # trials as their jobs stand now
        return finetune_pb2.GetSweepResponse(sweep=sweep)

    @_redis_errors
    async def ListSweeps(
        self, request: finetune_pb2.ListSweepsRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.ListSweepsResponse:
        _check_listing(request, S.SweepState, "sweep")
        filters = spec_mod.request_digest(finetune_pb2.ListSweepsRequest(states=request.states, order=request.order))
        wanted = set(request.states)

        def load(ids: Sequence[str]) -> list[Any]:
            return [self.store.get_sweep(i) for i in ids]

        page, token = await asyncio.to_thread(
            self._page,
            request.page_size,
            request.page_token,
            filters,
            request.order,
            self.store.list_sweeps,
            load,
            lambda s: not wanted or s.state in wanted,
        )
        return finetune_pb2.ListSweepsResponse(sweeps=page, next_page_token=token)

    @_redis_errors
    async def CancelSweep(
        self, request: finetune_pb2.CancelSweepRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.CancelSweepResponse:
        sweep = await asyncio.to_thread(self._sweep, request.sweep_id)
        if sweep.state in (S.SWEEP_STATE_SUCCEEDED, S.SWEEP_STATE_FAILED):
            raise FailedPrecondition(f"sweep {sweep.id} already ended; only running sweeps can be cancelled")
        if sweep.state == S.SWEEP_STATE_CANCELLED:
            return finetune_pb2.CancelSweepResponse(sweep=sweep)
        updated = await asyncio.to_thread(self.sweeps.cancel, sweep.id)
        return finetune_pb2.CancelSweepResponse(sweep=updated or sweep)


def _check_id(value: str, pattern: Any, field: str, prefix: str) -> None:
    if not value:
        raise InvalidArgument.field(field, "is required")
    if not pattern.match(value):
        raise InvalidArgument(
            f"{field}: {quote(value)} is not an id ({prefix} followed by 26 base32 characters)",
            [FieldViolation(field, "malformed id")],
        )


def _check_listing(request: Any, states: Any, what: str) -> None:
    """A List request's state filters (0 is not a state) and order."""
    for i, state in enumerate(request.states):
        if state == 0 or state not in states.values():
            raise InvalidArgument.field(f"states[{i}]", f"{state} is not a {what} state to filter by")
    if request.order not in (0, 1, 2):
        raise InvalidArgument.field("order", f"{request.order} is not a SortOrder")


def _stream_id(value: str) -> bool:
    ms, sep, seq = value.partition("-")
    return bool(sep) and ms.isdigit() and seq.isdigit()

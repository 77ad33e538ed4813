"""FineTuningService: jobs and sweeps over Redis, trained by `genloom worker` processes.

The RPCs are thin: JobManager and SweepController (shared with the workers) do the work, called in threads since
they use the synchronous Redis client the training loop needs; listing.py checks ids and pages listings. WatchJob
reads the job's event stream (watch.py) with a blocking XREAD on an asyncio Redis client, so a watcher costs no
thread. A background loop (SweepController.reaper_pass) re-queues jobs whose worker died, re-validates jobs whose
validator died and advances sweeps.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import redis
import redis.asyncio as aioredis

from genloom.services.finetune import listing
from genloom.services.finetune import spec as spec_mod
from genloom.services.finetune.ids import JOB_ID, SWEEP_ID
from genloom.services.finetune.jobs import JobManager
from genloom.services.finetune.listing import check_id, check_listing
from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.finetune.store import SWEEP_TERMINAL, Store, async_redis_client
from genloom.services.finetune.sweeps import SweepController
from genloom.services.finetune.taskqueue import make_celery, sender
from genloom.services.finetune.watch import job_events
from genloom.services.server.errors import FailedPrecondition, NotFound, Unavailable
from genloom.services.server.settings import ModelSettings
from genloom.v1 import finetune_pb2, finetune_pb2_grpc

logger = logging.getLogger(__name__)

S = finetune_pb2


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
                await asyncio.to_thread(self.sweeps.reaper_pass)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("fine-tuning reaper pass failed", exc_info=True)

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
        check_id(job_id, JOB_ID, field, "ftjob-")
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return self.store.with_last_event(job)

    @_redis_errors
    async def ListJobs(
        self, request: finetune_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.ListJobsResponse:
        check_listing(request, S.JobState, "job")
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
            listing.page,
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

    @_redis_errors
    async def CancelJob(
        self, request: finetune_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.CancelJobResponse:
        check_id(request.job_id, JOB_ID, "job_id", "ftjob-")
        return finetune_pb2.CancelJobResponse(job=await asyncio.to_thread(self.manager.cancel, request.job_id))

    @_redis_errors_stream
    async def WatchJob(
        self, request: finetune_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[finetune_pb2.WatchJobResponse]:
        job = await asyncio.to_thread(self._job, request.job_id)
        assert self._aio is not None
        follow = request.follow if request.HasField("follow") else True
        async for event in job_events(self._aio, self.store, job.id, request.after_event_id, follow):
            yield finetune_pb2.WatchJobResponse(event=event)

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
        sweep, created = await asyncio.to_thread(self.sweeps.create, request)
        if created:
            self._background(self.sweeps.advance, sweep.id)
        return finetune_pb2.CreateSweepResponse(sweep=sweep, created=created)

    def _sweep(self, sweep_id: str) -> finetune_pb2.Sweep:
        check_id(sweep_id, SWEEP_ID, "sweep_id", "ftsweep-")
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
        check_listing(request, S.SweepState, "sweep")
        filters = spec_mod.request_digest(finetune_pb2.ListSweepsRequest(states=request.states, order=request.order))
        wanted = set(request.states)

        def load(ids: Sequence[str]) -> list[finetune_pb2.Sweep | None]:
            return [self.store.get_sweep(i) for i in ids]

        page, token = await asyncio.to_thread(
            listing.page,
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

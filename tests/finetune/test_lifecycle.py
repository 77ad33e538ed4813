"""The job lifecycle rules on a real Redis, without workers: leases, the reaper, transitions that refuse races,
cancel of queued jobs, full fine-tuning results, and the store's event stream."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from pathlib import Path

import pytest
import redis

from genloom.services.finetune.jobs import JobManager
from genloom.services.finetune.store import Store
from genloom.services.server.errors import FailedPrecondition
from genloom.v1 import finetune_pb2

from .conftest import FineTuneEnv, FineTuneServer, WorkerProcess, tiny_spec

S = finetune_pb2


# The manager's jobs live in a Redis database of their own: in the shared one, the session's finetune server
# runs its reaper every 0.5 s and would re-queue these tests' "lost" jobs to the shared worker under their feet.
ISOLATED_REDIS_URL = os.environ.get("GENLOOM_TEST_FINETUNE_ISOLATED_REDIS", "redis://127.0.0.1:6379/12")


@pytest.fixture
def manager(ft_env: FineTuneEnv) -> JobManager:
    redis.Redis.from_url(ISOLATED_REDIS_URL).flushdb()
    sent: list[str] = []
    models = dataclasses.replace(ft_env.model_settings(), redis_url=ISOLATED_REDIS_URL)
    # No grace for lapsed leases here (they are tested with it in test_hardening.py).
    settings = ft_env.settings(max_attempts=2, lost_worker_grace=0.0)
    m = JobManager(Store.from_url(ISOLATED_REDIS_URL), models, settings, sent.append)
    m.sent = sent  # type: ignore[attr-defined]
    return m


def _job(manager: JobManager) -> finetune_pb2.Job:
    job, created = manager.create(S.CreateJobRequest(spec=tiny_spec()))
    assert created
    return job


def test_validation_queues_and_sends(manager: JobManager) -> None:
    job = _job(manager)
    manager.validate(job.id)
    stored = manager.store.get_job(job.id)
    assert stored is not None and stored.state == S.JOB_STATE_QUEUED
    assert stored.spec.data_format == S.DATA_FORMAT_PROMPT_COMPLETION  # detected and recorded
    assert manager.sent == [job.id]  # type: ignore[attr-defined]
    manager.validate(job.id)  # validating again is a no-op (not validating any more)
    assert manager.sent == [job.id]  # type: ignore[attr-defined]


def test_reaper_requeues_a_lost_worker_then_fails_after_max_attempts(manager: JobManager) -> None:
    job = _job(manager)
    manager.validate(job.id)

    def run(j: finetune_pb2.Job) -> None:
        j.attempts += 1
        j.worker = "gone@test"

    # A worker took it (lease), started it, then vanished: its lease lapses.
    assert manager.store.acquire_lease("lease", job.id, "tok", 0.2)
    manager.store.transition(job.id, S.JOB_STATE_RUNNING, allowed_from=[S.JOB_STATE_QUEUED], message="r", mutate=run)
    assert manager.reap() == [] and manager.store.get_job(job.id).state == S.JOB_STATE_RUNNING  # lease still live
    time.sleep(0.3)
    manager.reap()
    requeued = manager.store.get_job(job.id)
    assert requeued.state == S.JOB_STATE_QUEUED and manager.sent[-1] == job.id  # type: ignore[attr-defined]
    # Second attempt also lost: max_attempts=2 -> failed with WORKER_LOST, never running forever.
    manager.store.transition(job.id, S.JOB_STATE_RUNNING, allowed_from=[S.JOB_STATE_QUEUED], message="r", mutate=run)
    manager.reap()
    failed = manager.store.get_job(job.id)
    assert failed.state == S.JOB_STATE_FAILED and failed.error.code == S.JOB_ERROR_CODE_WORKER_LOST
    assert "gone@test" in failed.error.message


def test_reaper_finds_orphaned_validation(manager: JobManager) -> None:
    job = _job(manager)  # created but never validated (its validator died)
    assert job.id in manager.reap()
    assert manager.store.acquire_lease("vlease", job.id, "other", 5)  # another replica is validating it
    assert job.id not in manager.reap()
    manager.validate(job.id)  # and this one backs off
    assert manager.store.get_job(job.id).state == S.JOB_STATE_VALIDATING


def test_transitions_refuse_unexpected_states(manager: JobManager) -> None:
    job = _job(manager)
    assert manager.cancel(job.id).state == S.JOB_STATE_CANCELLED
    _, moved = manager.store.transition(
        job.id, S.JOB_STATE_RUNNING, allowed_from=[S.JOB_STATE_QUEUED], message="late worker"
    )
    assert not moved and manager.store.get_job(job.id).state == S.JOB_STATE_CANCELLED
    assert manager.cancel(job.id).state == S.JOB_STATE_CANCELLED  # idempotent
    manager.validate(job.id)
    assert manager.sent == []  # type: ignore[attr-defined]  # a cancelled job is never queued
    done = _job(manager)
    manager.fail(done.id, S.JOB_ERROR_CODE_INTERNAL, "x", [S.JOB_STATE_VALIDATING])
    with pytest.raises(FailedPrecondition):
        manager.cancel(done.id)


def test_leases_are_exclusive(manager: JobManager) -> None:
    job_id = f"ftjob-{uuid.uuid4().hex[:26]}"
    assert manager.store.acquire_lease("lease", job_id, "a", 5)
    assert not manager.store.acquire_lease("lease", job_id, "b", 5)
    assert not manager.store.renew_lease("lease", job_id, "b", 5)
    manager.store.release_lease("lease", job_id, "b")  # not b's to release
    assert manager.store.lease_holder("lease", job_id) == "a"
    manager.store.release_lease("lease", job_id, "a")
    assert manager.store.lease_holder("lease", job_id) is None


def test_full_fine_tune_saves_a_whole_model(ft: FineTuneServer, shared_worker: WorkerProcess) -> None:
    spec = tiny_spec(max_steps=3, learning_rate=1e-3)
    spec.method = S.FINE_TUNE_METHOD_FULL
    spec.hyperparameters.ClearField("lora_rank")
    job = ft.wait(ft.create(spec).id)
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    assert not Path(job.result_path).is_absolute()  # records show no server directories
    result = ft.env.artifact_root / job.result_path
    assert (result / "config.json").is_file() and any(result.glob("*.safetensors"))
    assert (result / "tokenizer.json").is_file()
    assert not (result / "adapter_config.json").exists()
    assert job.spec.hyperparameters.learning_rate == 1e-3 and job.spec.hyperparameters.lora_rank == 0


def test_redis_unreachable_is_unavailable(ft_env: FineTuneEnv) -> None:
    import grpc

    from genloom.services.finetune.servicer import FineTuningServicer
    from genloom.v1 import finetune_pb2_grpc

    from ..conftest import start_server

    models = ft_env.model_settings()
    models = type(models)(**{**models.__dict__, "redis_url": "redis://127.0.0.1:1/0"})
    server = start_server([FineTuningServicer(models, ft_env.settings())])
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.target) as channel:
            stub = finetune_pb2_grpc.FineTuningServiceStub(channel)
            for call, request in (
                (stub.GetJob, S.GetJobRequest(job_id="ftjob-" + "0" * 26)),
                (stub.CreateJob, S.CreateJobRequest(spec=tiny_spec())),
                (stub.ListJobs, S.ListJobsRequest()),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call(request, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "GENLOOM_REDIS_URL" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                list(stub.WatchJob(S.WatchJobRequest(job_id="ftjob-" + "0" * 26), timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()

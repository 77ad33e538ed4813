"""Fine-tuning jobs end to end: the real service on a gRPC port, real Redis, real `genloom worker` processes
training a tiny random Llama."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import grpc
import pytest

from genloom.v1 import finetune_pb2

from ..tasks.conftest import bad_request_fields
from .conftest import TINY, FineTuneServer, WorkerProcess, Workers, jsonl, qa_records, tiny_spec

S = finetune_pb2
pytestmark = pytest.mark.timeout(900)


def _states(events: list[Any]) -> list[int]:
    return [e.state for e in events if e.type == S.JOB_EVENT_TYPE_STATE_CHANGE]


def test_lora_job_trains_and_reports(ft: FineTuneServer, shared_worker: WorkerProcess) -> None:
    created = ft.create(tiny_spec(), idempotency_key=f"lora-{time.time()}")
    assert created.state == S.JOB_STATE_VALIDATING
    assert created.id.startswith("ftjob-") and len(created.id) == 32
    assert created.spec.hyperparameters.lora_rank == 8  # defaults filled in
    assert created.spec.training_data.path  # inline data stored, path shown
    events = ft.events(created.id)
    assert _states(events) == [S.JOB_STATE_VALIDATING, S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED]
    job = ft.get(created.id)
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    assert job.result_model == f"ft:{TINY}:test:{job.id}"
    assert job.training_examples + job.validation_examples == 24
    assert job.validation_examples == 2  # default validation_split 0.1 of 24, rounded
    metrics = [e.metrics for e in events if e.type == S.JOB_EVENT_TYPE_METRICS and e.metrics.HasField("train_loss")]
    assert len(metrics) >= 5
    assert metrics[-1].train_loss < metrics[0].train_loss  # it learns
    assert all(m.tokens_per_second > 0 for m in metrics[1:])
    assert metrics[-1].step == metrics[-1].total_steps
    assert job.HasField("best_validation_loss")
    checkpoints = ft.stub.ListCheckpoints(S.ListCheckpointsRequest(job_id=job.id)).checkpoints
    assert [c.step for c in checkpoints] == sorted(c.step for c in checkpoints) and checkpoints
    assert job.last_event_id == events[-1].id
    # The same idempotency key and request: the same job, not a new one.
    again = ft.stub.CreateJob(S.CreateJobRequest(spec=tiny_spec(), idempotency_key=job.idempotency_key))
    assert again.job.id == job.id and not again.created


def test_bad_training_file_fails_with_line_numbers(ft: FineTuneServer, shared_worker: WorkerProcess) -> None:
    lines = jsonl(qa_records(10)).decode().splitlines()
    lines[2] = "{not json"
    lines[6] = '{"prompt": "x"}'
    spec = tiny_spec()
    spec.training_data.jsonl = ("\n".join(lines) + "\n").encode()
    job = ft.wait(ft.create(spec).id)
    assert job.state == S.JOB_STATE_FAILED
    assert job.error.code == S.JOB_ERROR_CODE_INVALID_DATA
    assert [(e.file, e.line) for e in job.error.line_errors] == [("training", 3), ("training", 7)]
    assert "completion" in job.error.line_errors[1].message


def test_create_rejects_bad_requests(ft: FineTuneServer) -> None:
    spec = tiny_spec(learning_rate=5.0, batch_size=0)
    spec.suffix = "bad suffix!"
    with pytest.raises(grpc.RpcError) as err:
        ft.create(spec)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = bad_request_fields(err.value)  # type: ignore[arg-type]
    assert "spec.hyperparameters.learning_rate" in fields and "spec.suffix" in fields
    spec = tiny_spec()
    spec.base_model = "no-such-model"
    with pytest.raises(grpc.RpcError) as err:
        ft.create(spec)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    spec = tiny_spec()
    spec.training_data.path = "/etc/passwd"
    with pytest.raises(grpc.RpcError) as err:
        ft.create(spec)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for call, request in (
        (ft.stub.GetJob, S.GetJobRequest(job_id="ftjob-" + "0" * 26)),
        (ft.stub.CancelJob, S.CancelJobRequest(job_id="ftjob-" + "0" * 26)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        ft.stub.GetJob(S.GetJobRequest(job_id="nope"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        ft.create(tiny_spec(), idempotency_key="reused-key-x")
        other = tiny_spec()
        other.suffix = "other"
        ft.create(other, idempotency_key="reused-key-x")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_cancel_running_job(ft: FineTuneServer, shared_worker: WorkerProcess) -> None:
    spec = tiny_spec(qa_records(64), epochs=100, checkpoint_interval_steps=1000)
    job = ft.create(spec)
    ft.wait(job.id, until=lambda j: j.latest_metrics.step >= 2 or j.state not in (1, 2, 3))
    cancelled = ft.stub.CancelJob(S.CancelJobRequest(job_id=job.id)).job
    assert cancelled.state in (S.JOB_STATE_RUNNING, S.JOB_STATE_CANCELLED)
    final = ft.wait(job.id, timeout=60)
    assert final.state == S.JOB_STATE_CANCELLED
    assert final.latest_metrics.step < final.latest_metrics.total_steps
    assert not ft.stub.ListCheckpoints(S.ListCheckpointsRequest(job_id=job.id)).checkpoints
    # The worker is free at once: the next job runs.
    nxt = ft.wait(ft.create(tiny_spec(max_steps=2)).id, timeout=120)
    assert nxt.state == S.JOB_STATE_SUCCEEDED
    with pytest.raises(grpc.RpcError) as err:
        ft.stub.CancelJob(S.CancelJobRequest(job_id=nxt.id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ft.stub.CancelJob(S.CancelJobRequest(job_id=job.id)).job.state == S.JOB_STATE_CANCELLED


def test_watch_resumes_without_gaps_or_duplicates(ft: FineTuneServer, shared_worker: WorkerProcess) -> None:
    job = ft.create(tiny_spec(max_steps=8))
    full = ft.events(job.id)
    ids = [e.id for e in full]
    assert len(set(ids)) == len(ids)
    # Reconnect from every point: the rest of the stream, exactly.
    for cut in (0, 1, len(full) // 2, len(full) - 1):
        rest = ft.events(job.id, after=ids[cut])
        assert [e.id for e in rest] == ids[cut + 1 :]
    # A live reconnect: read a few events, drop the stream, resume from the last id.
    job2 = ft.create(tiny_spec(max_steps=8))
    stream = ft.stub.WatchJob(S.WatchJobRequest(job_id=job2.id))
    first = [next(stream).event for _ in range(3)]
    stream.cancel()
    rest = ft.events(job2.id, after=first[-1].id)
    got = [e.id for e in first + rest]
    assert got == [e.id for e in ft.events(job2.id, follow=False)]
    with pytest.raises(grpc.RpcError) as err:
        ft.events(job.id, after="1-0")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_kill_worker_resumes_from_checkpoint(
    ft: FineTuneServer, workers: Workers, shared_worker: WorkerProcess
) -> None:
    workers.start("victim").wait_ready()
    spec = tiny_spec(qa_records(64), epochs=40, checkpoint_interval_steps=4, max_checkpoints=2)
    job = ft.create(spec)
    running = ft.wait(job.id, timeout=300, until=lambda j: j.latest_metrics.step >= 6 or j.state in (4, 5, 6))
    assert running.state == S.JOB_STATE_RUNNING
    # Whichever worker took it is killed outright (kill -9 of its process group).
    victim = {w.name: w for w in [*workers.running, shared_worker]}[running.worker]
    victim_name = victim.name
    victim.kill()
    killed_at = ft.get(job.id).latest_metrics.step
    if victim is shared_worker:
        shared_worker.restart()  # later tests need the session's worker; it returns under a new name
    workers.start("rescuer").wait_ready()
    final = ft.wait(job.id, timeout=600)
    assert final.state == S.JOB_STATE_SUCCEEDED, final.error
    assert final.attempts == 2 and final.worker != victim_name  # the rescuer (or the session's shared worker)
    assert 0 < final.resumed_from_step <= killed_at
    events = ft.events(job.id, follow=False)
    warnings = [e.message for e in events if e.level == S.JOB_EVENT_LEVEL_WARNING]
    assert any("stopped reporting" in w for w in warnings)
    # Steps after the resume continue from the checkpoint, not from 1 (the kill may land right on a checkpoint,
    # so the first step of the second attempt is found by the resume note, not by a drop in the step count).
    resumed = next(i for i, e in enumerate(events) if "resuming from checkpoint" in e.message)
    steps = [
        e.metrics.step
        for e in events[resumed:]
        if e.type == S.JOB_EVENT_TYPE_METRICS and e.metrics.HasField("train_loss")
    ]
    assert steps[0] == final.resumed_from_step + 1
    assert _states(events).count(S.JOB_STATE_SUCCEEDED) == 1


def test_two_workers_run_two_jobs_at_once(ft: FineTuneServer, workers: Workers) -> None:
    a, b = workers.start("a"), workers.start("b")
    a.wait_ready(), b.wait_ready()
    spec = tiny_spec(qa_records(64), epochs=6)
    jobs = [ft.create(spec), ft.create(spec)]
    finals = [ft.wait(j.id, timeout=600) for j in jobs]
    assert all(f.state == S.JOB_STATE_SUCCEEDED for f in finals), [f.error for f in finals]
    assert finals[0].worker != finals[1].worker
    # Their running periods overlap.
    assert finals[0].started_at.ToMilliseconds() < finals[1].finished_at.ToMilliseconds()
    assert finals[1].started_at.ToMilliseconds() < finals[0].finished_at.ToMilliseconds()


def test_list_jobs_pages_and_filters(ft: FineTuneServer) -> None:
    made = []
    for i in range(3):
        spec = tiny_spec()
        spec.metadata["k"] = str(i)
        made.append(ft.create(spec))
    assert [m.spec.metadata["k"] for m in made] == ["0", "1", "2"]
    page = ft.stub.ListJobs(S.ListJobsRequest(page_size=2))
    assert [j.id for j in page.jobs] == [made[2].id, made[1].id]
    nxt = ft.stub.ListJobs(S.ListJobsRequest(page_size=2, page_token=page.next_page_token))
    assert nxt.jobs[0].id == made[0].id
    with pytest.raises(grpc.RpcError) as err:
        ft.stub.ListJobs(S.ListJobsRequest(page_size=2, page_token=page.next_page_token, base_model="x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    oldest = ft.stub.ListJobs(S.ListJobsRequest(page_size=1, order=2)).jobs[0]
    assert oldest.created_at.ToMilliseconds() <= made[0].created_at.ToMilliseconds()
    for j in made:
        with contextlib.suppress(grpc.RpcError):
            ft.stub.CancelJob(S.CancelJobRequest(job_id=j.id))


def test_sigterm_checkpoints_and_requeues(ft: FineTuneServer, workers: Workers, shared_worker: WorkerProcess) -> None:
    workers.start("leaving").wait_ready()
    job = ft.create(tiny_spec(qa_records(64), epochs=40, checkpoint_interval_steps=1000))
    running = ft.wait(job.id, timeout=300, until=lambda j: j.latest_metrics.step >= 3 or j.state in (4, 5, 6))
    first = {w.name: w for w in [*workers.running, shared_worker]}[running.worker]
    first_name = first.name
    first.stop()  # SIGTERM: a warm shutdown
    assert first.proc.returncode == 0
    if first is shared_worker:
        shared_worker.restart()  # later tests need the session's worker; it returns under a new name
    workers.start("arriving").wait_ready()
    final = ft.wait(job.id, timeout=600)
    assert final.state == S.JOB_STATE_SUCCEEDED and final.worker != first_name
    events = ft.events(job.id, follow=False)
    assert _states(events) == [
        S.JOB_STATE_VALIDATING,
        S.JOB_STATE_QUEUED,
        S.JOB_STATE_RUNNING,  # first worker
        S.JOB_STATE_QUEUED,
        S.JOB_STATE_RUNNING,
        S.JOB_STATE_SUCCEEDED,  # handed back, resumed elsewhere
    ]
    handed_back = next(e for e in events if "shutting down" in e.message)
    saved = [e.checkpoint.step for e in events if e.type == S.JOB_EVENT_TYPE_CHECKPOINT]
    # Saved at the step it stopped on although the interval is 1,000; resumed from exactly there.
    assert saved[0] >= 3 and f"step {saved[0]}" in handed_back.message
    assert final.resumed_from_step == saved[0]
    assert final.attempts == 1  # the hand-back did not count as a lost worker


def test_early_stopping_keeps_the_best(ft: FineTuneServer, shared_worker: WorkerProcess) -> None:
    # A threshold no evaluation can beat: every evaluation after the first counts as no improvement.
    spec = tiny_spec(
        qa_records(40),
        epochs=20,
        checkpoint_interval_steps=1,
        eval_interval_steps=1,
        early_stopping_patience=2,
        early_stopping_threshold=100.0,
        max_checkpoints=2,
    )
    spec.validation_split = 0.2
    job = ft.wait(ft.create(spec).id)
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    assert job.latest_metrics.step == 3 < job.latest_metrics.total_steps
    events = ft.events(job.id, follow=False)
    evals = [e.metrics.validation_loss for e in events if e.metrics.HasField("validation_loss")]
    assert len(evals) >= 3 and job.best_validation_loss == min(evals)

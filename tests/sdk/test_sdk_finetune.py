"""The SDK and CLI surface of FineTuningService, against a stand-in FineTuningService on a real gRPC server.

The stand-in records each request and answers from records built by hand (jobs, their event logs, checkpoints,
sweeps), so these tests pin down what the client sends for each argument form, how it converts what comes back,
and how `watch()` resumes a broken stream, without Redis or a worker. The real service is tested on its own.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import fields
from datetime import timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from typer.testing import CliRunner

import genloom
from genloom.cli import EXIT_JOB_CANCELLED, EXIT_JOB_FAILED, app
from genloom.resources.finetune import AsyncFineTuning, AsyncSweeps, FineTuning, Sweeps
from genloom.services.server import errors
from genloom.types import (
    ClassifyExample,
    FineTuneJob,
    FineTuneJobFailed,
    FineTuneSpec,
    FloatRange,
    Hyperparameters,
    IntRange,
    JobEvent,
    WaitTimeoutError,
)
from genloom.types import finetune as ft_types
from genloom.v1 import common_pb2, finetune_pb2, finetune_pb2_grpc, tasks_pb2

from ..conftest import ServerThread, start_server

BASE = "smollm2-135m-instruct"


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=1_718_000_000 + seconds)


def _job_id(n: int) -> str:
    return f"ftjob-{n:026d}"


def _event(job_id: str, n: int, **fields: Any) -> finetune_pb2.JobEvent:
    fields.setdefault("level", finetune_pb2.JOB_EVENT_LEVEL_INFO)
    fields.setdefault("message", f"event {n}")
    return finetune_pb2.JobEvent(id=f"{1_718_000_000_000 + n}-0", job_id=job_id, created_at=_ts(n), **fields)


def _state(job_id: str, n: int, state: int, **fields: Any) -> finetune_pb2.JobEvent:
    return _event(job_id, n, type=finetune_pb2.JOB_EVENT_TYPE_STATE_CHANGE, state=state, **fields)


def _metrics(job_id: str, n: int, step: int, total: int = 4, **metrics: Any) -> finetune_pb2.JobEvent:
    values = finetune_pb2.JobMetrics(step=step, total_steps=total, epoch=step / 2, train_loss=2.0 - step / 4, **metrics)
    return _event(job_id, n, type=finetune_pb2.JOB_EVENT_TYPE_METRICS, metrics=values, message=f"step {step}/{total}")


def _checkpoint_pb(step: int) -> finetune_pb2.Checkpoint:
    return finetune_pb2.Checkpoint(
        name=f"checkpoint-{step}",
        step=step,
        epoch=step / 2,
        train_loss=1.5,
        path=f"/artifacts/ckpt/checkpoint-{step}",
        created_at=_ts(100 + step),
        size_bytes=3 * 2**20,
    )


def _succeeding_events(job_id: str) -> list[finetune_pb2.JobEvent]:
    """A whole run: validating, queued, running, 2 metrics, a checkpoint, succeeded."""
    return [
        _state(job_id, 1, finetune_pb2.JOB_STATE_VALIDATING),
        _state(job_id, 2, finetune_pb2.JOB_STATE_QUEUED),
        _state(job_id, 3, finetune_pb2.JOB_STATE_RUNNING),
        _metrics(job_id, 4, step=2, eta_seconds=30.0),
        _metrics(job_id, 5, step=4, validation_loss=1.25, eta_seconds=0.0),
        _event(job_id, 6, type=finetune_pb2.JOB_EVENT_TYPE_CHECKPOINT, checkpoint=_checkpoint_pb(4)),
        _state(job_id, 7, finetune_pb2.JOB_STATE_SUCCEEDED, result_model=f"ft:{BASE}:demo:{job_id}"),
    ]


_LINE_ERRORS = [
    finetune_pb2.LineError(file="training", line=3, message="missing key 'completion'"),
    finetune_pb2.LineError(file="training", line=9, message="1,532 tokens > max_seq_length 1,024"),
]


def _failing_events(job_id: str) -> list[finetune_pb2.JobEvent]:
    error = finetune_pb2.JobError(
        code=finetune_pb2.JOB_ERROR_CODE_INVALID_DATA, message="2 invalid lines", line_errors=_LINE_ERRORS
    )
    return [
        _state(job_id, 1, finetune_pb2.JOB_STATE_VALIDATING),
        _event(job_id, 2, level=finetune_pb2.JOB_EVENT_LEVEL_WARNING, type=finetune_pb2.JOB_EVENT_TYPE_MESSAGE),
        _state(job_id, 3, finetune_pb2.JOB_STATE_FAILED, level=finetune_pb2.JOB_EVENT_LEVEL_ERROR, error=error),
    ]


def _final_record(job: finetune_pb2.Job, event: finetune_pb2.JobEvent) -> finetune_pb2.Job:
    """The job record after its terminal event."""
    final = finetune_pb2.Job()
    final.CopyFrom(job)
    final.state = event.state
    final.finished_at.CopyFrom(event.created_at)
    final.last_event_id = event.id
    if event.result_model:
        final.result_model = event.result_model
    if event.HasField("error"):
        final.error.CopyFrom(event.error)
    return final


class WatchBreak(typing.NamedTuple):
    """How the stand-in ends one WatchJob call early: after `after` events, with `error` (None: end cleanly)."""

    after: int
    error: errors.ServiceError | None = None
    replay: bool = False  # ignore after_event_id (a server that resends events already delivered)


class StandInFineTuning(finetune_pb2_grpc.FineTuningServiceServicer):
    """Keeps jobs, event logs, checkpoints and sweeps in memory; records every request and its metadata."""

    name = "genloom.v1.FineTuningService"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: list[Any] = []
        self.request_ids: list[str] = []
        self.fail_next: list[errors.ServiceError] = []
        self.jobs: dict[str, finetune_pb2.Job] = {}
        self.events: dict[str, list[finetune_pb2.JobEvent]] = {}
        self.checkpoints: dict[str, list[finetune_pb2.Checkpoint]] = {}
        self.sweeps: dict[str, finetune_pb2.Sweep] = {}
        self.sweep_after_gets: dict[str, tuple[int, finetune_pb2.Sweep]] = {}
        self.watch_breaks: list[WatchBreak] = []
        self.events_for_new_jobs: Callable[[str], list[finetune_pb2.JobEvent]] | None = None
        self._keys: dict[str, str] = {}
        self._count = 0

    def add_to_server(self, server: grpc.aio.Server) -> None:
        finetune_pb2_grpc.add_FineTuningServiceServicer_to_server(self, server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _record(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.requests.append(request)
        self.request_ids.append(dict(context.invocation_metadata())["x-request-id"])
        if self.fail_next:
            raise self.fail_next.pop(0)

    def of_type(self, name: str) -> list[Any]:
        return [r for r in self.requests if type(r).__name__ == name]

    def add_job(self, state: int = finetune_pb2.JOB_STATE_RUNNING, **fields: Any) -> finetune_pb2.Job:
        self._count += 1
        job = finetune_pb2.Job(
            id=_job_id(self._count),
            state=state,
            spec=finetune_pb2.JobSpec(
                base_model=fields.pop("base_model", BASE),
                method=finetune_pb2.FINE_TUNE_METHOD_LORA,
                training_data=finetune_pb2.TrainingDataSource(path=f"/artifacts/data/{self._count}/training.jsonl"),
                hyperparameters=finetune_pb2.Hyperparameters(
                    epochs=3, batch_size=8, learning_rate=2e-4, lr_scheduler=finetune_pb2.LR_SCHEDULER_LINEAR
                ),
            ),
            created_at=_ts(self._count),
            **fields,
        )
        self.jobs[job.id] = job
        return job

    def _job(self, job_id: str) -> finetune_pb2.Job:
        if job_id not in self.jobs:
            raise errors.NotFound(f"no fine-tuning job {job_id!r}")
        return self.jobs[job_id]

    async def CreateJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(request, context)
        key = request.idempotency_key
        if key and key in self._keys:
            return finetune_pb2.CreateJobResponse(job=self.jobs[self._keys[key]], created=False)
        job = self.add_job(finetune_pb2.JOB_STATE_VALIDATING, idempotency_key=key)
        job.spec.CopyFrom(request.spec)
        if request.spec.training_data.HasField("jsonl"):  # inline data is stored; the record shows the path
            job.spec.training_data.path = f"/artifacts/uploads/{job.id}/training.jsonl"
        if request.HasField("webhook"):
            job.webhook.url = request.webhook.url
            job.webhook.has_secret = bool(request.webhook.secret)
        if key:
            self._keys[key] = job.id
        if self.events_for_new_jobs is not None:
            self.events[job.id] = self.events_for_new_jobs(job.id)
        return finetune_pb2.CreateJobResponse(job=job, created=True)

    async def GetJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(request, context)
        return finetune_pb2.GetJobResponse(job=self._job(request.job_id))

    async def ListJobs(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(request, context)
        jobs = [
            j
            for j in reversed(self.jobs.values())  # newest first
            if (not request.states or j.state in request.states)
            and (not request.base_model or j.spec.base_model == request.base_model)
        ]
        start = int(request.page_token or 0)
        end = start + (request.page_size or 20)
        return finetune_pb2.ListJobsResponse(jobs=jobs[start:end], next_page_token=str(end) if end < len(jobs) else "")

    async def CancelJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(request, context)
        job = self._job(request.job_id)
        if job.state in (finetune_pb2.JOB_STATE_SUCCEEDED, finetune_pb2.JOB_STATE_FAILED):
            raise errors.FailedPrecondition(f"job {job.id} already ended")
        if job.state == finetune_pb2.JOB_STATE_RUNNING:
            job.cancel_requested = True
        else:
            job.state = finetune_pb2.JOB_STATE_CANCELLED
        return finetune_pb2.CancelJobResponse(job=job)

    async def WatchJob(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self._record(request, context)
        job = self._job(request.job_id)
        events = self.events.get(job.id, [])
        ids = [e.id for e in events]
        brk = self.watch_breaks.pop(0) if self.watch_breaks else None
        start = 0
        if request.after_event_id and not (brk and brk.replay):
            if request.after_event_id not in ids:
                raise errors.InvalidArgument.field("after_event_id", "not an event of this job")
            start = ids.index(request.after_event_id) + 1
        for sent, event in enumerate(events[start:]):
            if brk is not None and sent == brk.after:
                if brk.error is not None:
                    raise brk.error
                return
            yield finetune_pb2.WatchJobResponse(event=event)
            if event.state in (
                finetune_pb2.JOB_STATE_SUCCEEDED,
                finetune_pb2.JOB_STATE_FAILED,
                finetune_pb2.JOB_STATE_CANCELLED,
            ):
                self.jobs[job.id] = _final_record(job, event)
                return
        if brk is not None and brk.error is not None:
            raise brk.error

    async def ListCheckpoints(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(request, context)
        self._job(request.job_id)
        return finetune_pb2.ListCheckpointsResponse(checkpoints=self.checkpoints.get(request.job_id, []))

    def add_sweep(self, state: int = finetune_pb2.SWEEP_STATE_RUNNING) -> finetune_pb2.Sweep:
        self._count += 1
        trials = []
        for index, (rate, loss) in enumerate([(1e-4, 1.5), (3e-4, 1.2)]):
            trials.append(
                finetune_pb2.Trial(
                    index=index,
                    job_id=_job_id(100 + index),
                    state=finetune_pb2.JOB_STATE_SUCCEEDED,
                    parameters=[
                        finetune_pb2.TrialParameter(
                            name="learning_rate", value=finetune_pb2.ParameterValue(float_value=rate)
                        ),
                        finetune_pb2.TrialParameter(
                            name="lora_target_modules",
                            value=finetune_pb2.ParameterValue(
                                string_list=finetune_pb2.StringList(values=["q_proj", "v_proj"])
                            ),
                        ),
                    ],
                    hyperparameters=finetune_pb2.Hyperparameters(learning_rate=rate, epochs=1),
                    objective_value=loss,
                    validation_loss=loss,
                    result_model=f"ft:{BASE}:sw:{_job_id(100 + index)}",
                )
            )
        sweep = finetune_pb2.Sweep(
            id=f"ftsweep-{self._count:026d}",
            state=state,
            spec=finetune_pb2.SweepSpec(
                base_job=finetune_pb2.JobSpec(
                    base_model=BASE, training_data=finetune_pb2.TrainingDataSource(path="/artifacts/data/t.jsonl")
                ),
                search_space=[
                    finetune_pb2.SearchDimension(
                        name="learning_rate", float_range=finetune_pb2.FloatRange(min=1e-4, max=3e-4, log=True)
                    ),
                    finetune_pb2.SearchDimension(
                        name="lora_target_modules",
                        choice=finetune_pb2.ChoiceSpace(
                            values=[
                                finetune_pb2.ParameterValue(
                                    string_list=finetune_pb2.StringList(values=["q_proj", "v_proj"])
                                )
                            ]
                        ),
                    ),
                ],
                method=finetune_pb2.SWEEP_METHOD_GRID,
                max_trials=2,
                parallelism=2,
                objective=finetune_pb2.SWEEP_OBJECTIVE_VALIDATION_LOSS,
            ),
            trials=trials,
            best_trial=trials[1],
            created_at=_ts(self._count),
        )
        self.sweeps[sweep.id] = sweep
        return sweep

    async def CreateSweep(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(request, context)
        sweep = self.add_sweep()
        sweep.spec.CopyFrom(request.spec)
        sweep.idempotency_key = request.idempotency_key
        return finetune_pb2.CreateSweepResponse(sweep=sweep, created=True)

    async def GetSweep(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(request, context)
        if request.sweep_id not in self.sweeps:
            raise errors.NotFound(f"no sweep {request.sweep_id!r}")
        if request.sweep_id in self.sweep_after_gets:  # the sweep ends after a number of polls
            polls, final = self.sweep_after_gets[request.sweep_id]
            if polls <= 1:
                self.sweeps[request.sweep_id] = final
                del self.sweep_after_gets[request.sweep_id]
            else:
                self.sweep_after_gets[request.sweep_id] = (polls - 1, final)
        return finetune_pb2.GetSweepResponse(sweep=self.sweeps[request.sweep_id])

    async def ListSweeps(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(request, context)
        sweeps = [s for s in reversed(self.sweeps.values()) if not request.states or s.state in request.states]
        start = int(request.page_token or 0)
        end = start + (request.page_size or 20)
        return finetune_pb2.ListSweepsResponse(
            sweeps=sweeps[start:end], next_page_token=str(end) if end < len(sweeps) else ""
        )

    async def CancelSweep(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(request, context)
        sweep = self.sweeps[request.sweep_id]
        sweep.state = finetune_pb2.SWEEP_STATE_CANCELLED
        return finetune_pb2.CancelSweepResponse(sweep=sweep)


@pytest.fixture(scope="module")
def stand_in() -> Iterator[tuple[ServerThread, StandInFineTuning]]:
    service = StandInFineTuning()
    server = start_server([service])
    server.wait_ready()
    yield server, service
    server.stop()


@pytest.fixture
def client(stand_in: tuple[ServerThread, StandInFineTuning]) -> Iterator[genloom.Client]:
    with genloom.Client(target=stand_in[0].target, max_retries=1, timeout=10) as client:
        yield client


@pytest.fixture
def service(stand_in: tuple[ServerThread, StandInFineTuning]) -> StandInFineTuning:
    stand_in[1].reset()
    return stand_in[1]


def _jsonl_lines(data: bytes) -> list[Any]:
    return [json.loads(line) for line in data.decode().splitlines()]


# --- create --------------------------------------------------------------------------------------------------------


def test_create_sends_a_local_file_inline_with_hyperparameters_and_webhook(
    client: genloom.Client, service: StandInFineTuning, tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"prompt": "2+2=", "completion": "4"}\n{"prompt": "3+3=", "completion": "6"}\n')
    job = client.finetune.create(
        data,
        model=BASE,
        method="full",
        validation_file=[{"prompt": "1+1=", "completion": "2"}],
        data_format="prompt_completion",
        hyperparameters={
            "epochs": 2,
            "learning_rate": 1e-4,
            "lr_scheduler": "COSINE",
            "precision": "bf16",
            "lora_target_modules": ["q_proj", "v_proj"],
            "warmup_ratio": 0.0,
            "seed": 0,
            "gradient_checkpointing": True,
            "lora_alpha": 16,
        },
        suffix="math",
        validation_split=0.0,
        truncate_long_examples=True,
        metadata={"team": "search"},
        idempotency_key="key-1",
        webhook_url="https://example.com/hook",
        webhook_secret="s3cret",
    )
    request = service.requests[-1]
    spec = request.spec
    assert spec.training_data.jsonl == data.read_bytes()
    assert _jsonl_lines(spec.validation_data.jsonl) == [{"prompt": "1+1=", "completion": "2"}]
    assert spec.base_model == BASE and spec.method == finetune_pb2.FINE_TUNE_METHOD_FULL
    assert spec.data_format == finetune_pb2.DATA_FORMAT_PROMPT_COMPLETION
    hp = spec.hyperparameters
    assert hp.epochs == 2 and hp.learning_rate == pytest.approx(1e-4)
    assert hp.lr_scheduler == finetune_pb2.LR_SCHEDULER_COSINE and hp.precision == finetune_pb2.PRECISION_BF16
    assert list(hp.lora_target_modules) == ["q_proj", "v_proj"] and hp.gradient_checkpointing
    assert hp.lora_alpha == 16.0
    # Explicit zeros of optional fields are sent as set; fields not given stay unset (the server's defaults).
    assert hp.HasField("warmup_ratio") and hp.warmup_ratio == 0.0 and hp.HasField("seed") and hp.seed == 0
    assert not hp.HasField("dropout") and not hp.HasField("max_grad_norm") and hp.batch_size == 0
    assert spec.suffix == "math" and spec.HasField("validation_split") and spec.validation_split == 0.0
    assert spec.truncate_long_examples and dict(spec.metadata) == {"team": "search"}
    assert request.idempotency_key == "key-1"
    assert request.webhook.url == "https://example.com/hook" and request.webhook.secret == "s3cret"

    assert isinstance(job, FineTuneJob) and job.state == "validating" and job.created is True
    assert not job.is_terminal and job.idempotency_key == "key-1"
    # The record shows the stored path of the inline data, so its spec can be sent again as a path.
    assert job.spec.training_file == f"/artifacts/uploads/{job.id}/training.jsonl" and job.spec.send_path
    assert job.hyperparameters.lr_scheduler == "cosine" and job.hyperparameters.precision == "bf16"
    assert job.hyperparameters.lora_target_modules == ("q_proj", "v_proj") and job.hyperparameters.seed == 0
    assert job.hyperparameters.dropout is None
    assert job.webhook is not None and job.webhook.has_secret and job.webhook.url == "https://example.com/hook"
    assert job.created_at is not None and job.created_at.tzinfo == timezone.utc
    assert job.started_at is None and job.error is None and job.latest_metrics is None


def test_create_bytes_records_server_paths_and_task_records(client: genloom.Client, service: StandInFineTuning) -> None:
    raw = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    client.finetune.create(raw)
    first = service.requests[-1]
    assert first.spec.training_data.jsonl == raw
    assert first.spec.method == finetune_pb2.FINE_TUNE_METHOD_LORA
    assert first.spec.data_format == finetune_pb2.DATA_FORMAT_UNSPECIFIED and not first.spec.HasField("task_options")
    assert not first.spec.HasField("validation_data") and not first.spec.HasField("validation_split")
    assert not first.HasField("webhook")

    records: list[Any] = [
        {"text": "great film", "label": "pos"},
        ClassifyExample("dull", "neg"),
        ClassifyExample("good and bad", ["pos", "neg"]),
    ]
    client.finetune.create(records, task="classify", task_options={"labels": ["pos", ("neg", "negative")]})
    second = service.requests[-1]
    assert _jsonl_lines(second.spec.training_data.jsonl) == [
        {"text": "great film", "label": "pos"},
        {"text": "dull", "label": "neg"},
        {"text": "good and bad", "labels": ["pos", "neg"]},
    ]
    assert second.spec.data_format == finetune_pb2.DATA_FORMAT_TASK_RECORDS  # implied by task
    assert second.spec.task == tasks_pb2.TASK_TYPE_CLASSIFY
    labels = [(label.name, label.description) for label in second.spec.task_options.labels]
    assert labels == [("pos", ""), ("neg", "negative")]

    conversations = [[{"role": "user", "content": "hi"}, genloom.ChatMessage("assistant", "hello")]]
    client.finetune.create(conversations, idempotency_key="")
    third = service.requests[-1]
    assert _jsonl_lines(third.spec.training_data.jsonl) == [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ]
    assert third.idempotency_key == ""

    client.finetune.create("data/train.jsonl", validation_file="data/valid.jsonl", send_path=True)
    fourth = service.requests[-1]
    assert fourth.spec.training_data.path == "data/train.jsonl"
    assert fourth.spec.validation_data.path == "data/valid.jsonl"
    # Without a key of the caller's, each call gets its own (so retries of one call are safe, calls are not merged).
    keys = [first.idempotency_key, second.idempotency_key, fourth.idempotency_key]
    assert all(keys) and len(set(keys)) == 3


def test_bad_arguments_fail_before_anything_is_sent(client: genloom.Client, service: StandInFineTuning) -> None:
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        client.finetune.create(b"{}", hyperparameters={"learning_rat": 1e-4})
    with pytest.raises(ValueError, match=r"hyperparameters.epochs: expected a number, not '3'"):
        client.finetune.create(b"{}", hyperparameters={"epochs": "3"})
    with pytest.raises(ValueError, match=r"hyperparameters.epochs: expected a whole number"):
        client.finetune.create(b"{}", hyperparameters={"epochs": 2.5})
    with pytest.raises(ValueError, match=r"hyperparameters.batch_size: must be 0 or more"):
        client.finetune.create(b"{}", hyperparameters={"batch_size": -1})
    with pytest.raises(ValueError, match=r"hyperparameters.lr_scheduler: expected one of 'linear', 'cosine'"):
        client.finetune.create(b"{}", hyperparameters={"lr_scheduler": "cosin"})
    with pytest.raises(ValueError, match=r"hyperparameters.gradient_checkpointing: expected True or False"):
        client.finetune.create(b"{}", hyperparameters={"gradient_checkpointing": 1})
    with pytest.raises(ValueError, match="method must be one of 'lora', 'full'"):
        client.finetune.create(b"{}", method="qlora")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="send_path=True"):
        client.finetune.create("no/such/file.jsonl")
    with pytest.raises(ValueError, match="send_path=True needs a path"):
        client.finetune.create(b"{}", send_path=True)
    with pytest.raises(ValueError, match="webhook_secret needs webhook_url"):
        client.finetune.create(b"{}", webhook_secret="s")
    with pytest.raises(ValueError, match="needs task"):
        client.finetune.create(b"{}", data_format="task_records")
    with pytest.raises(ValueError, match="empty"):
        client.finetune.create([])
    with pytest.raises(TypeError, match="did you mean"):
        client.finetune.create(b"{}", task="classify", task_options={"labels": "pos,neg"})
    with pytest.raises(ValueError, match="limit"):
        client.finetune.list(limit=0)
    assert service.requests == []


def test_create_is_retried_under_one_idempotency_key(client: genloom.Client, service: StandInFineTuning) -> None:
    service.fail_next.append(errors.Unavailable("redis unreachable"))
    job = client.finetune.create(b'{"prompt": "a", "completion": "b"}\n')
    first, retry = service.of_type("CreateJobRequest")
    assert first.idempotency_key and first.idempotency_key == retry.idempotency_key
    assert len(set(service.request_ids)) == 1 and len(service.jobs) == 1 and job.created is True
    again = client.finetune.create(b'{"prompt": "a", "completion": "b"}\n', idempotency_key=first.idempotency_key)
    assert again.id == job.id and again.created is False


def test_server_errors_map_to_typed_exceptions(client: genloom.Client, service: StandInFineTuning) -> None:
    service.fail_next.append(
        errors.InvalidArgument(
            "bad hyperparameters",
            [
                errors.FieldViolation("spec.hyperparameters.learning_rate", "must be at most 1"),
                errors.FieldViolation("spec.hyperparameters.lora_rank", "must be at most 64"),
            ],
        )
    )
    with pytest.raises(genloom.InvalidArgumentError) as invalid:
        client.finetune.create(b"{}", hyperparameters={"learning_rate": 5.0, "lora_rank": 128})
    assert invalid.value.field_violations == [
        genloom.FieldViolation("spec.hyperparameters.learning_rate", "must be at most 1"),
        genloom.FieldViolation("spec.hyperparameters.lora_rank", "must be at most 64"),
    ]
    with pytest.raises(genloom.NotFoundError, match="no fine-tuning job 'ftjob-missing'"):
        client.finetune.get("ftjob-missing")
    with pytest.raises(genloom.NotFoundError):
        list(client.finetune.watch("ftjob-missing"))
    done = service.add_job(finetune_pb2.JOB_STATE_SUCCEEDED)
    with pytest.raises(genloom.FailedPreconditionError, match="already ended"):
        client.finetune.cancel(done.id)
    service.fail_next.append(errors.AlreadyExists("idempotency key reused with a different request"))
    with pytest.raises(genloom.AlreadyExistsError):
        client.finetune.create(b"{}", idempotency_key="k")
    service.fail_next.append(errors.PermissionDenied("path outside GENLOOM_FINETUNE_DATA_ROOT"))
    with pytest.raises(genloom.PermissionDeniedError):
        client.finetune.create("/etc/passwd", send_path=True)


# --- get, list, cancel, checkpoints --------------------------------------------------------------------------------


def test_get_converts_the_whole_record(client: genloom.Client, service: StandInFineTuning) -> None:
    job = service.add_job(
        finetune_pb2.JOB_STATE_FAILED,
        started_at=_ts(10),
        finished_at=_ts(20),
        error=finetune_pb2.JobError(
            code=finetune_pb2.JOB_ERROR_CODE_INVALID_DATA, message="2 invalid lines", line_errors=_LINE_ERRORS
        ),
        latest_metrics=finetune_pb2.JobMetrics(step=3, total_steps=12, epoch=0.25, train_loss=1.5, eta_seconds=90),
        best_validation_loss=1.4,
        sweep_id="ftsweep-x",
        trial_index=0,
        attempts=2,
        resumed_from_step=2,
        training_examples=90,
        validation_examples=10,
        last_event_id="1718000000003-0",
    )
    got = client.finetune.get(job.id)
    assert got.id == job.id and got.state == "failed" and got.is_terminal
    assert got.base_model == BASE and got.method == "lora"
    assert got.hyperparameters == Hyperparameters(
        epochs=3,
        batch_size=8,
        gradient_accumulation_steps=0,
        learning_rate=2e-4,
        warmup_steps=0,
        lr_scheduler="linear",
        weight_decay=0.0,
        max_seq_length=0,
        early_stopping_patience=0,
        early_stopping_threshold=0.0,
        gradient_checkpointing=False,
        lora_rank=0,
        lora_alpha=0.0,
        lora_target_modules=(),
        checkpoint_interval_steps=0,
        eval_interval_steps=0,
        max_steps=0,
        logging_interval_steps=0,
        max_checkpoints=0,
    )
    assert got.latest_metrics is not None and got.latest_metrics.progress == pytest.approx(0.25)
    assert got.latest_metrics.validation_loss is None and got.latest_metrics.eta_seconds == 90
    assert got.best_validation_loss == pytest.approx(1.4) and got.trial_index == 0 and got.attempts == 2
    assert got.error is not None and got.error.code == "invalid_data"
    assert [str(e) for e in got.error.line_errors] == [
        "training line 3: missing key 'completion'",
        "training line 9: 1,532 tokens > max_seq_length 1,024",
    ]
    assert got.finished_at is not None and (got.finished_at - got.created_at).total_seconds() == 19  # type: ignore[operator]
    with pytest.raises(FineTuneJobFailed) as failed:
        got.raise_for_status()
    assert failed.value.job is got and failed.value.error.code == "invalid_data"
    assert "training line 9: 1,532 tokens" in str(failed.value) and len(failed.value.line_errors) == 2


def test_list_walks_every_page(client: genloom.Client, service: StandInFineTuning) -> None:
    ids = [
        service.add_job(finetune_pb2.JOB_STATE_SUCCEEDED if i % 2 else finetune_pb2.JOB_STATE_RUNNING).id
        for i in range(5)
    ]
    page = client.finetune.list(limit=2)
    assert [j.id for j in page.data] == ids[::-1][:2] and page.has_next_page()
    assert len(service.requests) == 1  # one page fetched so far
    assert [j.id for j in page] == ids[::-1]  # every page, newest first
    assert [(r.page_size, r.page_token) for r in service.requests] == [(2, ""), (2, "2"), (2, "4")]
    assert [len(p.data) for p in page.iter_pages()] == [2, 2, 1]
    service.requests.clear()
    succeeded = list(client.finetune.list(state=["succeeded"], base_model=BASE, sweep_id="ftsweep-y", order="asc"))
    assert {j.state for j in succeeded} == {"succeeded"} and len(succeeded) == 2
    request = service.requests[-1]
    assert list(request.states) == [finetune_pb2.JOB_STATE_SUCCEEDED] and request.page_size == 20
    assert request.base_model == BASE and request.sweep_id == "ftsweep-y"
    assert request.order == common_pb2.SORT_ORDER_ASCENDING
    with pytest.raises(ValueError, match="state must be one of"):
        client.finetune.list(state="done")  # type: ignore[arg-type]


def test_cancel_and_checkpoints(client: genloom.Client, service: StandInFineTuning) -> None:
    queued = service.add_job(finetune_pb2.JOB_STATE_QUEUED)
    running = service.add_job(finetune_pb2.JOB_STATE_RUNNING)
    assert client.finetune.cancel(queued.id).state == "cancelled"
    still = client.finetune.cancel(running.id)
    assert still.state == "running" and still.cancel_requested
    service.checkpoints[running.id] = [_checkpoint_pb(2), _checkpoint_pb(4)]
    checkpoints = client.finetune.checkpoints(running.id)
    assert [(c.name, c.step, c.epoch) for c in checkpoints] == [("checkpoint-2", 2, 1.0), ("checkpoint-4", 4, 2.0)]
    assert checkpoints[0].validation_loss is None and checkpoints[0].train_loss == 1.5
    assert checkpoints[0].created_at is not None and checkpoints[0].size_bytes == 3 * 2**20


# --- watch and wait ------------------------------------------------------------------------------------------------


def test_watch_resumes_after_unavailable_without_gaps_or_duplicates(
    client: genloom.Client, service: StandInFineTuning
) -> None:
    job = service.add_job(finetune_pb2.JOB_STATE_VALIDATING)
    service.events[job.id] = _succeeding_events(job.id)
    service.watch_breaks = [WatchBreak(2, errors.Unavailable("server restarting"))]
    with client.finetune.watch(job.id) as stream:
        events = list(stream)
    assert [e.id for e in events] == [e.id for e in service.events[job.id]]
    watches = service.of_type("WatchJobRequest")
    assert [w.after_event_id for w in watches] == ["", events[1].id]  # resumed after the last event received
    assert all(w.HasField("follow") and w.follow for w in watches)
    assert stream.reconnects == 1 and stream.last_event_id == events[-1].id
    assert [e.type for e in events] == ["state_change"] * 3 + ["metrics", "metrics", "checkpoint", "state_change"]
    assert [e.state for e in events[:3]] == ["validating", "queued", "running"]
    assert events[4].metrics is not None and events[4].metrics.validation_loss == 1.25
    assert events[5].checkpoint is not None and events[5].checkpoint.name == "checkpoint-4"
    final = stream.final
    assert final is events[-1] and final.is_terminal and final.result_model == f"ft:{BASE}:demo:{job.id}"
    assert stream.state == "succeeded" and stream.metrics is not None and stream.metrics.step == 4


def test_watch_reopens_a_stream_that_ends_early_and_drops_resent_events(
    client: genloom.Client, service: StandInFineTuning
) -> None:
    job = service.add_job()
    service.events[job.id] = _succeeding_events(job.id)
    # The first stream ends cleanly after 3 events although the job has not ended; the second replays everything.
    service.watch_breaks = [WatchBreak(3), WatchBreak(99, replay=True)]
    events = list(client.finetune.watch(job.id))
    assert [e.id for e in events] == [e.id for e in service.events[job.id]]  # each event exactly once
    assert [w.after_event_id for w in service.of_type("WatchJobRequest")] == ["", events[2].id]


def test_watch_without_follow_and_from_an_event(client: genloom.Client, service: StandInFineTuning) -> None:
    job = service.add_job()
    service.events[job.id] = _succeeding_events(job.id)[:4]  # still running
    stored = service.events[job.id]
    events = list(client.finetune.watch(job.id, after_event_id=stored[1].id, follow=False))
    assert [e.id for e in events] == [e.id for e in stored[2:]]
    request = service.of_type("WatchJobRequest")[-1]
    assert request.after_event_id == stored[1].id and request.HasField("follow") and not request.follow


def test_watch_gives_up_after_max_reconnects(client: genloom.Client, service: StandInFineTuning) -> None:
    job = service.add_job()
    service.events[job.id] = _succeeding_events(job.id)
    service.watch_breaks = [WatchBreak(0, errors.Unavailable("down")) for _ in range(3)]
    with pytest.raises(genloom.UnavailableError, match="down"):
        list(client.finetune.watch(job.id, max_reconnects=1))
    assert len(service.of_type("WatchJobRequest")) == 2
    service.watch_breaks = [WatchBreak(0, errors.InvalidArgument("after_event_id: not an event of this job"))]
    with pytest.raises(genloom.InvalidArgumentError):  # not a broken stream: never retried
        list(client.finetune.watch(job.id))
    assert len(service.of_type("WatchJobRequest")) == 3


def test_wait_returns_the_terminal_job(client: genloom.Client, service: StandInFineTuning) -> None:
    job = service.add_job()
    service.events[job.id] = _succeeding_events(job.id)
    job.last_event_id = service.events[job.id][3].id
    seen: list[JobEvent] = []
    final = client.finetune.wait(job.id, on_event=seen.append)
    assert final.state == "succeeded" and final.result_model == f"ft:{BASE}:demo:{job.id}"
    assert final.raise_for_status() is final
    # Only the events after the record's last_event_id are replayed to on_event.
    assert [e.id for e in seen] == [e.id for e in service.events[job.id][4:]]
    assert service.of_type("WatchJobRequest")[0].after_event_id == job.last_event_id

    failing = service.add_job(finetune_pb2.JOB_STATE_VALIDATING)
    service.events[failing.id] = _failing_events(failing.id)
    failed = client.finetune.wait(failing.id)  # a failure is returned, not raised
    assert failed.state == "failed" and failed.error is not None and len(failed.error.line_errors) == 2
    with pytest.raises(FineTuneJobFailed, match="missing key 'completion'"):
        failed.raise_for_status()

    watches = len(service.of_type("WatchJobRequest"))
    assert client.finetune.wait(failing.id).state == "failed"  # already ended: no stream opened
    assert len(service.of_type("WatchJobRequest")) == watches


def test_wait_times_out_while_the_job_runs(client: genloom.Client, service: StandInFineTuning) -> None:
    job = service.add_job()
    service.events[job.id] = _succeeding_events(job.id)[:3]  # never ends
    with pytest.raises(WaitTimeoutError, match="timeout"):
        client.finetune.wait(job.id, timeout=0.6)
    assert isinstance(WaitTimeoutError("x"), TimeoutError)


# --- sweeps --------------------------------------------------------------------------------------------------------


def test_sweep_create_sends_the_search_space_mini_language(client: genloom.Client, service: StandInFineTuning) -> None:
    sweep = client.finetune.sweeps.create(
        {"training_file": b'{"prompt": "a", "completion": "b"}\n', "model": BASE, "hyperparameters": {"epochs": 1}},
        search_space={
            "learning_rate": [1e-4, 3e-4],
            "lr_scheduler": ["linear", "Cosine"],
            "lora_target_modules": [["q_proj", "v_proj"], "all-linear"],
            "warmup_ratio": FloatRange(0.0, 0.1, grid_points=3),
            "weight_decay": (0.0, 0.1),
            "lora_rank": IntRange(4, 16, step=4),
            "epochs": range(1, 4),
            "max_steps": (10, 40),
            "lora_alpha": [16, 32.5],
        },
        method="bayesian",
        max_trials=6,
        parallelism=3,
        objective="train_loss",
        seed=7,
        webhook_url="https://example.com/sweep",
    )
    request = service.requests[-1]
    spec = request.spec
    assert spec.base_job.training_data.jsonl == b'{"prompt": "a", "completion": "b"}\n'
    assert spec.base_job.base_model == BASE and spec.base_job.hyperparameters.epochs == 1
    assert (spec.method, spec.max_trials, spec.parallelism, spec.seed) == (finetune_pb2.SWEEP_METHOD_BAYESIAN, 6, 3, 7)
    assert spec.objective == finetune_pb2.SWEEP_OBJECTIVE_TRAIN_LOSS
    assert request.webhook.url == "https://example.com/sweep" and request.idempotency_key
    dims = {d.name: d for d in spec.search_space}
    assert list(dims) == [
        "learning_rate",
        "lr_scheduler",
        "lora_target_modules",
        "warmup_ratio",
        "weight_decay",
        "lora_rank",
        "epochs",
        "max_steps",
        "lora_alpha",
    ]
    assert [v.float_value for v in dims["learning_rate"].choice.values] == [1e-4, 3e-4]
    assert [v.string_value for v in dims["lr_scheduler"].choice.values] == ["linear", "cosine"]
    modules = dims["lora_target_modules"].choice.values
    assert [list(v.string_list.values) for v in modules] == [["q_proj", "v_proj"], ["all-linear"]]
    warmup = dims["warmup_ratio"].float_range
    assert (warmup.min, warmup.max, warmup.log, warmup.grid_points) == (0.0, 0.1, False, 3)
    assert dims["weight_decay"].WhichOneof("space") == "float_range" and dims["weight_decay"].float_range.max == 0.1
    rank = dims["lora_rank"].int_range
    assert (rank.min, rank.max, rank.step) == (4, 16, 4)
    epochs = dims["epochs"].int_range
    assert (epochs.min, epochs.max, epochs.step) == (1, 3, 1)
    assert dims["max_steps"].WhichOneof("space") == "int_range" and dims["max_steps"].int_range.max == 40
    assert [v.WhichOneof("value") for v in dims["lora_alpha"].choice.values] == ["float_value", "float_value"]

    assert sweep.state == "running" and sweep.created is True
    assert sweep.spec.search_space["lora_rank"] == IntRange(4, 16, step=4)
    assert sweep.spec.search_space["lr_scheduler"] == ["linear", "cosine"]
    assert sweep.spec.method == "bayesian" and sweep.spec.objective == "train_loss"


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"learning_rat": [1e-4]}, "unknown hyperparameter 'learning_rat'"),
        ({"learning_rate": 1e-4}, "give a list of values"),
        ({"learning_rate": []}, "empty"),
        ({"learning_rate": (1e-4, 3e-4, 1e-3)}, "a tuple is a"),
        ({"lora_rank": FloatRange(1, 8)}, "use IntRange"),
        ({"lr_scheduler": IntRange(1, 2)}, "needs a numeric hyperparameter"),
        ({"epochs": ["three"]}, "hyperparameters.epochs: expected a number"),
        ({"epochs": range(5, 1)}, "empty or decreasing"),
        ({}, "non-empty"),
    ],
)
def test_sweep_search_space_mistakes_fail_locally(
    client: genloom.Client, service: StandInFineTuning, space: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        client.finetune.sweeps.create({"training_file": b"{}"}, search_space=space)
    assert service.requests == []


def test_search_ranges_check_themselves() -> None:
    with pytest.raises(ValueError, match="min"):
        FloatRange(1e-3, 1e-5)
    with pytest.raises(ValueError, match="log-scale"):
        FloatRange(0.0, 1.0, log=True)
    with pytest.raises(ValueError, match="step"):
        IntRange(1, 8, step=0)
    with pytest.raises(ValueError, match="log-scale"):
        IntRange(4, 64, step=4, log=True)


def test_sweep_get_list_cancel_and_wait(client: genloom.Client, service: StandInFineTuning) -> None:
    sweeps = [service.add_sweep() for _ in range(3)]
    got = client.finetune.sweeps.get(sweeps[0].id)
    assert [t.parameters for t in got.trials] == [
        {"learning_rate": 1e-4, "lora_target_modules": ["q_proj", "v_proj"]},
        {"learning_rate": 3e-4, "lora_target_modules": ["q_proj", "v_proj"]},
    ]
    assert got.best_trial is not None and got.best_trial.index == 1 and got.best_trial.objective_value == 1.2
    assert got.trials[0].hyperparameters.learning_rate == 1e-4 and got.trials[0].state == "succeeded"
    assert got.spec.search_space["learning_rate"] == FloatRange(1e-4, 3e-4, log=True)
    assert got.spec.base_job.training_file == "/artifacts/data/t.jsonl" and got.spec.base_job.send_path

    page = client.finetune.sweeps.list(limit=2)
    assert len(page.data) == 2 and [s.id for s in page] == [s.id for s in reversed(sweeps)]
    assert client.finetune.sweeps.cancel(sweeps[1].id).state == "cancelled"
    assert [s.id for s in client.finetune.sweeps.list(state="cancelled")] == [sweeps[1].id]

    final = finetune_pb2.Sweep()
    final.CopyFrom(sweeps[2])
    final.state = finetune_pb2.SWEEP_STATE_FAILED
    final.error.CopyFrom(finetune_pb2.JobError(code=finetune_pb2.JOB_ERROR_CODE_ALL_TRIALS_FAILED, message="all"))
    service.sweep_after_gets[sweeps[2].id] = (3, final)
    updates: list[str] = []
    done = client.finetune.sweeps.wait(sweeps[2].id, poll_interval=0.05, on_update=lambda s: updates.append(s.state))
    assert updates == ["running", "running", "failed"] and done.state == "failed"
    with pytest.raises(genloom.types.SweepFailed, match="all_trials_failed"):
        done.raise_for_status()
    # The spec of a finished job is a valid base for a sweep: its stored data goes back as a path.
    job = client.finetune.get(service.add_job(finetune_pb2.JOB_STATE_SUCCEEDED).id)
    client.finetune.sweeps.create(job.spec, search_space={"lora_rank": [8, 16]})
    assert service.requests[-1].spec.base_job.training_data.path == job.spec.training_file
    # ...unless it was uploaded inline: servers keep that private to its job, so the SDK says to send it again.
    uploaded = service.add_job(finetune_pb2.JOB_STATE_SUCCEEDED)
    uploaded.spec.training_data.path = f"upload:{uploaded.id}/training.jsonl"
    uploaded_spec = client.finetune.get(uploaded.id).spec
    sent = len(service.requests)
    with pytest.raises(ValueError, match="pass the data itself again"):
        client.finetune.sweeps.create(uploaded_spec, search_space={"lora_rank": [8, 16]})
    assert len(service.requests) == sent


# --- async ---------------------------------------------------------------------------------------------------------


async def test_async_twins(stand_in: tuple[ServerThread, StandInFineTuning], service: StandInFineTuning) -> None:
    ids = [service.add_job().id for _ in range(3)]
    async with genloom.AsyncClient(target=stand_in[0].target, timeout=10) as client:
        created = await client.finetune.create(
            [{"prompt": "a", "completion": "b"}], hyperparameters={"precision": "fp16"}
        )
        assert created.state == "validating" and created.hyperparameters.precision == "fp16"
        assert (await client.finetune.get(created.id)).id == created.id
        first = await client.finetune.list(limit=2)
        assert len(first.data) == 2 and first.has_next_page()
        assert [j.id async for j in client.finetune.list(limit=2)] == [created.id, *reversed(ids)]
        assert [len(p.data) async for p in first.iter_pages()] == [2, 2]
        cancelled = await client.finetune.cancel(created.id)
        assert cancelled.state == "cancelled"
        service.checkpoints[ids[0]] = [_checkpoint_pb(2)]
        assert [c.step for c in await client.finetune.checkpoints(ids[0])] == [2]
        with pytest.raises(genloom.NotFoundError):
            await client.finetune.get("ftjob-missing")

        service.events[ids[1]] = _succeeding_events(ids[1])
        service.watch_breaks = [WatchBreak(3, errors.Unavailable("restarting"))]
        async with client.finetune.watch(ids[1]) as stream:
            events = [event async for event in stream]
        assert [e.id for e in events] == [e.id for e in service.events[ids[1]]]
        assert stream.reconnects == 1 and stream.final is not None and stream.final.state == "succeeded"
        assert service.of_type("WatchJobRequest")[-1].after_event_id == events[2].id

        service.events[ids[2]] = _failing_events(ids[2])
        seen: list[JobEvent] = []
        failed = await client.finetune.wait(ids[2], on_event=seen.append)
        assert failed.state == "failed" and [e.type for e in seen][-1] == "state_change"

        sweep = await client.finetune.sweeps.create(
            FineTuneSpec(training_file=b"{}"), search_space={"learning_rate": FloatRange(1e-5, 1e-3, log=True)}
        )
        assert (await client.finetune.sweeps.get(sweep.id)).id == sweep.id
        assert [s.id async for s in client.finetune.sweeps.list()] == [sweep.id]
        assert (await client.finetune.sweeps.list()).data[0].id == sweep.id
        assert (await client.finetune.sweeps.cancel(sweep.id)).state == "cancelled"
        assert (await client.finetune.sweeps.wait(sweep.id, poll_interval=0.05)).state == "cancelled"


def test_sync_and_async_methods_take_the_same_arguments() -> None:
    pairs = [
        (FineTuning, AsyncFineTuning, ["create", "get", "list", "cancel", "checkpoints", "watch", "wait"]),
        (Sweeps, AsyncSweeps, ["create", "get", "list", "cancel", "wait"]),
    ]
    for sync_cls, async_cls, names in pairs:
        for name in names:
            sync = list(inspect.signature(getattr(sync_cls, name)).parameters.values())
            twin = list(inspect.signature(getattr(async_cls, name)).parameters.values())
            assert sync == twin, name
            assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in sync[2:]), f"{name}: options keyword-only"


def test_types_follow_the_proto() -> None:
    """The dataclass and the name tables are read from / checked against the proto, so they cannot drift."""
    assert [f.name for f in fields(Hyperparameters)] == [f.name for f in finetune_pb2.Hyperparameters.DESCRIPTOR.fields]
    literal_tables = [
        (ft_types.JobStateName, ft_types.JOB_STATES),
        (ft_types.FineTuneMethodName, ft_types.METHODS),
        (ft_types.DataFormatName, ft_types.DATA_FORMATS),
        (ft_types.JobEventLevelName, ft_types.EVENT_LEVELS),
        (ft_types.JobEventTypeName, ft_types.EVENT_TYPES),
        (ft_types.JobErrorCodeName, ft_types.ERROR_CODES),
        (ft_types.SweepMethodName, ft_types.SWEEP_METHODS),
        (ft_types.SweepObjectiveName, ft_types.SWEEP_OBJECTIVES),
        (ft_types.SweepStateName, ft_types.SWEEP_STATES),
    ]
    for literal, table in literal_tables:
        assert list(typing.get_args(literal)) == list(table)
    assert typing.get_args(ft_types.LrSchedulerName) == ("linear", "cosine")
    assert typing.get_args(ft_types.PrecisionName) == ("auto", "fp32", "bf16", "fp16")
    hp = Hyperparameters(lr_scheduler="cosine", precision="bf16", lora_target_modules=["q_proj"], seed=1)
    round_trip = Hyperparameters.from_pb(hp.to_pb())
    assert (round_trip.lr_scheduler, round_trip.precision, round_trip.lora_target_modules, round_trip.seed) == (
        "cosine",
        "bf16",
        ("q_proj",),
        1,
    )


# --- CLI -----------------------------------------------------------------------------------------------------------

runner = CliRunner()


def _invoke(target: str, *args: str) -> Any:
    return runner.invoke(app, ["--target", target, "finetune", *args], env={"GENLOOM_API_KEY": "", "COLUMNS": "200"})


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            ["create"],
            [
                "--method",
                "--model",
                "--validation",
                "--epochs",
                "--batch-size",
                "--learning-rate",
                "--lora-rank",
                "--suffix",
                "--format",
                "--task",
                "--label",
                "--hp",
                "--watch",
                "--server-path",
            ],
        ),
        (["watch"], ["--after", "--no-follow", "--json"]),
        (["list"], ["--state", "--model", "--limit", "--all"]),
        (["sweep", "create"], ["--space", "--search", "--max-trials", "--parallelism", "--objective", "--wait"]),
    ],
)
def test_cli_help(command: list[str], expected: list[str]) -> None:
    result = runner.invoke(app, ["finetune", *command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    for option in expected:
        assert option in result.output, option


def test_cli_create_sends_the_options(
    stand_in: tuple[ServerThread, StandInFineTuning], service: StandInFineTuning, tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "good", "label": "pos"}\n')
    valid = tmp_path / "valid.jsonl"
    valid.write_text('{"text": "bad", "label": "neg"}\n')
    result = _invoke(
        stand_in[0].target,
        "create",
        str(data),
        "--method",
        "lora",
        "--model",
        BASE,
        "--validation",
        str(valid),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--learning-rate",
        "3e-4",
        "--lora-rank",
        "16",
        "--suffix",
        "sentiment",
        "--task",
        "classify",
        "--label",
        "pos",
        "--label",
        "neg",
        "--hp",
        "lr_scheduler=cosine",
        "--hp",
        "lora_target_modules=q_proj, v_proj",
        "--hp",
        "gradient_checkpointing=true",
        "--hp",
        "epochs=5",  # the named option wins
        "--metadata",
        "owner=ada",
    )
    assert result.exit_code == 0, result.output
    request = service.requests[-1]
    spec = request.spec
    assert spec.training_data.jsonl == data.read_bytes() and spec.validation_data.jsonl == valid.read_bytes()
    assert spec.base_model == BASE and spec.suffix == "sentiment" and dict(spec.metadata) == {"owner": "ada"}
    assert spec.data_format == finetune_pb2.DATA_FORMAT_TASK_RECORDS and spec.task == tasks_pb2.TASK_TYPE_CLASSIFY
    assert [label.name for label in spec.task_options.labels] == ["pos", "neg"]
    hp = spec.hyperparameters
    assert (hp.epochs, hp.batch_size, hp.lora_rank) == (2, 4, 16) and hp.learning_rate == pytest.approx(3e-4)
    assert hp.lr_scheduler == finetune_pb2.LR_SCHEDULER_COSINE and hp.gradient_checkpointing
    assert list(hp.lora_target_modules) == ["q_proj", "v_proj"]
    job_id = next(iter(service.jobs))
    assert result.stdout == f"{job_id} validating\n"

    result = _invoke(stand_in[0].target, "create", "train.jsonl", "--server-path", "--json")
    assert result.exit_code == 0, result.output
    assert service.requests[-1].spec.training_data.path == "train.jsonl"
    assert json.loads(result.stdout)["state"] == "validating"


def test_cli_create_rejects_bad_options_before_calling(
    stand_in: tuple[ServerThread, StandInFineTuning], service: StandInFineTuning, tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    result = _invoke(stand_in[0].target, "create", str(data), "--hp", "learning_rat=1e-4")
    assert result.exit_code == 2 and "did you mean 'learning_rate'" in result.stderr
    result = _invoke(stand_in[0].target, "create", str(data), "--hp", "epochs")
    assert result.exit_code == 2 and "NAME=VALUE" in result.stderr
    result = _invoke(stand_in[0].target, "create", str(tmp_path / "missing.jsonl"))
    assert result.exit_code == 2 and "--server-path" in result.stderr
    result = _invoke(stand_in[0].target, "create", str(data), "--label", "pos")
    assert result.exit_code == 2 and "--task classify" in result.stderr
    assert service.requests == []


def test_cli_create_watch_exits_non_zero_when_the_job_fails(
    stand_in: tuple[ServerThread, StandInFineTuning], service: StandInFineTuning, tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a"}\n')
    service.events_for_new_jobs = _failing_events
    result = _invoke(stand_in[0].target, "create", str(data), "--watch")
    assert result.exit_code == EXIT_JOB_FAILED, result.output
    job_id = next(iter(service.jobs))
    assert result.stdout.splitlines()[0] == f"{job_id} validating"
    assert "warning: event 2" in result.stdout
    assert "failed: invalid_data: 2 invalid lines" in result.stderr
    assert "training line 3: missing key 'completion'" in result.stderr
    assert "training line 9: 1,532 tokens > max_seq_length 1,024" in result.stderr


def test_cli_watch_shows_progress_and_the_result(
    stand_in: tuple[ServerThread, StandInFineTuning], service: StandInFineTuning
) -> None:
    job = service.add_job()
    service.events[job.id] = _succeeding_events(job.id)
    service.watch_breaks = [WatchBreak(4, errors.Unavailable("restarting"))]
    result = _invoke(stand_in[0].target, "watch", job.id)
    assert result.exit_code == 0, result.output
    lines = [line.split("] ", 1)[1] for line in result.stdout.splitlines()]
    assert lines == [
        "validating",
        "queued",
        "running",
        "step 4/4: validation loss 1.2500",
        "saved checkpoint-4 (step 4, epoch 2.00, train loss 1.5000)",
        f"succeeded: ft:{BASE}:demo:{job.id}",
    ]
    assert "4/4" in result.stderr and "loss 1.0000" in result.stderr  # the progress bar

    result = _invoke(stand_in[0].target, "watch", job.id, "--json", "--no-follow")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["id"] for e in events] == [e.id for e in service.events[job.id]]
    assert events[3]["metrics"]["step"] == 2 and events[0]["created_at"].endswith("+00:00")

    cancelled = service.add_job()
    service.events[cancelled.id] = [_state(cancelled.id, 1, finetune_pb2.JOB_STATE_CANCELLED)]
    result = _invoke(stand_in[0].target, "watch", cancelled.id)
    assert result.exit_code == EXIT_JOB_CANCELLED and "cancelled" in result.stdout

    result = _invoke(stand_in[0].target, "watch", "ftjob-missing")
    assert result.exit_code == 1 and "NOT_FOUND" in result.stderr


def test_cli_list_get_cancel_and_checkpoints(
    stand_in: tuple[ServerThread, StandInFineTuning], service: StandInFineTuning
) -> None:
    jobs = [service.add_job(finetune_pb2.JOB_STATE_RUNNING) for _ in range(3)]
    jobs[0].latest_metrics.CopyFrom(finetune_pb2.JobMetrics(step=3, total_steps=12))
    result = _invoke(stand_in[0].target, "list", "--limit", "2")
    assert result.exit_code == 0, result.output
    table = result.stdout.splitlines()
    assert table[0].split() == ["ID", "STATE", "MODEL", "METHOD", "STEPS", "CREATED", "RESULT"]
    assert [row.split()[0] for row in table[1:]] == [jobs[2].id, jobs[1].id]
    result = _invoke(stand_in[0].target, "list", "--all", "--state", "running")
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [j.id for j in reversed(jobs)] and "3/12" in rows[-1]
    assert list(service.of_type("ListJobsRequest")[-1].states) == [finetune_pb2.JOB_STATE_RUNNING]

    result = _invoke(stand_in[0].target, "get", jobs[0].id)
    assert result.exit_code == 0, result.output
    assert f"id              {jobs[0].id}" in result.stdout and "step 3/12" in result.stdout
    assert "lr_scheduler=linear" in result.stdout and "learning_rate=0.0002" in result.stdout
    result = _invoke(stand_in[0].target, "get", jobs[0].id, "--json")
    assert json.loads(result.stdout)["spec"]["hyperparameters"]["epochs"] == 3

    result = _invoke(stand_in[0].target, "cancel", jobs[1].id)
    assert result.exit_code == 0 and "cancel requested" in result.stdout
    done = service.add_job(finetune_pb2.JOB_STATE_FAILED)
    result = _invoke(stand_in[0].target, "cancel", done.id)
    assert result.exit_code == 1 and "FAILED_PRECONDITION" in result.stderr

    service.checkpoints[jobs[0].id] = [_checkpoint_pb(2), _checkpoint_pb(4)]
    result = _invoke(stand_in[0].target, "checkpoints", jobs[0].id)
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()
    assert rows[0].split()[:3] == ["NAME", "STEP", "EPOCH"] and rows[2].split()[:5] == [
        "checkpoint-4",
        "4",
        "2.00",
        "1.5000",
        "-",
    ]


def test_cli_sweeps(
    stand_in: tuple[ServerThread, StandInFineTuning], service: StandInFineTuning, tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    result = _invoke(
        stand_in[0].target,
        "sweep",
        "create",
        str(data),
        "--space",
        "learning_rate=1e-5..1e-3:log",
        "--space",
        "lora_rank=4..16:step=4",
        "--space",
        "lr_scheduler=linear,cosine",
        "--space",
        "lora_target_modules=q_proj+v_proj,all-linear",
        "--space",
        "warmup_ratio=0..0.1:points=5",
        "--search",
        "bayesian",
        "--max-trials",
        "8",
        "--epochs",
        "1",
    )
    assert result.exit_code == 0, result.output
    spec = service.requests[-1].spec
    dims = {d.name: d for d in spec.search_space}
    lr = dims["learning_rate"].float_range
    assert (lr.min, lr.max, lr.log) == (1e-5, 1e-3, True)
    rank = dims["lora_rank"].int_range
    assert (rank.min, rank.max, rank.step) == (4, 16, 4)
    assert [v.string_value for v in dims["lr_scheduler"].choice.values] == ["linear", "cosine"]
    modules = [list(v.string_list.values) for v in dims["lora_target_modules"].choice.values]
    assert modules == [["q_proj", "v_proj"], ["all-linear"]]
    warmup = dims["warmup_ratio"].float_range
    assert (warmup.min, warmup.max, warmup.grid_points) == (0.0, 0.1, 5)
    assert spec.method == finetune_pb2.SWEEP_METHOD_BAYESIAN and spec.max_trials == 8
    assert spec.base_job.hyperparameters.epochs == 1 and spec.base_job.training_data.jsonl == data.read_bytes()
    sweep_id = next(iter(service.sweeps))
    assert result.stdout == f"{sweep_id} running\n"

    result = _invoke(stand_in[0].target, "sweep", "create", str(data), "--space", "lora_rank=4..x")
    assert result.exit_code == 2 and "expected a number" in result.stderr

    result = _invoke(stand_in[0].target, "sweep", "get", sweep_id)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    trial_rows = [line for line in lines if line.split() and line.split()[0] in ("0", "1", "*")]
    assert trial_rows[-1].startswith("*") and _job_id(101) in trial_rows[-1]  # the best trial is marked
    assert any(line.startswith("best") and _job_id(101) in line for line in lines)

    result = _invoke(stand_in[0].target, "sweep", "list")
    assert result.exit_code == 0 and sweep_id in result.stdout
    result = _invoke(stand_in[0].target, "sweep", "cancel", sweep_id)
    assert result.exit_code == 0 and f"{sweep_id} cancelled" in result.stdout

"""Fine-tuning results: job records, their events, metrics and checkpoints, and sweeps with their trials.

Built from the service's responses by the fine-tuning resource; `genloom.types.finetune` re-exports them. The
errors they raise (`raise_for_status()`) and the JobError they carry live in `genloom._exceptions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from genloom._exceptions import FineTuneJobFailed, JobError, SweepFailed
from genloom.types._finetune_enums import (
    EVENT_LEVELS,
    EVENT_TYPES,
    JOB_STATES,
    SWEEP_METHODS,
    SWEEP_OBJECTIVES,
    SWEEP_STATES,
    TERMINAL_JOB_STATES,
    TERMINAL_SWEEP_STATES,
    JobEventLevelName,
    JobEventTypeName,
    JobStateName,
    SweepMethodName,
    SweepObjectiveName,
    SweepStateName,
    _name,
    _optional,
    _optional_name,
    _time,
)
from genloom.types._finetune_spec import FineTuneSpec
from genloom.types._hyperparameters import Hyperparameters
from genloom.types._search_space import _search_dimension_from_pb, parameter_value_from_pb
from genloom.v1 import finetune_pb2


@dataclass(frozen=True)
class JobMetrics:
    """Training progress at one moment; metrics absent at that moment are None."""

    step: int
    """Optimizer steps completed."""
    total_steps: int
    """Optimizer steps the job will take in total (early stopping may end it sooner)."""
    epoch: float
    """Fractional epoch reached."""
    train_loss: float | None
    """Mean training loss since the previous metrics event."""
    validation_loss: float | None
    """Validation loss, on steps where it was evaluated."""
    learning_rate: float | None
    """Learning rate at this step."""
    tokens_per_second: float | None
    """Training throughput in non-padding tokens per second."""
    grad_norm: float | None
    """Global gradient L2 norm before clipping."""
    trained_tokens: int
    """Non-padding tokens trained on so far."""
    eta_seconds: float | None
    """Estimated seconds to the last step."""

    @property
    def progress(self) -> float:
        """Fraction of the steps done, 0 to 1 (0 while the total is unknown)."""
        return min(self.step / self.total_steps, 1.0) if self.total_steps else 0.0

    @classmethod
    def from_pb(cls, pb: finetune_pb2.JobMetrics) -> JobMetrics:
        return cls(
            step=pb.step,
            total_steps=pb.total_steps,
            epoch=pb.epoch,
            train_loss=_optional(pb, "train_loss"),
            validation_loss=_optional(pb, "validation_loss"),
            learning_rate=_optional(pb, "learning_rate"),
            tokens_per_second=_optional(pb, "tokens_per_second"),
            grad_norm=_optional(pb, "grad_norm"),
            trained_tokens=pb.trained_tokens,
            eta_seconds=_optional(pb, "eta_seconds"),
        )


@dataclass(frozen=True)
class Checkpoint:
    """A saved checkpoint."""

    name: str
    """"checkpoint-<step>"."""
    step: int
    """Optimizer step it was saved at."""
    epoch: float
    """Fractional epoch at that step."""
    train_loss: float | None
    """Training loss at that step."""
    validation_loss: float | None
    """Validation loss at that step, when evaluated there."""
    path: str
    """Its directory in the server's artifact store."""
    created_at: datetime | None
    """When it was saved."""
    size_bytes: int
    """Total size of its files."""

    @classmethod
    def from_pb(cls, pb: finetune_pb2.Checkpoint) -> Checkpoint:
        return cls(
            name=pb.name,
            step=pb.step,
            epoch=pb.epoch,
            train_loss=_optional(pb, "train_loss"),
            validation_loss=_optional(pb, "validation_loss"),
            path=pb.path,
            created_at=_time(pb, "created_at"),
            size_bytes=pb.size_bytes,
        )


@dataclass(frozen=True)
class WebhookInfo:
    """A job's or sweep's webhook (its secret is never returned)."""

    url: str
    """The URL called when it ends."""
    has_secret: bool
    """Whether calls are signed."""


@dataclass(frozen=True)
class FineTuneJob:
    """A fine-tuning job's record. Terminal states: "succeeded", "failed", "cancelled" (`is_terminal`); a failed
    job's `error` says why and `raise_for_status()` raises it as FineTuneJobFailed."""

    id: str
    """"ftjob-" followed by a ULID."""
    state: JobStateName | Literal["unspecified"]
    """"validating", "queued", "running", "succeeded", "failed" or "cancelled"."""
    spec: FineTuneSpec
    """What is trained, with defaults filled in (effective hyperparameters, resolved base model, stored data
    paths)."""
    created_at: datetime | None
    """When it was created (aware, UTC, like every timestamp here)."""
    queued_at: datetime | None
    """When it (last) entered the queue."""
    started_at: datetime | None
    """When a worker first started training it."""
    finished_at: datetime | None
    """When it reached a terminal state."""
    updated_at: datetime | None
    """When the record last changed."""
    error: JobError | None
    """Why it failed (state "failed" only)."""
    result_model: str
    """The servable model "ft:<base>:<suffix>:<job-id>" once succeeded: pass it as `model` to inference and
    task calls. "" before."""
    result_path: str
    """The result's directory in the artifact store, once succeeded."""
    trained_tokens: int
    """Non-padding tokens trained on (all epochs)."""
    latest_metrics: JobMetrics | None
    """The latest training progress; None before training started."""
    best_validation_loss: float | None
    """Lowest validation loss so far; None without validation."""
    cancel_requested: bool
    """cancel() was called and the running job has not stopped yet."""
    idempotency_key: str
    """The idempotency key it was created with."""
    webhook: WebhookInfo | None
    """The webhook called when it ends."""
    sweep_id: str
    """The sweep it is a trial of ("" otherwise)."""
    trial_index: int | None
    """Its trial index in that sweep."""
    attempts: int
    """Deliveries to a worker (above 1 after a worker died and it resumed)."""
    resumed_from_step: int
    """Step of the checkpoint the latest attempt resumed from (0: from scratch)."""
    worker: str
    """The worker running or last running it."""
    training_examples: int
    """Training examples after validation (and any hold-out)."""
    validation_examples: int
    """Validation examples."""
    last_event_id: str
    """Id of its newest event: `watch(job.id, after_event_id=job.last_event_id)` follows from here."""
    created: bool | None = None
    """From create(): False when an earlier call with the same idempotency key created it. None elsewhere."""

    @property
    def is_terminal(self) -> bool:
        """Whether it succeeded, failed or was cancelled."""
        return self.state in TERMINAL_JOB_STATES

    @property
    def base_model(self) -> str:
        """The base model (resolved by the server)."""
        return self.spec.model

    @property
    def method(self) -> str:
        """The training method: "lora" or "full"."""
        return self.spec.method

    @property
    def hyperparameters(self) -> Hyperparameters:
        """The effective hyperparameters."""
        hp = self.spec.hyperparameters
        return hp if isinstance(hp, Hyperparameters) else Hyperparameters()

    def raise_for_status(self) -> FineTuneJob:
        """Raise FineTuneJobFailed (with the error's code, message and line errors) if the job failed; else
        return the job, so `client.finetune.wait(id).raise_for_status().result_model` reads naturally."""
        if self.state == "failed":
            raise FineTuneJobFailed(self)
        return self

    @classmethod
    def from_pb(cls, pb: finetune_pb2.Job, created: bool | None = None) -> FineTuneJob:
        return cls(
            id=pb.id,
            state=_name(JOB_STATES, pb.state),
            spec=FineTuneSpec.from_pb(pb.spec),
            created_at=_time(pb, "created_at"),
            queued_at=_time(pb, "queued_at"),
            started_at=_time(pb, "started_at"),
            finished_at=_time(pb, "finished_at"),
            updated_at=_time(pb, "updated_at"),
            error=JobError.from_pb(pb.error) if pb.HasField("error") else None,
            result_model=pb.result_model,
            result_path=pb.result_path,
            trained_tokens=pb.trained_tokens,
            latest_metrics=JobMetrics.from_pb(pb.latest_metrics) if pb.HasField("latest_metrics") else None,
            best_validation_loss=_optional(pb, "best_validation_loss"),
            cancel_requested=pb.cancel_requested,
            idempotency_key=pb.idempotency_key,
            webhook=WebhookInfo(pb.webhook.url, pb.webhook.has_secret) if pb.HasField("webhook") else None,
            sweep_id=pb.sweep_id,
            trial_index=_optional(pb, "trial_index"),
            attempts=pb.attempts,
            resumed_from_step=pb.resumed_from_step,
            worker=pb.worker,
            training_examples=pb.training_examples,
            validation_examples=pb.validation_examples,
            last_event_id=pb.last_event_id,
            created=created,
        )


@dataclass(frozen=True)
class JobEvent:
    """Something that happened to a job. `type` says which of the optional fields are set: "metrics" ->
    `metrics`; "state_change" -> `state` (with `result_model` on success, `error` on failure); "checkpoint" ->
    `checkpoint`; "message" -> only `message`."""

    id: str
    """Unique within the job and increasing; pass the last one received as `after_event_id` to resume."""
    job_id: str
    """The job it belongs to."""
    created_at: datetime | None
    """When it happened."""
    level: JobEventLevelName | Literal["unspecified"]
    """"info", "warning" (e.g. examples truncated, resumed after a worker died) or "error" (the job failed)."""
    type: JobEventTypeName | Literal["unspecified"]
    """"message", "metrics", "state_change" or "checkpoint"."""
    message: str
    """Human-readable description, e.g. "step 40/120 loss 1.234"."""
    state: JobStateName | None
    """state_change: the new state."""
    metrics: JobMetrics | None
    """metrics: the metrics."""
    checkpoint: Checkpoint | None
    """checkpoint: the checkpoint saved."""
    result_model: str
    """The change to "succeeded": the registered model name."""
    error: JobError | None
    """The change to "failed": why."""

    @property
    def is_terminal(self) -> bool:
        """Whether this is the job's last event: its change to a terminal state."""
        return self.type == "state_change" and self.state in TERMINAL_JOB_STATES

    @classmethod
    def from_pb(cls, pb: finetune_pb2.JobEvent) -> JobEvent:
        return cls(
            id=pb.id,
            job_id=pb.job_id,
            created_at=_time(pb, "created_at"),
            level=_name(EVENT_LEVELS, pb.level),
            type=_name(EVENT_TYPES, pb.type),
            message=pb.message,
            state=_optional_name(JOB_STATES, pb.state),
            metrics=JobMetrics.from_pb(pb.metrics) if pb.HasField("metrics") else None,
            checkpoint=Checkpoint.from_pb(pb.checkpoint) if pb.HasField("checkpoint") else None,
            result_model=pb.result_model,
            error=JobError.from_pb(pb.error) if pb.HasField("error") else None,
        )


@dataclass(frozen=True)
class Trial:
    """One trial of a sweep (a job; follow it with `finetune.watch(trial.job_id)`)."""

    index: int
    """0-based trial number, in creation order."""
    job_id: str
    """The trial's job."""
    state: JobStateName | Literal["unspecified"]
    """The job's state."""
    parameters: dict[str, Any]
    """The searched hyperparameters' values for this trial, in search-space order."""
    hyperparameters: Hyperparameters
    """The trial job's full effective hyperparameters."""
    objective_value: float | None
    """The objective (lower is better); None until known."""
    validation_loss: float | None
    """The lowest validation loss."""
    train_loss: float | None
    """The latest training loss."""
    result_model: str
    """The registered model, once succeeded."""
    started_at: datetime | None
    """When its job started running."""
    finished_at: datetime | None
    """When its job ended."""

    @classmethod
    def from_pb(cls, pb: finetune_pb2.Trial) -> Trial:
        return cls(
            index=pb.index,
            job_id=pb.job_id,
            state=_name(JOB_STATES, pb.state),
            parameters={p.name: parameter_value_from_pb(p.value) for p in pb.parameters},
            hyperparameters=Hyperparameters.from_pb(pb.hyperparameters),
            objective_value=_optional(pb, "objective_value"),
            validation_loss=_optional(pb, "validation_loss"),
            train_loss=_optional(pb, "train_loss"),
            result_model=pb.result_model,
            started_at=_time(pb, "started_at"),
            finished_at=_time(pb, "finished_at"),
        )


@dataclass(frozen=True)
class SweepSpec:
    """A sweep's search, with defaults filled in."""

    base_job: FineTuneSpec
    """The job every trial runs before the searched hyperparameters are applied."""
    search_space: dict[str, Any]
    """Each searched hyperparameter's values: a list (choice), FloatRange or IntRange."""
    method: SweepMethodName | Literal["unspecified"]
    """"grid" or "bayesian"."""
    max_trials: int
    """Number of trials."""
    parallelism: int
    """Trials queued or running at once."""
    objective: SweepObjectiveName | Literal["unspecified"]
    """"validation_loss" or "train_loss" (minimized)."""
    seed: int
    """Seed of the Bayesian sampler."""

    @classmethod
    def from_pb(cls, pb: finetune_pb2.SweepSpec) -> SweepSpec:
        return cls(
            base_job=FineTuneSpec.from_pb(pb.base_job),
            search_space={d.name: _search_dimension_from_pb(d) for d in pb.search_space},
            method=_name(SWEEP_METHODS, pb.method),
            max_trials=pb.max_trials,
            parallelism=pb.parallelism,
            objective=_name(SWEEP_OBJECTIVES, pb.objective),
            seed=pb.seed,
        )


@dataclass(frozen=True)
class Sweep:
    """A hyperparameter sweep's record: its trials and the best one so far."""

    id: str
    """"ftsweep-" followed by a ULID."""
    state: SweepStateName | Literal["unspecified"]
    """"running", "succeeded", "failed" or "cancelled"."""
    spec: SweepSpec
    """The search, with defaults filled in."""
    trials: list[Trial]
    """Trials created so far, by index."""
    best_trial: Trial | None
    """The succeeded trial with the lowest objective so far; None before one succeeded."""
    created_at: datetime | None
    """When it was created."""
    finished_at: datetime | None
    """When it reached a terminal state."""
    updated_at: datetime | None
    """When the record last changed."""
    error: JobError | None
    """Why it failed (state "failed" only)."""
    cancel_requested: bool
    """cancel() was called and trials are still stopping."""
    idempotency_key: str
    """The idempotency key it was created with."""
    webhook: WebhookInfo | None
    """The webhook called when it ends."""
    created: bool | None = None
    """From create(): False when an earlier call with the same idempotency key created it. None elsewhere."""

    @property
    def is_terminal(self) -> bool:
        """Whether it succeeded, failed or was cancelled."""
        return self.state in TERMINAL_SWEEP_STATES

    def raise_for_status(self) -> Sweep:
        """Raise SweepFailed if the sweep failed; else return it."""
        if self.state == "failed":
            raise SweepFailed(self)
        return self

    @classmethod
    def from_pb(cls, pb: finetune_pb2.Sweep, created: bool | None = None) -> Sweep:
        return cls(
            id=pb.id,
            state=_name(SWEEP_STATES, pb.state),
            spec=SweepSpec.from_pb(pb.spec),
            trials=[Trial.from_pb(t) for t in pb.trials],
            best_trial=Trial.from_pb(pb.best_trial) if pb.HasField("best_trial") else None,
            created_at=_time(pb, "created_at"),
            finished_at=_time(pb, "finished_at"),
            updated_at=_time(pb, "updated_at"),
            error=JobError.from_pb(pb.error) if pb.HasField("error") else None,
            cancel_requested=pb.cancel_requested,
            idempotency_key=pb.idempotency_key,
            webhook=WebhookInfo(pb.webhook.url, pb.webhook.has_secret) if pb.HasField("webhook") else None,
            created=created,
        )

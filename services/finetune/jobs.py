"""The job lifecycle shared by the gRPC service and the workers: create, validate, cancel, finish, reap.

Both sides hold a `JobManager`: the service creates jobs and validates their data (in a thread, so RPCs stay
responsive), a worker creates sweep trials and reports finished jobs, and whichever process notices a dead worker
or validator re-queues its job. Every state change goes through Store.transition, which refuses moves from states
the caller did not expect, so two processes racing on one job cannot both win.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format

from genloom.services.finetune import data as data_mod
from genloom.services.finetune import spec as spec_mod
from genloom.services.finetune.ids import new_job_id
from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.finetune.store import EVENT_NAMES, TERMINAL, Store, message_event, state_event
from genloom.services.finetune.webhooks import deliver
from genloom.services.models.registry import ModelRegistry, ModelSpec
from genloom.services.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from genloom.services.server.settings import ModelSettings
from genloom.services.tokenizer.store import LoadedTokenizer, load_tokenizer
from genloom.v1 import finetune_pb2

logger = logging.getLogger(__name__)

S = finetune_pb2
WARNING = S.JOB_EVENT_LEVEL_WARNING
ERROR = S.JOB_EVENT_LEVEL_ERROR
DEFAULT_VALIDATION_SPLIT = 0.1


class Heartbeat:
    """Keeps a lease alive from a thread; `lost` turns true if the lease was taken from us (it lapsed)."""

    def __init__(self, store: Store, kind: str, job_id: str, token: str, seconds: float) -> None:
        self.store, self.kind, self.job_id, self.token, self.seconds = store, kind, job_id, token, seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"genloom-{kind}-{job_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self.store.renew_lease(self.kind, self.job_id, self.token, self.seconds):
                    self.lost = True
                    logger.error("lost the %s on job %s (it lapsed); stopping", self.kind, self.job_id)
                    return
            except Exception:  # Redis briefly unreachable: keep trying until the lease would lapse anyway
                logger.warning("could not renew the %s on job %s", self.kind, self.job_id, exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if not self.lost:
            self.store.release_lease(self.kind, self.job_id, self.token)


@dataclass
class JobData:
    train: list[data_mod.TrainingExample]
    validation: list[data_mod.TrainingExample]
    warnings: list[str]
    problems: list[data_mod.LineProblem]
    error_count: int
    # For task records: the prompt options the examples were rendered with (labels taken from the data when the
    # job gave none); serving must use the same to get the same prompt.
    task_options: object = None
    data_format: int = 0


class JobManager:
    def __init__(
        self,
        store: Store,
        models: ModelSettings,
        settings: FinetuneSettings,
        send: Callable[[str], None],
    ) -> None:
        """`send(job_id)` puts a job's training task on the queue."""
        self.store = store
        self.models = models
        self.settings = settings
        self.send = send
        self.registry = ModelRegistry(models)
        self._tokenizers: dict[str, LoadedTokenizer] = {}
        self._lock = threading.Lock()
        # Called with a job that just ended (set by whoever advances sweeps).
        self.on_finished: Callable[[finetune_pb2.Job], None] | None = None

    # -- models -------------------------------------------------------------------------------------------------

    def base_model(self, name: str, field: str = "spec.base_model") -> ModelSpec:
        if ":" in name:
            raise InvalidArgument.field(field, "a base model name has no ':' (fine-tuned models cannot be bases)")
        try:
            return self.registry.resolve(name)
        except NotFound as err:
            raise NotFound(f"{field}: {err}") from None

    def tokenizer(self, spec: ModelSpec) -> LoadedTokenizer:
        key = str(spec.path)
        with self._lock:
            tok = self._tokenizers.get(key)
        if tok is None:
            tok = load_tokenizer(spec, self.models.max_model_len)
            with self._lock:
                self._tokenizers[key] = tok
        return tok

    # -- create -------------------------------------------------------------------------------------------------

    def create(
        self,
        request: finetune_pb2.CreateJobRequest,
        *,
        sweep_id: str = "",
        trial_index: int | None = None,
    ) -> tuple[finetune_pb2.Job, bool]:
        """Check the request, store its data and record the job in JOB_STATE_VALIDATING (its data is validated
        by validate()). Raises InvalidArgument / NotFound / PermissionDenied / AlreadyExists."""
        violations = spec_mod.check_job_spec(request.spec, self.settings, field="spec")
        if request.HasField("webhook"):
            violations += spec_mod.check_webhook(request.webhook, field="webhook")
        violations += spec_mod.check_idempotency_key(request.idempotency_key)
        spec_mod.raise_if(violations)
        digest = spec_mod.request_digest(request)
        if request.idempotency_key:
            existing = self._idempotent(request.idempotency_key, digest)
            if existing is not None:
                return existing, False
        base = self.base_model(request.spec.base_model)
        tok = self.tokenizer(base)
        job_id = new_job_id()
        spec = finetune_pb2.JobSpec()
        spec.CopyFrom(request.spec)
        spec.base_model = base.name
        spec.hyperparameters.CopyFrom(
            spec_mod.effective_hyperparameters(
                request.spec.hyperparameters,
                method=request.spec.method,
                context_window=tok.context_window,
                settings=self.settings,
            )
        )
        if spec.method == S.FINE_TUNE_METHOD_UNSPECIFIED:
            spec.method = S.FINE_TUNE_METHOD_LORA
        if not spec.HasField("validation_data") and not spec.HasField("validation_split"):
            spec.validation_split = DEFAULT_VALIDATION_SPLIT
        spec.training_data.CopyFrom(self.store_data(spec.training_data, job_id, "training"))
        if spec.HasField("validation_data"):
            spec.validation_data.CopyFrom(self.store_data(spec.validation_data, job_id, "validation"))
        job = finetune_pb2.Job(
            id=job_id,
            state=S.JOB_STATE_VALIDATING,
            spec=spec,
            idempotency_key=request.idempotency_key,
            sweep_id=sweep_id,
        )
        if trial_index is not None:
            job.trial_index = trial_index
        if request.HasField("webhook") and request.webhook.url:
            job.webhook.url = request.webhook.url
            job.webhook.has_secret = bool(request.webhook.secret)
        job.created_at.GetCurrentTime()
        job.updated_at.CopyFrom(job.created_at)
        event = state_event(S.JOB_STATE_VALIDATING, "job created; validating its data")
        try:
            stored, created = self.store.create_job(
                job, event, digest=digest, webhook_secret=request.webhook.secret if request.HasField("webhook") else ""
            )
        except KeyError as err:
            raise AlreadyExists(
                f"idempotency_key {request.idempotency_key!r} was used for a different request (job {err.args[0]})"
            ) from None
        return self.store.with_last_event(stored), created

    def _idempotent(self, key: str, digest: str) -> finetune_pb2.Job | None:
        """The job an identical earlier request made (so its data is not stored twice), if any."""
        try:
            job_id = self.store.claimed("job", key, digest)
        except KeyError as err:
            raise AlreadyExists(
                f"idempotency_key {key!r} was used for a different request (job {err.args[0]})"
            ) from None
        job = self.store.get_job(job_id) if job_id else None
        return self.store.with_last_event(job) if job else None

    def store_data(
        self, source: finetune_pb2.TrainingDataSource, job_id: str, name: str
    ) -> finetune_pb2.TrainingDataSource:
        field = f"spec.{name}_data"
        if source.WhichOneof("source") == "jsonl":
            target = self.job_dir(job_id) / "data" / f"{name}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.jsonl)
            return finetune_pb2.TrainingDataSource(path=str(target))
        path = Path(source.path).expanduser()
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise InvalidArgument(
                f"{field}.path: {source.path!r} does not exist on the server",
                [FieldViolation(f"{field}.path", "no such file")],
            ) from None
        roots = [self.settings.artifact_root] + (
            [self.settings.training_data_root] if self.settings.training_data_root else []
        )
        if not any(resolved.is_relative_to(Path(root).expanduser().resolve()) for root in roots):
            raise PermissionDenied(
                f"{field}.path: {source.path!r} is outside GENLOOM_FINETUNE_DATA_ROOT and the artifact store"
            )
        if not resolved.is_file():
            raise InvalidArgument.field(f"{field}.path", f"{source.path!r} is not a file")
        return finetune_pb2.TrainingDataSource(path=str(resolved))

    def job_dir(self, job_id: str) -> Path:
        return Path(self.settings.artifact_root).expanduser() / "jobs" / job_id

    # -- validate -----------------------------------------------------------------------------------------------

    def read_data(self, job: finetune_pb2.Job, tok: LoadedTokenizer | None = None) -> JobData:
        """Tokenize the job's files and split off validation: the same result on every call (the worker calls
        it again to train on exactly what was validated)."""
        spec = job.spec
        hp = spec.hyperparameters
        tok = tok or self.tokenizer(self.base_model(spec.base_model))
        common = dict(
            tokenizer=tok,
            data_format=spec.data_format,
            task=spec.task,
            task_options=spec.task_options,
            max_seq_length=hp.max_seq_length,
            truncate=spec.truncate_long_examples,
            max_lines=self.settings.max_data_lines,
        )
        train = data_mod.read_examples(spec.training_data.path, file="training", **common)  # type: ignore[arg-type]
        problems = list(train.errors)
        count = train.error_count
        warnings = []
        truncated = train.truncated
        validation: list[data_mod.TrainingExample] = []
        if spec.HasField("validation_data"):
            common["data_format"] = train.data_format
            common["task_options"] = train.task_options  # labels found in the training data, in its order
            val = data_mod.read_examples(spec.validation_data.path, file="validation", **common)  # type: ignore[arg-type]
            problems += val.errors
            count += val.error_count
            truncated += val.truncated
            validation = val.examples
            examples = train.examples
        else:
            examples, validation = data_mod.split_validation(train.examples, spec.validation_split, hp.seed)
        if truncated:
            warnings.append(f"{truncated} examples were cut to max_seq_length {hp.max_seq_length:,} tokens")
        return JobData(examples, validation, warnings, problems[:50], count, train.task_options, train.data_format)

    def validate(self, job_id: str) -> None:
        """Validate a VALIDATING job's data, then queue it or fail it with the offending lines. Safe to call
        from several processes: one holds the validation lease, the others return."""
        job = self.store.get_job(job_id)
        if job is None or job.state != S.JOB_STATE_VALIDATING:
            return
        token = uuid.uuid4().hex
        if not self.store.acquire_lease("vlease", job_id, token, self.settings.lease_seconds):
            return
        beat = Heartbeat(self.store, "vlease", job_id, token, self.settings.lease_seconds).start()
        try:
            outcome = self._validate(job)
        finally:
            beat.stop()
        if outcome is not None and outcome.state in TERMINAL:
            self.finished(outcome)

    def _validate(self, job: finetune_pb2.Job) -> finetune_pb2.Job | None:
        try:
            found = self.read_data(job)
        except (NotFound, InvalidArgument) as err:
            return self.fail(job.id, S.JOB_ERROR_CODE_MODEL_UNAVAILABLE, str(err), allowed=[S.JOB_STATE_VALIDATING])
        except (ValueError, OSError) as err:
            return self.fail(job.id, S.JOB_ERROR_CODE_INVALID_DATA, str(err), allowed=[S.JOB_STATE_VALIDATING])
        except Exception as err:
            logger.exception("validating job %s failed", job.id)
            return self.fail(
                job.id, S.JOB_ERROR_CODE_INTERNAL, f"validation failed: {type(err).__name__}", [S.JOB_STATE_VALIDATING]
            )
        minimum = self.settings.min_examples
        if found.error_count:
            more = found.error_count - len(found.problems)
            detail = f" (showing the first {len(found.problems)})" if more > 0 else ""
            return self.fail(
                job.id,
                S.JOB_ERROR_CODE_INVALID_DATA,
                f"the data has {found.error_count} invalid lines{detail}; first: "
                f"{found.problems[0].file} line {found.problems[0].line}: {found.problems[0].message}",
                [S.JOB_STATE_VALIDATING],
                line_errors=[p.to_pb() for p in found.problems],
            )
        if len(found.train) < minimum:
            return self.fail(
                job.id,
                S.JOB_ERROR_CODE_INVALID_DATA,
                f"{len(found.train)} training examples after validation; at least {minimum} are needed "
                "(GENLOOM_FINETUNE_MIN_EXAMPLES)",
                [S.JOB_STATE_VALIDATING],
            )
        if job.spec.hyperparameters.early_stopping_patience and not found.validation:
            return self.fail(
                job.id,
                S.JOB_ERROR_CODE_INVALID_DATA,
                "early stopping needs validation examples, and there are none",
                [S.JOB_STATE_VALIDATING],
            )

        def counts(j: finetune_pb2.Job) -> None:
            j.training_examples = len(found.train)
            j.validation_examples = len(found.validation)
            if not j.spec.data_format:
                j.spec.data_format = found.data_format  # type: ignore[assignment]
            if found.task_options is not None and j.spec.data_format == S.DATA_FORMAT_TASK_RECORDS:
                j.spec.task_options.CopyFrom(found.task_options)

        warnings = [message_event(w, WARNING) for w in found.warnings]
        queued, moved = self.store.transition(
            job.id,
            S.JOB_STATE_QUEUED,
            allowed_from=[S.JOB_STATE_VALIDATING],
            message=f"data valid: {len(found.train)} training and {len(found.validation)} validation examples; queued",
            mutate=counts,
            extra_events=warnings,
        )
        if moved:
            self.send(job.id)
            return queued
        return None  # cancelled meanwhile: whoever cancelled it reports the end

    def fail(
        self,
        job_id: str,
        code: int,
        message: str,
        allowed: list[int] | None = None,
        line_errors: list[finetune_pb2.LineError] | None = None,
        guard: Callable[[finetune_pb2.Job], bool] | None = None,
    ) -> finetune_pb2.Job | None:
        def set_error(j: finetune_pb2.Job) -> None:
            j.error.CopyFrom(finetune_pb2.JobError(code=code, message=message, line_errors=line_errors or []))

        job, moved = self.store.transition(
            job_id,
            S.JOB_STATE_FAILED,
            allowed_from=allowed or [S.JOB_STATE_VALIDATING, S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING],
            message=f"failed: {message}",
            level=ERROR,
            mutate=set_error,
            guard=guard,
        )
        return job if moved else None

    # -- cancel -------------------------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> finetune_pb2.Job:
        for _ in range(10):  # the job may move between reading and writing; retry on the new state
            job = self.store.get_job(job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            if job.state in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED):
                raise FailedPrecondition(
                    f"job {job_id} already {S.JobState.Name(job.state)[10:].lower()}; only unfinished jobs can be "
                    "cancelled"
                )
            if job.state == S.JOB_STATE_CANCELLED:
                return self.store.with_last_event(job)
            if job.state in (S.JOB_STATE_VALIDATING, S.JOB_STATE_QUEUED):
                done, moved = self.store.transition(
                    job_id,
                    S.JOB_STATE_CANCELLED,
                    allowed_from=[S.JOB_STATE_VALIDATING, S.JOB_STATE_QUEUED],
                    message="cancelled before training started",
                )
                if moved and done is not None:
                    self.finished(done)
                    return self.store.with_last_event(done)
                continue
            # Running: the training loop sees the flag after its current step.
            self.store.set_cancel_flag(job_id)

            def request(j: finetune_pb2.Job) -> list[finetune_pb2.JobEvent] | bool:
                if j.state != S.JOB_STATE_RUNNING:
                    return False
                already = j.cancel_requested
                j.cancel_requested = True
                return [] if already else [message_event("cancel requested; stopping after the current step")]

            updated = self.store.update_job(job_id, request)
            if updated is not None and updated.state == S.JOB_STATE_RUNNING:
                return self.store.with_last_event(updated)
        raise NotFound(f"job {job_id!r} kept changing state; retry")  # pragma: no cover - pathological

    # -- finish ---------------------------------------------------------------------------------------------------

    def finished(self, job: finetune_pb2.Job) -> None:
        """After a job reached a terminal state: call its webhook (in the background) and tell its sweep."""
        hook = self.store.webhook("job", job.id) if job.webhook.url else None
        if hook is not None:
            threading.Thread(target=self._call_webhook, args=(job, *hook), name=f"webhook-{job.id}").start()
        if self.on_finished is not None:
            try:
                self.on_finished(job)
            except Exception:
                logger.exception("after job %s ended", job.id)

    def _call_webhook(self, job: finetune_pb2.Job, url: str, secret: str) -> None:
        body = json_format.MessageToJson(self.store.with_last_event(job), indent=None).encode()
        event = f"job.{EVENT_NAMES.get(job.state, 'ended')}"
        s = self.settings
        problem = deliver(
            url, secret, event, body, attempts=s.webhook_attempts, backoff=s.webhook_backoff, timeout=s.webhook_timeout
        )
        if problem:
            self.store.add_event(job.id, message_event(f"webhook {url} failed: {problem}", WARNING))

    # -- reap -----------------------------------------------------------------------------------------------------

    def reap(self) -> list[str]:
        """Find jobs whose worker or validator died. A running job without a live lease is re-queued (resuming
        from its last checkpoint) or, after GENLOOM_FINETUNE_MAX_ATTEMPTS deliveries, failed. Returns the ids of
        validating jobs nobody is validating (the caller validates them again)."""
        orphans = []
        for job in self.store.jobs_in_states([S.JOB_STATE_RUNNING, S.JOB_STATE_VALIDATING]):
            if job.state == S.JOB_STATE_VALIDATING:
                if self.store.lease_holder("vlease", job.id) is None:
                    orphans.append(job.id)
                continue
            if self.store.lease_holder("lease", job.id) is not None:
                continue
            self._requeue_lost(job)
        return orphans

    def _requeue_lost(self, job: finetune_pb2.Job) -> None:
        worker = job.worker or "its worker"

        def still_lost(j: finetune_pb2.Job) -> bool:
            # Nobody took the job over since we looked (a new owner takes the lease, then bumps attempts).
            return (
                j.attempts == job.attempts
                and j.worker == job.worker
                and self.store.lease_holder("lease", job.id) is None
            )

        if self.store.cancel_flag(job.id):
            done, moved = self.store.transition(
                job.id,
                S.JOB_STATE_CANCELLED,
                allowed_from=[S.JOB_STATE_RUNNING],
                message="cancelled",
                guard=still_lost,
            )
            if moved and done is not None:
                self.finished(done)
            return
        if job.attempts >= self.settings.max_attempts:
            failed = self.fail(
                job.id,
                S.JOB_ERROR_CODE_WORKER_LOST,
                f"{worker} stopped reporting during attempt {job.attempts} of {self.settings.max_attempts} "
                "(GENLOOM_FINETUNE_MAX_ATTEMPTS)",
                [S.JOB_STATE_RUNNING],
                guard=still_lost,
            )
            if failed is not None:
                self.finished(failed)
            return
        _, moved = self.store.transition(
            job.id,
            S.JOB_STATE_QUEUED,
            allowed_from=[S.JOB_STATE_RUNNING],
            level=WARNING,
            message=f"{worker} stopped reporting; re-queued to resume from its last checkpoint "
            f"(attempt {job.attempts + 1} of {self.settings.max_attempts})",
            guard=still_lost,
        )
        if moved:
            logger.warning("job %s lost %s; re-queued", job.id, worker)
            self.send(job.id)

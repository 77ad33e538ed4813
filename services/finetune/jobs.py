"""The job lifecycle shared by the gRPC service and the workers: create, validate, cancel, finish, reap.

Both sides hold a `JobManager`: the service creates jobs and validates their data (in a thread, so RPCs stay
responsive), a worker creates sweep trials and reports finished jobs, and whichever process notices a dead worker
or validator re-queues its job. Every state change goes through Store.transition, which refuses moves from states
the caller did not expect, so two processes racing on one job cannot both win.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import redis
from google.protobuf import json_format

from genloom.services.finetune import data as data_mod
from genloom.services.finetune import spec as spec_mod
from genloom.services.finetune.ids import new_job_id
from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.finetune.store import EVENT_NAMES, TERMINAL, Store, lease_key, message_event, state_event
from genloom.services.finetune.webhooks import deliver
from genloom.services.models.registry import ModelRegistry, ModelSpec
from genloom.services.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    quote,
)
from genloom.services.server.lru import LRUCache
from genloom.services.server.paths import canonical, resolve_within
from genloom.services.server.settings import ModelSettings
from genloom.services.tokenizer.store import LoadedTokenizer, load_tokenizer
from genloom.v1 import finetune_pb2, tasks_pb2

if TYPE_CHECKING:
    from genloom.services.finetune.taskqueue import Sender

logger = logging.getLogger(__name__)

S = finetune_pb2
WARNING = S.JOB_EVENT_LEVEL_WARNING
ERROR = S.JOB_EVENT_LEVEL_ERROR
DEFAULT_VALIDATION_SPLIT = 0.1
# How records name data uploaded inline: "upload:<job-or-sweep-id>/<training|validation>.jsonl". It says whose
# data it is without showing where the artifact store is, and only that job (or that sweep's trials) may read it.
UPLOAD_PREFIX = "upload:"
_UPLOAD = re.compile(r"upload:(?P<owner>ft(?:job|sweep)-[0-9a-z]{26})/(?P<file>(?:training|validation)\.jsonl)")


class Heartbeat:
    """Keeps a lease alive from a thread; `lost` turns true if the lease was taken from us (it lapsed).

    A lease also lapses when Redis was unreachable for longer than the lease while its holder kept working. With
    `reclaim` set, a lapsed lease is taken back if `reclaim()` says the work is still ours (it checks the record
    in the same transaction), so a Redis outage does not cost the job its worker.
    """

    def __init__(
        self,
        store: Store,
        kind: str,
        job_id: str,
        token: str,
        seconds: float,
        reclaim: Callable[[], bool] | None = None,
    ) -> None:
        self.store, self.kind, self.job_id, self.token, self.seconds = store, kind, job_id, token, seconds
        self.reclaim = reclaim
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"genloom-{kind}-{job_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                renewed = self.store.renew_lease(self.kind, self.job_id, self.token, self.seconds)
                if not renewed and self.reclaim is not None and self.reclaim():
                    logger.warning(
                        "the %s on job %s had lapsed (Redis unreachable?); took it back", self.kind, self.job_id
                    )
                    renewed = True
                if not renewed:
                    self.lost = True
                    logger.error("lost the %s on job %s (it lapsed); stopping", self.kind, self.job_id)
                    return
            except Exception:  # Redis briefly unreachable: keep trying until the lease would lapse anyway
                logger.warning("could not renew the %s on job %s", self.kind, self.job_id, exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if not self.lost:
            try:
                self.store.release_lease(self.kind, self.job_id, self.token)
            except (redis.ConnectionError, redis.TimeoutError):
                logger.warning("could not release the %s on job %s; it lapses by itself", self.kind, self.job_id)


def describe_error(err: BaseException) -> str:
    """An error as a client may read it: a service error's message; for an OSError its strerror only (its str()
    repeats the absolute path, i.e. the server's layout); else the message of a ValueError or the type's name."""
    if isinstance(err, ServiceError):
        return err.message
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    if isinstance(err, ValueError):
        return str(err)
    return type(err).__name__


@dataclass
class JobData:
    train: list[data_mod.TrainingExample]
    validation: list[data_mod.TrainingExample]
    warnings: list[str]
    problems: list[data_mod.LineProblem]
    error_count: int
    # For task records: the prompt options the examples were rendered with (labels taken from the data when the
    # job gave none); serving must use the same to get the same prompt.
    task_options: tasks_pb2.TaskPromptOptions | None = None
    data_format: int = 0


class JobManager:
    def __init__(
        self,
        store: Store,
        models: ModelSettings,
        settings: FinetuneSettings,
        send: Sender,
    ) -> None:
        """`send(job_id)` puts a job's training task on the queue."""
        self.store = store
        self.models = models
        self.settings = settings
        self.send = send
        self.registry = ModelRegistry(models)
        self.webhook_policy = settings.webhook_policy()
        # Keyed by canonical directory (the registry resolves every spelling to one), bounded like the tokenizer
        # service's cache: models named by path come and go.
        self._tokenizers: LRUCache[str, LoadedTokenizer] = LRUCache(models.max_cached_models)
        self._lock = threading.Lock()
        # Called with a job that just ended (set by whoever advances sweeps).
        self.on_finished: Callable[[finetune_pb2.Job], None] | None = None

    # -- models -------------------------------------------------------------------------------------------------

    def base_model(self, name: str, field: str = "spec.base_model") -> ModelSpec:
        if ":" in name:
            raise InvalidArgument.field(field, "a base model name has no ':' (fine-tuned models cannot be bases)")
        try:
            return self.registry.resolve(name, field=field)
        except NotFound as err:
            message = err.message if err.message.startswith(f"{field}:") else f"{field}: {err.message}"
            raise NotFound(message) from None
        except (OSError, ValueError) as err:
            # A path the file system refuses (a name over NAME_MAX, ...): the request's fault, never INTERNAL.
            reason = err.strerror if isinstance(err, OSError) and err.strerror else "not a usable name or path"
            raise InvalidArgument.field(field, f"{quote(name)}: {reason}") from None

    def tokenizer(self, spec: ModelSpec) -> LoadedTokenizer:
        key = str(spec.path)
        with self._lock:
            tok = self._tokenizers.get(key)
        if tok is None:
            tok = load_tokenizer(spec, self.models.max_model_len)
            with self._lock:
                self._tokenizers.put(key, tok)
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
            violations += spec_mod.check_webhook(request.webhook, field="webhook", policy=self.webhook_policy)
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
        spec.training_data.CopyFrom(self.store_data(spec.training_data, job_id, "training", sweep_id=sweep_id))
        if spec.HasField("validation_data"):
            spec.validation_data.CopyFrom(
                self.store_data(spec.validation_data, job_id, "validation", sweep_id=sweep_id)
            )
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
        self, source: finetune_pb2.TrainingDataSource, owner: str, name: str, *, sweep_id: str = ""
    ) -> finetune_pb2.TrainingDataSource:
        """The source as the record keeps it: inline bytes written to `owner`'s directory and named
        "upload:<owner>/<name>.jsonl"; a path checked inside GENLOOM_FINETUNE_DATA_ROOT (containment before
        existence) and kept relative to it. A sweep's trial (`sweep_id`) may name its sweep's upload; no client
        may name any upload, so no job reads another's data through the artifact store."""
        field = f"spec.{name}_data"
        if source.WhichOneof("source") == "jsonl":
            target = self.job_dir(owner) / "data" / f"{name}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.jsonl)
            return finetune_pb2.TrainingDataSource(path=f"{UPLOAD_PREFIX}{owner}/{name}.jsonl")
        path = source.path
        upload = _UPLOAD.fullmatch(path)
        if upload is not None and sweep_id and upload["owner"] == sweep_id:
            return finetune_pb2.TrainingDataSource(path=path)
        legacy = self._legacy_upload(path, sweep_id) if sweep_id else None
        if legacy is not None:
            return finetune_pb2.TrainingDataSource(path=legacy)
        if path.startswith(UPLOAD_PREFIX):
            raise InvalidArgument.field(
                f"{field}.path",
                "names data uploaded with another job or sweep, which only that job can read: send the data "
                "again (jsonl)",
            )
        resolved = self._data_root_file(path, f"{field}.path")
        root = self.settings.training_data_root
        assert root is not None  # _data_root_file refuses every path without one
        return finetune_pb2.TrainingDataSource(path=resolved.relative_to(canonical(root)).as_posix())

    def _data_root_file(self, path: str, field: str) -> Path:
        root = self.settings.training_data_root
        return resolve_within(
            path, [root] if root else [], field=field, kind="file", setting="GENLOOM_FINETUNE_DATA_ROOT"
        )

    def _legacy_upload(self, path: str, owner: str) -> str | None:
        """The upload name of a path in a record written before uploads were named: an absolute path into
        `owner`'s (a job's or sweep's) own upload directory; None for any other path."""
        if not os.path.isabs(path):
            return None
        own = canonical(self.job_dir(owner) / "data")
        target = canonical(path)
        if target.parent == own and target.name in ("training.jsonl", "validation.jsonl"):
            return f"{UPLOAD_PREFIX}{owner}/{target.name}"
        return None

    def data_file(self, job: finetune_pb2.Job, path: str, name: str) -> Path:
        """Where a job's data source is on disk, checked again as the job reads it: an upload only when it is the
        job's own (or its sweep's), anything else only inside the data root. Raises InvalidArgument, NotFound or
        PermissionDenied with messages that name no server directory."""
        field = f"spec.{name}_data.path"
        owners = sorted({job.id, job.sweep_id} - {""})
        # Records from before uploads were named hold absolute paths: their own upload directory still counts.
        path = next((legacy for owner in owners if (legacy := self._legacy_upload(path, owner))), path)
        upload = _UPLOAD.fullmatch(path)
        if upload is not None:
            if upload["owner"] not in owners:
                raise PermissionDenied(f"{field}: {quote(path)} is data uploaded with another job")
            return resolve_within(upload["file"], [self.job_dir(upload["owner"]) / "data"], field=field)
        return self._data_root_file(path, field)

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
        train_path = self.data_file(job, spec.training_data.path, "training")
        validation_path = (
            self.data_file(job, spec.validation_data.path, "validation") if spec.HasField("validation_data") else None
        )
        train = data_mod.read_examples(train_path, file="training", **common)  # type: ignore[arg-type]
        problems = list(train.errors)
        count = train.error_count
        warnings = []
        truncated = train.truncated
        validation: list[data_mod.TrainingExample] = []
        if spec.HasField("validation_data"):
            common["data_format"] = train.data_format
            common["task_options"] = train.task_options  # labels found in the training data, in its order
            val = data_mod.read_examples(validation_path, file="validation", **common)  # type: ignore[arg-type]
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
            tok = self.tokenizer(self.base_model(job.spec.base_model))
        except ServiceError as err:
            return self.fail(job.id, S.JOB_ERROR_CODE_MODEL_UNAVAILABLE, err.message, [S.JOB_STATE_VALIDATING])
        except OSError as err:
            logger.warning("job %s: loading the base model's tokenizer failed: %r", job.id, err)
            message = f"the base model could not be loaded: {describe_error(err)}"
            return self.fail(job.id, S.JOB_ERROR_CODE_MODEL_UNAVAILABLE, message, [S.JOB_STATE_VALIDATING])
        try:
            found = self.read_data(job, tok)
        except ServiceError as err:
            return self.fail(job.id, S.JOB_ERROR_CODE_INVALID_DATA, err.message, [S.JOB_STATE_VALIDATING])
        except (ValueError, OSError) as err:
            message = describe_error(err)
            return self.fail(job.id, S.JOB_ERROR_CODE_INVALID_DATA, message, [S.JOB_STATE_VALIDATING])
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
        code: finetune_pb2.JobErrorCode,
        message: str,
        allowed: list[int] | None = None,
        line_errors: list[finetune_pb2.LineError] | None = None,
        guard: Callable[[finetune_pb2.Job], bool] | None = None,
        watch: tuple[str, ...] = (),
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
            watch=watch,
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

            def request(j: finetune_pb2.Job) -> list[finetune_pb2.JobEvent] | Literal[False]:
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
        delivered = deliver(
            url,
            secret,
            event,
            body,
            policy=self.webhook_policy,
            attempts=s.webhook_attempts,
            backoff=s.webhook_backoff,
            timeout=s.webhook_timeout,
        )
        if not delivered:
            # Only that it failed: the reason (a status code, "connection refused") would let a client probe
            # what answers on the server's network. The server log has it.
            self.store.add_event(job.id, message_event(f"webhook delivery ({event}) failed", WARNING))

    # -- reap -----------------------------------------------------------------------------------------------------

    def reap(self) -> list[str]:
        """Find jobs whose worker or validator died. A running job without a live lease is re-queued (resuming
        from its last checkpoint) or, after GENLOOM_FINETUNE_MAX_ATTEMPTS deliveries, failed. Returns the ids of
        validating jobs nobody is validating (the caller validates them again)."""
        orphans = []
        grace = self.settings.grace_seconds()
        for job in self.store.jobs_in_states([S.JOB_STATE_RUNNING, S.JOB_STATE_VALIDATING]):
            if job.state == S.JOB_STATE_VALIDATING:
                if self.store.lease_holder("vlease", job.id) is None:
                    orphans.append(job.id)
                continue
            if self.store.lease_holder("lease", job.id) is not None:
                self.store.clear_leaseless(job.id)
                continue
            # A lapsed lease may only mean that Redis was unreachable for a while: the worker, still training,
            # takes it back on its next beat. Only a lease that stays gone for `grace` (measured from when a
            # reaper with a working Redis first saw it gone) means the worker is lost.
            if self.store.leaseless_for(job.id) < grace:
                continue
            self._requeue_lost(job)
            self.store.clear_leaseless(job.id)
        return orphans

    def _requeue_lost(self, job: finetune_pb2.Job) -> None:
        worker = job.worker or "its worker"
        # Watched with the record: a worker taking its lease back between our look and our write voids the write.
        lost_lease = (lease_key(job.id),)

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
                watch=lost_lease,
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
                watch=lost_lease,
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
            watch=lost_lease,
        )
        if moved:
            logger.warning("job %s lost %s; re-queued", job.id, worker)
            self.send(job.id)

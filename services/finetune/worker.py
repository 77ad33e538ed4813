"""`genloom worker`: a Celery worker that trains the jobs on the training queue.

The Celery task is thin: it takes a job id, reads the job from Redis, and runs it only if it can take the job's
lease, so a job never trains twice at once however often its message is delivered. Long-job settings: the
message is acknowledged only when the task returns (acks_late) and is handed back if the worker process is lost;
one message is prefetched at a time; the broker's visibility timeout is longer than any job, so a slow job is not
delivered to a second worker. A worker killed outright is detected through its lapsed lease instead (jobs.reap),
and the job's next delivery resumes from its last checkpoint.

The pool is `solo`: the task runs in the worker's main process, so no CUDA context is ever created in a process
that later forks; run one worker process per GPU (CUDA_VISIBLE_DEVICES) and several per machine to share a queue.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import redis
from celery import Celery

from genloom.services.finetune.jobs import Heartbeat, JobManager, describe_error
from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.finetune.store import TERMINAL, Store, message_event
from genloom.services.finetune.taskqueue import TRAIN_TASK, make_celery, sender
from genloom.services.models import finetuned
from genloom.services.server.errors import ServiceError
from genloom.services.server.settings import ModelSettings
from genloom.v1 import finetune_pb2

logger = logging.getLogger(__name__)

S = finetune_pb2
T = TypeVar("T")
# Tokenizer files copied next to a result so the directory is self-describing.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


class _Hooks:
    """What the training loop reports goes to Redis: metrics and checkpoints as events, the cancel flag back.

    Redis being unreachable (after the client's retries) never stops training: a report is skipped and logged,
    the cancel flag reads as not set, and the heartbeat takes the lease back when Redis returns.
    """

    def __init__(self, store: Store, job_id: str, beat: Heartbeat, stopping: Any, artifact_root: Path) -> None:
        self.store, self.job_id, self.beat, self.stopping = store, job_id, beat, stopping
        self.artifact_root = artifact_root

    def cancelled(self) -> bool:
        if self.beat.lost:
            return True
        try:
            return self.store.cancel_flag(self.job_id)
        except _REDIS_DOWN:
            logger.warning("job %s: could not read the cancel flag (Redis unreachable)", self.job_id)
            return False

    def preempted(self) -> bool:
        return bool(self.stopping.is_set())

    def metrics(self, m: finetune_pb2.JobMetrics) -> None:
        if m.HasField("validation_loss"):
            text = f"step {m.step}/{m.total_steps} validation loss {m.validation_loss:.4f}"
        else:
            text = f"step {m.step}/{m.total_steps} loss {m.train_loss:.4f}"
            if m.HasField("learning_rate"):
                text += f" lr {m.learning_rate:.3g}"
            if m.HasField("tokens_per_second"):
                text += f" {m.tokens_per_second:,.0f} tok/s"
        event = finetune_pb2.JobEvent(type=S.JOB_EVENT_TYPE_METRICS, level=S.JOB_EVENT_LEVEL_INFO, message=text)
        event.metrics.CopyFrom(m)

        def update(job: finetune_pb2.Job) -> list[finetune_pb2.JobEvent] | Literal[False]:
            if job.state != S.JOB_STATE_RUNNING:
                return False
            merged = finetune_pb2.JobMetrics()
            merged.CopyFrom(job.latest_metrics)
            merged.MergeFrom(m)
            job.latest_metrics.CopyFrom(merged)
            job.trained_tokens = m.trained_tokens
            if m.HasField("validation_loss") and (
                not job.HasField("best_validation_loss") or m.validation_loss < job.best_validation_loss
            ):
                job.best_validation_loss = m.validation_loss
            return [event]

        try:
            self.store.update_job(self.job_id, update)
        except _REDIS_DOWN:
            logger.warning("job %s: metrics of step %d not recorded (Redis unreachable)", self.job_id, m.step)

    def checkpoint(self, ckpt: finetune_pb2.Checkpoint, kept: Any) -> None:
        ckpt.path = artifact_relative(ckpt.path, self.artifact_root)
        event = finetune_pb2.JobEvent(
            type=S.JOB_EVENT_TYPE_CHECKPOINT,
            level=S.JOB_EVENT_LEVEL_INFO,
            message=f"saved {ckpt.name} (step {ckpt.step})",
        )
        event.checkpoint.CopyFrom(ckpt)
        try:
            self.store.record_checkpoint(self.job_id, ckpt, kept)
            self.store.add_event(self.job_id, event)
        except _REDIS_DOWN:
            # Unrecorded, it is not a resume point; the next checkpoint will be.
            logger.warning("job %s: %s not recorded (Redis unreachable)", self.job_id, ckpt.name)


def artifact_relative(path: str | Path, root: Path) -> str:
    """A path in the artifact store as records show it: relative to the store ("jobs/<id>/result"), so clients
    learn nothing of the server's directories; anything outside the store is not shown at all."""
    try:
        return Path(path).resolve().relative_to(Path(root).expanduser().resolve()).as_posix()
    except ValueError:
        return ""


class Worker:
    """Runs jobs; one instance per worker process."""

    def __init__(self, models: ModelSettings, settings: FinetuneSettings, app: Celery, hostname: str) -> None:
        self.models, self.settings, self.hostname = models, settings, hostname
        self.store = Store.from_url(models.redis_url)
        self.manager = JobManager(self.store, models, settings, sender(app, settings))
        from genloom.services.finetune.sweeps import SweepController

        self.sweeps = SweepController(self.manager)
        self.manager.on_finished = self.sweeps.trial_finished
        # Set when the worker is asked to stop (SIGTERM): a running job checkpoints, is re-queued and resumes on
        # another worker, instead of holding the shutdown until it ends.
        self.stopping = threading.Event()

    def run(self, job_id: str) -> str:
        job = self.store.get_job(job_id)
        if job is None:
            return "unknown job"
        if job.state in TERMINAL or job.state == S.JOB_STATE_VALIDATING:
            return f"skipped ({S.JobState.Name(job.state)})"
        if self.stopping.is_set():  # delivered while shutting down: hand it back rather than drop it
            self.manager.send(job_id)
            return "handed back (shutting down)"
        token = uuid.uuid4().hex
        if not self.store.acquire_lease("lease", job_id, token, self.settings.lease_seconds):
            current = self.store.get_job(job_id)
            if current is not None and current.state == S.JOB_STATE_QUEUED:
                # Queued but still leased: its previous worker is letting go (a hand-back at shutdown, or a lease
                # about to lapse). Try again later rather than drop the only message for it.
                self.manager.send(job_id, countdown=self.settings.lease_seconds / 3)
                return "still leased; retrying shortly"
            return "running on another worker"
        beat = Heartbeat(self.store, "lease", job_id, token, self.settings.lease_seconds).start()
        outcome: finetune_pb2.Job | str | None = None
        try:
            outcome = self._run(job_id, beat, token)
        finally:
            beat.stop()
            gc.collect()  # the model and optimizer of this job, before the next one loads
            if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
                sys.modules["torch"].cuda.empty_cache()
        if outcome == _HANDED_BACK:
            self.manager.send(job_id)  # only now that the lease is released
            return "handed back (shutting down)"
        if isinstance(outcome, finetune_pb2.Job):
            self._when_reachable(self.manager.finished, outcome)
            return S.JobState.Name(outcome.state)
        return "stopped"

    def _when_reachable(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`call(...)`, retried while Redis is unreachable (up to GENLOOM_FINETUNE_LEASE_SECONDS x 20): the end of
        a run is recorded once Redis is back rather than lost with the run. The heartbeat keeps the lease."""
        deadline = time.monotonic() + self.settings.lease_seconds * 20
        while True:
            try:
                return call(*args, **kwargs)
            except _REDIS_DOWN:
                if time.monotonic() > deadline:
                    raise
                logger.warning("Redis unreachable while recording the end of a job; retrying", exc_info=True)
                time.sleep(min(self.settings.lease_seconds / 3, 5.0))

    def _run(self, job_id: str, beat: Heartbeat, token: str) -> finetune_pb2.Job | str | None:
        """Train the job; the job if it ended, _HANDED_BACK if it must go back on the queue, else None."""
        from genloom.services.finetune import training

        job = self.store.get_job(job_id)
        if job is None or job.state in TERMINAL:
            return None
        if self.store.cancel_flag(job_id):
            done, moved = self.store.transition(
                job_id,
                S.JOB_STATE_CANCELLED,
                allowed_from=[S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING],
                message="cancelled",
            )
            return done if moved else None
        out_dir = self.manager.job_dir(job_id) / "checkpoints"
        resume = self._resume_point(job_id, out_dir)

        def start(j: finetune_pb2.Job) -> None:
            j.attempts += 1
            j.worker = self.hostname
            j.resumed_from_step = resume[0] if resume else 0
            if not j.HasField("started_at"):
                j.started_at.GetCurrentTime()

        note = []
        if resume:
            note = [message_event(f"resuming from checkpoint-{resume[0]}", S.JOB_EVENT_LEVEL_WARNING)]
        job, moved = self.store.transition(
            job_id,
            S.JOB_STATE_RUNNING,
            allowed_from=[S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING],
            message=f"running on {self.hostname}",
            mutate=start,
            extra_events=note,
        )
        if not moved or job is None:
            return None
        attempt = job.attempts

        def still_ours(j: finetune_pb2.Job) -> bool:
            return j.state == S.JOB_STATE_RUNNING and j.worker == self.hostname and j.attempts == attempt

        beat.reclaim = lambda: self.store.reclaim_lease(job_id, token, self.settings.lease_seconds, still_ours)
        try:
            base = self.manager.base_model(job.spec.base_model)
            tok = self.manager.tokenizer(base)
        except (ServiceError, OSError, ValueError) as err:
            logger.warning("job %s: the base model could not be loaded: %r", job_id, err)
            message = f"the base model could not be loaded: {describe_error(err)}"
            return self.manager.fail(job_id, S.JOB_ERROR_CODE_MODEL_UNAVAILABLE, message, [S.JOB_STATE_RUNNING])
        try:
            found = self.manager.read_data(job, tok)
        except (ServiceError, OSError, ValueError) as err:
            logger.warning("job %s: the training data could not be read: %r", job_id, err)
            message = f"the training data could not be read: {describe_error(err)}"
            return self.manager.fail(job_id, S.JOB_ERROR_CODE_INVALID_DATA, message, [S.JOB_STATE_RUNNING])
        try:
            result_dir = self.manager.job_dir(job_id) / "result"
            run = training.run(
                method=job.spec.method,
                hp=job.spec.hyperparameters,
                base_path=base.path,
                pad_id=_pad_id(tok),
                train=found.train,
                validation=found.validation,
                out_dir=out_dir,
                result_dir=result_dir,
                hooks=_Hooks(self.store, job_id, beat, self.stopping, self.settings.artifact_root),
                resume_from=resume[1] if resume else None,
                save_files=[base.path / f for f in _TOKENIZER_FILES if (base.path / f).is_file()],
            )
        except training.Unsupported as err:
            return self.manager.fail(job_id, S.JOB_ERROR_CODE_UNSUPPORTED, str(err), [S.JOB_STATE_RUNNING])
        except training.ModelUnavailable as err:
            logger.warning("job %s: %s", job_id, err)  # names the model's directory: for the log, not the record
            message = "the base model could not be loaded; see the worker log"
            return self.manager.fail(job_id, S.JOB_ERROR_CODE_MODEL_UNAVAILABLE, message, [S.JOB_STATE_RUNNING])
        except MemoryError:
            return self.manager.fail(job_id, S.JOB_ERROR_CODE_OUT_OF_MEMORY, _OOM, [S.JOB_STATE_RUNNING])
        except Exception as err:
            if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
                return self.manager.fail(job_id, S.JOB_ERROR_CODE_OUT_OF_MEMORY, _OOM, [S.JOB_STATE_RUNNING])
            if beat.lost:
                return None
            logger.exception("job %s failed", job_id)
            return self.manager.fail(
                job_id,
                S.JOB_ERROR_CODE_INTERNAL,
                f"training failed ({type(err).__name__}); see the worker log",
                [S.JOB_STATE_RUNNING],
            )
        if beat.lost:  # the job was re-queued while this worker stalled: its new owner reports it
            return None
        kept = sorted(p.name for p in out_dir.glob("checkpoint-*") if p.is_dir())
        # Trainer may delete checkpoints as the run ends
        self._when_reachable(self.store.record_checkpoint, job_id, None, kept)
        transition = functools.partial(self._when_reachable, self.store.transition)

        def hand_back(j: finetune_pb2.Job) -> None:
            j.attempts -= 1  # a shutdown is not a lost worker: it does not count against max_attempts

        if run.preempted:
            _, moved = transition(
                job_id,
                S.JOB_STATE_QUEUED,
                allowed_from=[S.JOB_STATE_RUNNING],
                level=S.JOB_EVENT_LEVEL_WARNING,
                message=f"{self.hostname} is shutting down; re-queued at step {run.steps} to resume from there",
                mutate=hand_back,
            )
            return _HANDED_BACK if moved else None
        if run.cancelled:
            done, moved = transition(
                job_id,
                S.JOB_STATE_CANCELLED,
                allowed_from=[S.JOB_STATE_RUNNING],
                message=f"cancelled at step {run.steps}",
            )
            return done if moved else None
        method = "full" if job.spec.method == S.FINE_TUNE_METHOD_FULL else "lora"
        name = finetuned.model_name(job.spec.base_model, job.spec.suffix, job_id)
        # Registered before the job says it succeeded, so the name is servable the moment a client sees that.
        self._when_reachable(
            finetuned.register,
            self.store.r,
            finetuned.FineTunedModel(name, job.spec.base_model, method, str(run.result_path), job_id),
        )

        def succeed(j: finetune_pb2.Job) -> None:
            j.result_model = name
            j.result_path = artifact_relative(run.result_path or "", self.settings.artifact_root)
            j.trained_tokens = run.trained_tokens
            merged = finetune_pb2.JobMetrics()
            merged.CopyFrom(j.latest_metrics)
            merged.MergeFrom(run.final_metrics)
            j.latest_metrics.CopyFrom(merged)
            best = run.best_validation_loss
            if best is not None and (not j.HasField("best_validation_loss") or best < j.best_validation_loss):
                j.best_validation_loss = best  # (a resumed run only saw the evaluations since it resumed)

        done, moved = transition(
            job_id,
            S.JOB_STATE_SUCCEEDED,
            allowed_from=[S.JOB_STATE_RUNNING],
            message=f"succeeded after {run.steps} steps: {name}",
            mutate=succeed,
        )
        if not moved:
            self.store.r.delete(finetuned.key(name))  # cancelled or taken over at the very end: not a result
            return None
        return done

    def _resume_point(self, job_id: str, out_dir: Path) -> tuple[int, Path] | None:
        """The newest checkpoint that was completely saved (recorded after Trainer wrote it) and is on disk."""
        for ckpt in reversed(self.store.checkpoints(job_id)):
            path = out_dir / ckpt.name
            if (path / "trainer_state.json").is_file():
                return int(ckpt.step), path
        return None


_HANDED_BACK = "handed back"
_OOM = "out of memory: lower batch_size or max_seq_length, or enable gradient_checkpointing"


def _pad_id(tok: Any) -> int:
    hf = tok.hf
    for candidate in (hf.pad_token_id, hf.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def build(models: ModelSettings, settings: FinetuneSettings, hostname: str) -> tuple[Celery, Worker]:
    app = make_celery(models, settings)
    worker = Worker(models, settings, app, hostname)

    from celery.signals import worker_shutting_down

    @worker_shutting_down.connect(weak=False)  # type: ignore[untyped-decorator]  # celery's signals are untyped
    def _stopping(**_: Any) -> None:
        worker.stopping.set()

    @app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]  # celery
    def train(job_id: str) -> str:
        outcome = worker.run(job_id)
        logger.info("job %s: %s", job_id, outcome)
        return outcome

    return app, worker


def main(argv: list[str] | None = None) -> None:
    """Run a worker until SIGTERM. Shutdown is warm: a running job saves a checkpoint after its current step and
    goes back on the queue (another worker resumes it), then the worker exits."""
    parser = argparse.ArgumentParser(prog="genloom worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hostname", default=f"genloom-{os.getpid()}@{socket.gethostname()}")
    parser.add_argument("--loglevel", default=os.environ.get("GENLOOM_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    from genloom.services.server.log_setup import configure_logging

    configure_logging(args.loglevel, os.environ.get("GENLOOM_LOG_FORMAT", "text"))
    models = ModelSettings.from_env()
    settings = FinetuneSettings.from_env()
    app, worker = build(models, settings, args.hostname)
    import genloom.services.finetune.training  # noqa: F401 - torch and transformers load now, not on the first job

    orphans = worker.manager.reap()  # jobs a previous worker left behind
    for job_id in orphans:
        worker.manager.validate(job_id)
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            f"--queues={settings.queue}",
            f"--hostname={args.hostname}",
            f"--loglevel={args.loglevel.upper()}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


if __name__ == "__main__":
    main()

"""Hyperparameter sweeps: trials are ordinary jobs on the training queue, started `parallelism` at a time.

`SweepController.advance` is the whole algorithm and is safe to call from anywhere at any time (under a
per-sweep lock): it refreshes the trials from their jobs, reports finished Bayesian trials to Optuna, starts new
trials while there is room, and ends the sweep when every trial has ended. A worker calls it when one of its
trials ends (so the next trial starts at once); the service calls it for every running sweep on each reaper pass,
so a sweep moves on even if the process that should have advanced it died. Trial jobs are created with the
idempotency key "<sweep-id>.<index>", so a controller that dies between creating a trial's job and recording it
finds the same job again on the next pass.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid

from google.protobuf import json_format

from genloom.services.finetune import search
from genloom.services.finetune import spec as spec_mod
from genloom.services.finetune.ids import new_sweep_id
from genloom.services.finetune.jobs import Heartbeat, JobManager
from genloom.services.finetune.store import SWEEP_TERMINAL, TERMINAL, P, as_text
from genloom.services.finetune.webhooks import deliver
from genloom.services.server.errors import AlreadyExists, ServiceError
from genloom.v1 import finetune_pb2

logger = logging.getLogger(__name__)

S = finetune_pb2


def objective_of(job: finetune_pb2.Job, objective: int) -> float | None:
    if objective == S.SWEEP_OBJECTIVE_TRAIN_LOSS:
        m = job.latest_metrics
        return m.train_loss if m.HasField("train_loss") else None
    return job.best_validation_loss if job.HasField("best_validation_loss") else None


class SweepController:
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager
        self.store = manager.store

    def create(self, request: finetune_pb2.CreateSweepRequest) -> tuple[finetune_pb2.Sweep, bool]:
        """Check and store a new sweep (its inline data stored once for every trial); with an idempotency key, the
        sweep an identical earlier request created instead (created=False). Trials start when it is advanced."""
        settings = self.manager.settings
        violations = search.check_sweep_spec(request.spec, settings, field="spec")
        if request.HasField("webhook"):
            violations += spec_mod.check_webhook(request.webhook, field="webhook", policy=self.manager.webhook_policy)
        violations += spec_mod.check_idempotency_key(request.idempotency_key)
        spec_mod.raise_if(violations)
        spec = search.effective_sweep_spec(request.spec, settings)
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

    def reaper_pass(self) -> None:
        """The service's periodic pass (one replica per interval, GENLOOM_FINETUNE_REAP_INTERVAL): re-queue jobs
        whose worker died, re-validate jobs whose validator died, and advance every running sweep."""
        interval = self.manager.settings.reap_interval
        if not self.store.r.set(P + "reaper", "1", nx=True, px=int(interval * 900)):
            return
        for job_id in self.manager.reap():
            self.manager.validate(job_id)
        for sweep_id, _ in self.store.list_sweeps(None, False, 1000):
            sweep = self.store.get_sweep(sweep_id)
            if sweep is not None and sweep.state not in SWEEP_TERMINAL:
                self.advance(sweep_id)

    def view(self, sweep: finetune_pb2.Sweep) -> finetune_pb2.Sweep:
        """`sweep` with its trials (and best trial) refreshed from their jobs, without writing anything: what
        GetSweep shows between the passes that advance it."""
        jobs = {j.id: j for j in self.store.get_jobs([t.job_id for t in sweep.trials]) if j is not None}
        for trial in sweep.trials:
            if trial.job_id in jobs:
                self._refresh(trial, jobs[trial.job_id], sweep.spec.objective)
        _set_best(sweep)
        return sweep

    def trial_finished(self, job: finetune_pb2.Job) -> None:
        if job.sweep_id:
            self.advance(job.sweep_id)

    def advance(self, sweep_id: str) -> finetune_pb2.Sweep | None:
        token = uuid.uuid4().hex
        for _ in range(100):  # another process is advancing it: wait for it, then look again
            if self.store.acquire_lease("sweeplock", sweep_id, token, 30):
                break
            threading.Event().wait(0.05)
        else:
            return self.store.get_sweep(sweep_id)
        # Kept alive while trials are created (each validates its data), so no second process advances at once.
        beat = Heartbeat(self.store, "sweeplock", sweep_id, token, 30).start()
        try:
            return self._advance(sweep_id)
        finally:
            beat.stop()

    def _advance(self, sweep_id: str) -> finetune_pb2.Sweep | None:
        sweep = self.store.get_sweep(sweep_id)
        if sweep is None or sweep.state in SWEEP_TERMINAL:
            return sweep
        spec = sweep.spec
        jobs = {j.id: j for j in self.store.get_jobs([t.job_id for t in sweep.trials]) if j is not None}
        bayes = (
            search.BayesianSearch(self.manager.models.redis_url, sweep_id, spec)
            if spec.method == S.SWEEP_METHOD_BAYESIAN
            else None
        )
        numbers_key = f"{P}sweepopt:{sweep_id}"
        numbers = {as_text(k): json.loads(v) for k, v in self.store.r.hgetall(numbers_key).items()}
        for trial in sweep.trials:
            job = jobs.get(trial.job_id)
            if job is not None:
                self._refresh(trial, job, spec.objective)
            entry = numbers.get(str(trial.index))
            if bayes is not None and entry and not entry["told"] and trial.state in TERMINAL:
                value = trial.objective_value if trial.HasField("objective_value") else None
                bayes.tell(entry["number"], value if trial.state == S.JOB_STATE_SUCCEEDED else None)
                self.store.r.hset(numbers_key, str(trial.index), json.dumps({"number": entry["number"], "told": True}))
        error: finetune_pb2.JobError | None = None
        if sweep.cancel_requested:
            for trial in sweep.trials:
                if trial.state not in TERMINAL:
                    with contextlib.suppress(ServiceError):
                        self.manager.cancel(trial.job_id)
        else:
            grid = search.grid(spec) if bayes is None else None
            total = len(grid) if grid is not None else spec.max_trials
            active = sum(1 for t in sweep.trials if t.state not in TERMINAL)
            while active < spec.parallelism and len(sweep.trials) < total:
                index = len(sweep.trials)
                if grid is not None:
                    params = grid[index]
                else:
                    assert bayes is not None
                    number, params = bayes.ask()
                    self.store.r.hset(numbers_key, str(index), json.dumps({"number": number, "told": False}))
                try:
                    job = self._start_trial(sweep, index, params)
                except ServiceError as err:
                    error = finetune_pb2.JobError(
                        code=S.JOB_ERROR_CODE_INTERNAL, message=f"trial {index} could not be created: {err}"
                    )
                    break
                trial = finetune_pb2.Trial(index=index, job_id=job.id, parameters=params)
                trial.hyperparameters.CopyFrom(job.spec.hyperparameters)
                self._refresh(trial, job, spec.objective)
                sweep.trials.append(trial)
                self._save_trials(sweep_id, sweep)
                active += 1 if trial.state not in TERMINAL else 0
        return self._finish_if_done(sweep_id, error)

    def _start_trial(
        self, sweep: finetune_pb2.Sweep, index: int, params: list[finetune_pb2.TrialParameter]
    ) -> finetune_pb2.Job:
        spec = finetune_pb2.JobSpec()
        spec.CopyFrom(sweep.spec.base_job)
        spec.hyperparameters.CopyFrom(search.apply_parameters(spec.hyperparameters, params))
        request = finetune_pb2.CreateJobRequest(spec=spec, idempotency_key=f"{sweep.id}.{index}")
        job, _ = self.manager.create(request, sweep_id=sweep.id, trial_index=index)
        self.manager.validate(job.id)
        return self.store.get_job(job.id) or job

    @staticmethod
    def _refresh(trial: finetune_pb2.Trial, job: finetune_pb2.Job, objective: int) -> None:
        trial.state = job.state
        if job.HasField("best_validation_loss"):
            trial.validation_loss = job.best_validation_loss
        if job.latest_metrics.HasField("train_loss"):
            trial.train_loss = job.latest_metrics.train_loss
        value = objective_of(job, objective)
        if value is not None and job.state == S.JOB_STATE_SUCCEEDED:
            trial.objective_value = value
        trial.result_model = job.result_model
        if job.HasField("started_at"):
            trial.started_at.CopyFrom(job.started_at)
        if job.HasField("finished_at"):
            trial.finished_at.CopyFrom(job.finished_at)

    def _save_trials(self, sweep_id: str, fresh: finetune_pb2.Sweep) -> None:
        def change(stored: finetune_pb2.Sweep) -> None:
            del stored.trials[:]
            stored.trials.extend(fresh.trials)
            _set_best(stored)

        self.store.update_sweep(sweep_id, change)

    def _finish_if_done(self, sweep_id: str, error: finetune_pb2.JobError | None) -> finetune_pb2.Sweep | None:
        sweep = self.store.get_sweep(sweep_id)
        if sweep is None:
            return None
        jobs = {j.id: j for j in self.store.get_jobs([t.job_id for t in sweep.trials]) if j is not None}
        for trial in sweep.trials:
            if trial.job_id in jobs:
                self._refresh(trial, jobs[trial.job_id], sweep.spec.objective)
        grid_total = len(search.grid(sweep.spec)) if sweep.spec.method != S.SWEEP_METHOD_BAYESIAN else 0
        total = grid_total or sweep.spec.max_trials
        all_ended = all(t.state in TERMINAL for t in sweep.trials)
        finished = all_ended and (sweep.cancel_requested or error is not None or len(sweep.trials) >= total)
        ended = [False]

        def change(stored: finetune_pb2.Sweep) -> bool | None:
            ended[0] = False  # a WATCH conflict runs this again
            if stored.state in SWEEP_TERMINAL:
                return False
            del stored.trials[:]
            stored.trials.extend(sweep.trials)
            _set_best(stored)
            if not finished:
                return None
            ended[0] = True
            stored.finished_at.GetCurrentTime()
            stored.cancel_requested = False
            if sweep.cancel_requested:
                stored.state = S.SWEEP_STATE_CANCELLED
            elif stored.HasField("best_trial"):
                stored.state = S.SWEEP_STATE_SUCCEEDED
            else:
                stored.state = S.SWEEP_STATE_FAILED
                stored.error.CopyFrom(
                    error
                    or finetune_pb2.JobError(
                        code=S.JOB_ERROR_CODE_ALL_TRIALS_FAILED, message="every trial failed or was cancelled"
                    )
                )
            return None

        updated = self.store.update_sweep(sweep_id, change)
        if updated is not None and ended[0]:
            if updated.spec.method == S.SWEEP_METHOD_BAYESIAN:
                search.BayesianSearch(self.manager.models.redis_url, sweep_id, updated.spec).delete()
            self._webhook(updated)
        return updated

    def cancel(self, sweep_id: str) -> finetune_pb2.Sweep | None:
        def request(stored: finetune_pb2.Sweep) -> bool | None:
            if stored.state in SWEEP_TERMINAL:
                return False
            stored.cancel_requested = True
            return None

        if self.store.update_sweep(sweep_id, request) is None:
            return None
        return self.advance(sweep_id)

    def _webhook(self, sweep: finetune_pb2.Sweep) -> None:
        hook = self.store.webhook("sweep", sweep.id) if sweep.webhook.url else None
        if hook is None:
            return
        name = {S.SWEEP_STATE_SUCCEEDED: "succeeded", S.SWEEP_STATE_FAILED: "failed"}.get(sweep.state, "cancelled")
        body = json_format.MessageToJson(sweep, indent=None).encode()
        s = self.manager.settings
        threading.Thread(
            target=deliver,
            args=(hook[0], hook[1], f"sweep.{name}", body),
            kwargs={
                "policy": self.manager.webhook_policy,
                "attempts": s.webhook_attempts,
                "backoff": s.webhook_backoff,
                "timeout": s.webhook_timeout,
            },
            name=f"webhook-{sweep.id}",
        ).start()


def _set_best(sweep: finetune_pb2.Sweep) -> None:
    done = [t for t in sweep.trials if t.state == S.JOB_STATE_SUCCEEDED and t.HasField("objective_value")]
    if done:
        best = min(done, key=lambda t: (t.objective_value, t.index))
        sweep.best_trial.CopyFrom(best)
    else:
        sweep.ClearField("best_trial")

"""Settings of the fine-tuning service and its workers (both read the same GENLOOM_FINETUNE_* variables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genloom.services.finetune.webhooks import WebhookPolicy
from genloom.services.server.paths import canonical
from genloom.services.server.settings import Settings, SettingsError, default_cache_dir, setting, split_list


@dataclass(frozen=True)
class FinetuneSettings(Settings):
    artifact_root: Path = setting(
        default_cache_dir() / "finetune",
        env="FINETUNE_ARTIFACT_ROOT",
        help="Artifact store: uploaded data, checkpoints and results, under jobs/<job-id>/. The service and every "
        "worker must see the same directory (a shared volume across machines).",
    )
    training_data_root: Path | None = setting(
        None,
        env="FINETUNE_DATA_ROOT",
        help="Directory CreateJob may read training files from by path; a relative path is taken inside it. Unset "
        "= inline data only. Must not contain the artifact root (uploaded data is readable only by its own job).",
    )
    queue: str = setting("training", env="FINETUNE_QUEUE", help="Celery queue that training jobs are sent to.")
    min_examples: int = setting(10, env="FINETUNE_MIN_EXAMPLES", help="Fewest valid training examples a job may have.")
    max_data_lines: int = setting(
        1_000_000, env="FINETUNE_MAX_DATA_LINES", help="Most lines a training or validation file may have."
    )
    max_inline_bytes: int = setting(
        32 * 1024 * 1024,
        env="FINETUNE_MAX_INLINE_BYTES",
        help="Largest inline training or validation file (TrainingDataSource.jsonl) in bytes.",
    )
    max_attempts: int = setting(
        3,
        env="FINETUNE_MAX_ATTEMPTS",
        help="Deliveries of a job to workers before it fails with JOB_ERROR_CODE_WORKER_LOST (a worker that dies "
        "or stops reporting costs one).",
    )
    checkpoint_steps: int = setting(
        100, env="FINETUNE_CHECKPOINT_STEPS", help="Default checkpoint interval in optimizer steps."
    )
    finetune_max_lora_rank: int = setting(64, env="FINETUNE_MAX_LORA_RANK", help="Largest LoRA rank a job may ask for.")
    max_sweep_trials: int = setting(64, env="FINETUNE_MAX_SWEEP_TRIALS", help="Most trials one sweep may run.")
    lease_seconds: float = setting(
        15.0,
        env="FINETUNE_LEASE_SECONDS",
        help="A running job's worker renews its lease on the job every third of this; a job whose lease lapses "
        "is treated as having lost its worker (re-queued from its last checkpoint, or failed after "
        "GENLOOM_FINETUNE_MAX_ATTEMPTS).",
    )
    lost_worker_grace: float | None = setting(
        None,
        env="FINETUNE_LOST_WORKER_GRACE",
        help="Seconds a running job's lease must stay gone, as the reaper sees it with Redis reachable, before its "
        "worker is deemed lost: a worker that was only cut off from Redis takes its lease back meanwhile and "
        "keeps the job (no attempt lost). Unset = GENLOOM_FINETUNE_LEASE_SECONDS; 0 = at once.",
    )
    reap_interval: float = setting(
        5.0,
        env="FINETUNE_REAP_INTERVAL",
        help="Seconds between the service's checks for jobs whose worker or validator died and for sweeps to advance.",
    )
    visibility_timeout: int = setting(
        7 * 24 * 3600,
        env="FINETUNE_VISIBILITY_TIMEOUT",
        help="Celery/Redis visibility timeout in seconds: longer than the longest job, so a running job's message "
        "is never handed to a second worker (a dead worker's job is re-queued through its lease instead).",
    )
    webhook_timeout: float = setting(10.0, env="FINETUNE_WEBHOOK_TIMEOUT", help="Seconds per webhook call.")
    webhook_attempts: int = setting(
        5, env="FINETUNE_WEBHOOK_ATTEMPTS", help="Webhook calls before giving up (exponential backoff between)."
    )
    webhook_backoff: float = setting(
        1.0, env="FINETUNE_WEBHOOK_BACKOFF", help="First delay between webhook retries in seconds (doubles)."
    )
    webhook_allowed_hosts: str = setting(
        "",
        env="FINETUNE_WEBHOOK_ALLOWED_HOSTS",
        help="Comma-separated host names and networks (CIDR, or single addresses) webhooks may call although "
        "they are loopback, private, link-local or otherwise not public, e.g. '10.0.0.0/8,hooks.internal'. "
        "Default: none (webhooks reach public addresses only).",
    )

    def validate(self) -> None:
        env = {info.name: info.env for info in self.fields()}
        for name in (
            "min_examples",
            "max_data_lines",
            "max_inline_bytes",
            "max_attempts",
            "checkpoint_steps",
            "finetune_max_lora_rank",
            "max_sweep_trials",
            "webhook_attempts",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{env[name]} must be >= 1")
        if self.lease_seconds <= 0 or self.reap_interval <= 0:
            raise SettingsError("GENLOOM_FINETUNE_LEASE_SECONDS and _REAP_INTERVAL must be > 0")
        if self.lost_worker_grace is not None and self.lost_worker_grace < 0:
            raise SettingsError("GENLOOM_FINETUNE_LOST_WORKER_GRACE must be >= 0")
        try:
            self.webhook_policy()
        except ValueError as err:
            raise SettingsError(f"GENLOOM_FINETUNE_WEBHOOK_ALLOWED_HOSTS: {err}") from None
        if self.training_data_root is not None:
            data, artifacts = canonical(self.training_data_root), canonical(self.artifact_root)
            if artifacts == data or artifacts.is_relative_to(data):
                raise SettingsError(
                    "GENLOOM_FINETUNE_DATA_ROOT contains GENLOOM_FINETUNE_ARTIFACT_ROOT: clients could read other "
                    "jobs' data and results by path; use separate directories"
                )

    def webhook_policy(self) -> WebhookPolicy:
        """The destinations GENLOOM_FINETUNE_WEBHOOK_ALLOWED_HOSTS allows besides public addresses."""
        return WebhookPolicy.parse(split_list(self.webhook_allowed_hosts))

    def grace_seconds(self) -> float:
        return self.lease_seconds if self.lost_worker_grace is None else self.lost_worker_grace

"""The training queue: the Celery app both sides build, and the function that puts a job's training task on it.

The gRPC service (servicer.py) only sends tasks; `genloom worker` (worker.py) registers the task under
TRAIN_TASK and consumes them. Both build their app with make_celery, so they agree on the broker, queue and
long-job settings; a message carries nothing but the job id. (Named taskqueue, not queue, so that it never
shadows the standard library's `queue`.)
"""

from __future__ import annotations

from typing import Protocol

from celery import Celery

from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.server.settings import ModelSettings

TRAIN_TASK = "genloom.finetune.train"


class Sender(Protocol):
    """Puts job `job_id`'s training task on the queue, to be delivered after `countdown` seconds if given."""

    def __call__(self, job_id: str, countdown: float | None = None) -> None: ...


def make_celery(models: ModelSettings, settings: FinetuneSettings) -> Celery:
    app = Celery("genloom", broker=models.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
    )
    return app


def sender(app: Celery, settings: FinetuneSettings) -> Sender:
    def send(job_id: str, countdown: float | None = None) -> None:
        app.send_task(TRAIN_TASK, args=[job_id], queue=settings.queue, countdown=countdown)

    return send

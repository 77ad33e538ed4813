"""Which services a `genloom serve` process hosts, and the process entry point."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.inference.settings import InferenceSettings
from genloom.services.server.service import Service
from genloom.services.server.settings import ModelSettings, ServerSettings, Settings, SettingsError
from genloom.services.tasks.settings import TasksSettings
from genloom.services.tokenizer.settings import TokenizerSettings

logger = logging.getLogger(__name__)

SERVICES = ("tokenizer", "inference", "tasks", "finetune")
# Every settings class a `genloom serve` process reads, in the order the CLI shows them.
SETTINGS_CLASSES: tuple[type[Settings], ...] = (
    ServerSettings,
    ModelSettings,
    TokenizerSettings,
    InferenceSettings,
    TasksSettings,
    FinetuneSettings,
)


def build_services(
    which: str,
    models: ModelSettings,
    tokenizer: TokenizerSettings,
    inference: InferenceSettings | None = None,
    tasks: TasksSettings | None = None,
    finetune: FinetuneSettings | None = None,
) -> list[Service]:
    """The service objects for `which` ("all" or one of SERVICES)."""
    from genloom.services.finetune.servicer import FineTuningServicer
    from genloom.services.inference.servicer import InferenceServicer
    from genloom.services.tasks.servicer import TaskServicer
    from genloom.services.tokenizer.servicer import TokenizerServicer

    if which != "all" and which not in SERVICES:
        raise ValueError(f"unknown service {which!r}; choose all or one of {', '.join(SERVICES)}")
    names: Sequence[str] = SERVICES if which == "all" else (which,)
    services: list[Service] = []
    for name in names:
        if name == "tokenizer":
            services.append(TokenizerServicer.from_settings(models, tokenizer))
        elif name == "inference":
            services.append(InferenceServicer(models, inference or InferenceSettings()))
        elif name == "tasks":
            tasks = tasks or TasksSettings()
            for dependency, target in (("tokenizer", tasks.tokenizer_target), ("inference", tasks.inference_target)):
                if not target and dependency not in names:
                    raise SettingsError(
                        f"GENLOOM_TASKS_{dependency.upper()}_TARGET: the task service needs a {dependency} service; "
                        f"set its address or serve both here (genloom serve all)"
                    )
            services.append(TaskServicer(tasks))
        else:
            services.append(FineTuningServicer(models, finetune or FinetuneSettings()))
    return services


def run(
    which: str,
    server: ServerSettings,
    models: ModelSettings,
    tokenizer: TokenizerSettings,
    inference: InferenceSettings,
    tasks: TasksSettings | None = None,
    finetune: FinetuneSettings | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. Raises if a service fails to start."""
    from genloom.services.server.app import GenloomServer
    from genloom.services.server.log_setup import configure_logging

    configure_logging(server.log_level, server.log_format)
    app = GenloomServer(server, build_services(which, models, tokenizer, inference, tasks, finetune))
    asyncio.run(app.serve_until_signal())

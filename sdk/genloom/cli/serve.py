"""`genloom serve` and `genloom worker`: run the servers and the fine-tuning worker.

`serve`'s flags are generated from the services' settings dataclasses (one source for env vars, defaults and
help), read when this module is imported; without the server extra installed the command is not offered. The
server itself and the worker are imported only when their command runs. Attached to the root app by the package's
__init__.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
from typing import TYPE_CHECKING, Any, Optional, TypeVar, cast

import typer

if TYPE_CHECKING:
    from genloom.services.server.settings import Settings

app = typer.Typer()

_S = TypeVar("_S", bound="Settings")


def _choices(name: str, values: Any) -> Any:
    """A str Enum for a fixed set of choices (typer validates and lists them in --help)."""
    return enum.Enum(name, {v: v for v in values}, type=str)


def _serve_command() -> Any:
    """`genloom serve SERVICE`, its flags generated from the settings dataclasses (one source for env vars,
    defaults and help). The server code is imported only when the command runs."""
    from genloom.services.launch import SERVICES, SETTINGS_CLASSES

    params = [
        inspect.Parameter(
            "service",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=_choices("Service", ["all", *SERVICES]),
            default=typer.Argument(..., help="Which service(s) this process hosts."),
        )
    ]
    owners: dict[str, type] = {}
    for cls in SETTINGS_CLASSES:
        for info in cls.fields():
            owners[info.name] = cls
            annotation: Any = info.type if info.default is not None else Optional[info.type]  # noqa: UP045
            if info.choices:
                annotation = _choices(info.name, info.choices)
            params.append(
                inspect.Parameter(
                    info.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    annotation=annotation,
                    default=typer.Option(
                        info.default, info.flag, envvar=info.env, help=info.help, rich_help_panel=cls.__name__
                    ),
                )
            )

    def serve(service: str, **values: Any) -> None:
        """Run genloom server(s) until SIGTERM/SIGINT. Every flag also reads its GENLOOM_* variable."""
        from genloom.services.finetune.settings import FinetuneSettings
        from genloom.services.inference.settings import InferenceSettings
        from genloom.services.launch import run
        from genloom.services.server.settings import ModelSettings, ServerSettings, SettingsError
        from genloom.services.tasks.settings import TasksSettings
        from genloom.services.tokenizer.settings import TokenizerSettings

        values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}
        try:
            built = {cls: cls(**{k: v for k, v in values.items() if owners[k] is cls}) for cls in SETTINGS_CLASSES}
        except SettingsError as err:
            raise typer.BadParameter(str(err)) from None

        def settings(cls: type[_S]) -> _S:
            return cast(_S, built[cls])

        try:
            run(
                getattr(service, "value", service),
                settings(ServerSettings),
                settings(ModelSettings),
                settings(TokenizerSettings),
                settings(InferenceSettings),
                settings(TasksSettings),
                settings(FinetuneSettings),
            )
        except SettingsError as err:
            raise typer.BadParameter(str(err)) from None

    serve.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return serve


with contextlib.suppress(ImportError):  # the SDK alone (no server extra): `genloom serve` is not offered
    app.command("serve", help="Run genloom server(s) until SIGTERM/SIGINT.")(_serve_command())


@app.command(
    "worker",
    help="Run a fine-tuning worker: a Celery worker on the training queue (Redis at GENLOOM_REDIS_URL) that trains "
    "jobs one at a time until SIGTERM. Configured by the GENLOOM_* variables of `genloom serve` (models, "
    "GENLOOM_FINETUNE_*); run one per GPU (CUDA_VISIBLE_DEVICES) and as many as you like on one queue.",
)
def worker_command(
    hostname: Optional[str] = typer.Option(None, help="Worker name shown on jobs (default genloom-<pid>@<host>)."),  # noqa: UP045
    loglevel: str = typer.Option("info", envvar="GENLOOM_LOG_LEVEL", help="Log level."),
) -> None:
    try:
        from genloom.services.finetune.worker import main as worker_main
    except ImportError as err:  # the SDK alone
        raise typer.BadParameter(f"the worker needs the server extra (pip install 'genloom[server]'): {err}") from None
    worker_main([*(["--hostname", hostname] if hostname else []), "--loglevel", loglevel])

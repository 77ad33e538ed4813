"""The root `genloom` Typer app and what every command shares with it.

Holds the global options (--target, --api-key, --timeout) and the connection they describe, the error exit of a
failed call and the exit statuses of watched jobs and sweeps. Every command module imports from here; the package's
__init__ attaches their commands to `app`.
"""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer

from genloom._client import Client
from genloom._exceptions import APIStatusError

app = typer.Typer(
    name="genloom",
    help="genloom: language-model task endpoints and fine-tuning over gRPC.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_JOB_FAILED = 1
"""Exit status of `finetune create --watch` / `finetune watch` when the job failed (also any server error)."""
EXIT_JOB_CANCELLED = 3
"""Exit status when the watched job (or waited sweep) was cancelled."""


class Connection:
    """`ctx.obj` of every command: the server the global options name."""

    def __init__(self, target: str | None, api_key: str | None, timeout: float) -> None:
        self.target, self.api_key, self.timeout = target, api_key, timeout

    def client(self) -> Client:
        return Client(target=self.target, api_key=self.api_key, timeout=self.timeout)


@app.callback()
def main_options(
    ctx: typer.Context,
    target: Annotated[
        str | None, typer.Option(envvar="GENLOOM_TARGET", help="Server address (default 127.0.0.1:50051).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="GENLOOM_API_KEY", help="API key, if the server requires one.")
    ] = None,
    timeout: Annotated[float, typer.Option(envvar="GENLOOM_TIMEOUT", help="Seconds to wait for each call.")] = 60.0,
) -> None:
    ctx.obj = Connection(target, api_key, timeout)


def fail(err: APIStatusError) -> NoReturn:
    """Print a failed call's error and its field violations to standard error and exit with status 1."""
    typer.echo(f"error: {err}", err=True)
    for violation in err.field_violations:
        typer.echo(f"  {violation.field}: {violation.description}", err=True)
    raise typer.Exit(1)

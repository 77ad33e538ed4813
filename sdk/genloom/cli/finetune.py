"""`genloom finetune`: submit, follow, show, list and cancel fine-tuning jobs, and list their checkpoints.

Holds the `finetune` command group (its `sweep` subgroup is in sweeps.py; the package's __init__ attaches both),
the job-following loop behind `create --watch` and `watch`, and the `finetune get` view of a job.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
from dataclasses import asdict, fields
from typing import Annotated, Optional

import typer

from genloom._client import Client
from genloom._exceptions import APIStatusError
from genloom.cli.display import (
    JobProgressDisplay,
    dump,
    duration,
    job_error_lines,
    json_default,
    loss_text,
    progress,
    show_event,
    table,
    when,
)
from genloom.cli.jobspec import FtDataArg, JobOptions, job_options
from genloom.cli.options import JsonOpt
from genloom.cli.root import EXIT_JOB_CANCELLED, EXIT_JOB_FAILED, fail
from genloom.types.finetune import FineTuneJob, Hyperparameters

app = typer.Typer(help="Fine-tune models: jobs (LoRA or full) and hyperparameter sweeps.", no_args_is_help=True)


class _JobStateChoice(str, enum.Enum):
    """--state values of finetune list."""

    validating = "validating"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


def _follow_job(client: Client, job_id: str, *, after: str | None, follow: bool, as_json: bool) -> int:
    """Print a job's events until it ends; the exit status for how it ended."""
    try:
        with contextlib.ExitStack() as stack:
            events = stack.enter_context(client.finetune.watch(job_id, after_event_id=after, follow=follow))
            display = stack.enter_context(JobProgressDisplay()) if not as_json else None
            for event in events:
                if display is None:
                    typer.echo(dump(event))
                else:
                    show_event(event, display)
            final = events.final
    except APIStatusError as err:
        fail(err)
    except KeyboardInterrupt:
        typer.echo(f"stopped watching; {job_id} carries on (genloom finetune cancel {job_id} stops it)", err=True)
        return 130
    if final is None or final.state == "succeeded":
        return 0
    return EXIT_JOB_CANCELLED if final.state == "cancelled" else EXIT_JOB_FAILED


_FINETUNE_CREATE_HELP = "\n\n".join(
    [
        "Submit a fine-tuning job, and with --watch follow it to the end.",
        'DATA.jsonl: chat {"messages": [{"role", "content"}, ...]}, prompt/completion {"prompt", "completion"}, '
        'or with --task the task records of `genloom eval` ({"text", "label"}, {"document", "summary"}, '
        '{"question", "context"?, "answer"}).',
        "Hyperparameters: --epochs, --batch-size, --learning-rate, --lora-rank, or any by name with --hp "
        "(e.g. --hp lr_scheduler=cosine --hp precision=bf16 --hp max_steps=200).",
        f"With --watch the exit status is 0 when the job succeeded, {EXIT_JOB_FAILED} when it failed and "
        f"{EXIT_JOB_CANCELLED} when it was cancelled.",
    ]
)


@app.command("create", help=_FINETUNE_CREATE_HELP)
@job_options
def finetune_create(
    ctx: typer.Context,
    data: FtDataArg,
    options: JobOptions,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow the job until it ends.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Submit a fine-tuning job."""
    spec = options.spec(data)
    arguments = {f.name: getattr(spec, f.name) for f in fields(spec)}
    with ctx.obj.client() as client:
        try:
            job = client.finetune.create(
                **arguments,
                idempotency_key=options.idempotency_key,
                webhook_url=options.webhook_url,
                webhook_secret=options.webhook_secret,
            )
        except APIStatusError as err:
            fail(err)
        except (OSError, ValueError) as err:
            raise typer.BadParameter(str(err)) from None
        if as_json:
            typer.echo(dump(job))
        else:
            note = "" if job.created is not False else " (an earlier request with this idempotency key created it)"
            typer.echo(f"{job.id} {job.state}{note}")
        if watch:
            raise typer.Exit(_follow_job(client, job.id, after=None, follow=True, as_json=as_json))


@app.command("watch")
def finetune_watch(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    after: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Start after this event id (default: the job's first event)."),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Keep following until the job ends, or print what happened.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print each event as a JSON line.")] = False,
) -> None:
    """Follow a job's events with a progress bar (step, loss, ETA) until it ends. Exit status: 0 succeeded (or
    still going with --no-follow), 1 failed, 3 cancelled."""
    with ctx.obj.client() as client:
        raise typer.Exit(_follow_job(client, job_id, after=after, follow=follow, as_json=as_json))


def _hyperparameter_text(hp: Hyperparameters) -> str:
    parts = []
    for name, value in hp.as_dict().items():
        if isinstance(value, tuple):
            value = ",".join(value)
        if value in ("", (), 0) and name not in ("weight_decay",):
            continue
        parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)


def _job_lines(job: FineTuneJob) -> list[str]:
    m = job.latest_metrics
    state = job.state + (" (cancel requested)" if job.cancel_requested else "")
    if m is not None and job.state == "running":
        state += (
            f"  step {progress(m)}, epoch {m.epoch:.2f}, loss {loss_text(m.train_loss)}, eta {duration(m.eta_seconds)}"
        )
    rows = [
        ("id", job.id),
        ("state", state),
        ("base model", job.base_model or "-"),
        ("method", job.method),
        ("result model", job.result_model or "-"),
        ("training data", str(job.spec.training_file) if isinstance(job.spec.training_file, str) else "(inline)"),
        ("examples", f"{job.training_examples} training, {job.validation_examples} validation"),
        ("best val loss", loss_text(job.best_validation_loss)),
        ("hyperparameters", _hyperparameter_text(job.hyperparameters) or "-"),
        ("created", when(job.created_at)),
        ("started", when(job.started_at)),
        ("finished", when(job.finished_at)),
    ]
    if job.sweep_id:
        rows.append(("sweep", f"{job.sweep_id} trial {job.trial_index}"))
    if job.attempts > 1:
        rows.append(("attempts", f"{job.attempts} (resumed from step {job.resumed_from_step})"))
    lines = [f"{name:<16}{value}" for name, value in rows]
    errors = job_error_lines(job.error)
    if errors:
        lines.append(f"{'error':<16}{errors[0]}")
        lines += [" " * 16 + line for line in errors[1:]]
    return lines


@app.command("get")
def finetune_get(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    as_json: JsonOpt = False,
) -> None:
    """Show a job: state, progress, result model, hyperparameters, error."""
    with ctx.obj.client() as client:
        try:
            job = client.finetune.get(job_id)
        except APIStatusError as err:
            fail(err)
    typer.echo(dump(job) if as_json else "\n".join(_job_lines(job)))


@app.command("list")
def finetune_list(
    ctx: typer.Context,
    state: Annotated[list[_JobStateChoice], typer.Option(help="Only jobs in this state (repeatable).")] = [],  # noqa: B006
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Only jobs on this base model.")] = None,  # noqa: UP045
    sweep: Annotated[Optional[str], typer.Option(help="Only the trials of this sweep.")] = None,  # noqa: UP045
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many jobs.")] = 20,
    show_all: Annotated[bool, typer.Option("--all", help="Show every job (all pages).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print each job as a JSON line.")] = False,
) -> None:
    """List fine-tuning jobs, newest first."""
    with ctx.obj.client() as client:
        try:
            pages = client.finetune.list(
                state=[s.value for s in state] or None,
                base_model=model,
                sweep_id=sweep,
                limit=min(limit, 100),
            )
            jobs = list(pages) if show_all else list(itertools.islice(pages, limit))
        except APIStatusError as err:
            fail(err)
    if as_json:
        for job in jobs:
            typer.echo(dump(job))
        return
    rows = [
        [j.id, j.state, j.base_model, j.method, progress(j.latest_metrics), when(j.created_at), j.result_model or "-"]
        for j in jobs
    ]
    for line in table(["ID", "STATE", "MODEL", "METHOD", "STEPS", "CREATED", "RESULT"], rows):
        typer.echo(line)


@app.command("cancel")
def finetune_cancel(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job (a running one stops at its next training step)."""
    with ctx.obj.client() as client:
        try:
            job = client.finetune.cancel(job_id)
        except APIStatusError as err:
            fail(err)
    if as_json:
        typer.echo(dump(job))
    elif job.state == "cancelled":
        typer.echo(f"{job.id} cancelled")
    else:
        typer.echo(f"{job.id} cancel requested: it stops at its next training step")


@app.command("checkpoints")
def finetune_checkpoints(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")],
    as_json: JsonOpt = False,
) -> None:
    """List a job's kept checkpoints, by step."""
    with ctx.obj.client() as client:
        try:
            checkpoints = client.finetune.checkpoints(job_id)
        except APIStatusError as err:
            fail(err)
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in checkpoints], default=json_default))
        return
    rows = [
        [
            c.name,
            str(c.step),
            f"{c.epoch:.2f}",
            loss_text(c.train_loss),
            loss_text(c.validation_loss),
            f"{c.size_bytes / 2**20:.1f} MiB",
            when(c.created_at),
            c.path,
        ]
        for c in checkpoints
    ]
    for line in table(["NAME", "STEP", "EPOCH", "TRAIN LOSS", "VAL LOSS", "SIZE", "CREATED", "PATH"], rows):
        typer.echo(line)

"""`genloom finetune sweep`: start, show, list and cancel hyperparameter sweeps.

Holds the `sweep` command group (attached under `finetune` by the package's __init__), the parser of --space
values (choices or LOW..HIGH ranges) and the `sweep get` view of a sweep and its trials. The job options of
`sweep create` are the ones `finetune create` takes (jobspec.py).
"""

from __future__ import annotations

import enum
import itertools
from typing import Annotated, Any, Optional

import typer

from genloom._exceptions import APIStatusError
from genloom.cli.display import SweepStatusLine, dump, job_error_lines, loss_text, table, when
from genloom.cli.jobspec import FtDataArg, JobOptions, job_options
from genloom.cli.options import JsonOpt, key_values
from genloom.cli.root import EXIT_JOB_CANCELLED, EXIT_JOB_FAILED, fail
from genloom.types.finetune import FloatRange, IntRange, Sweep, parse_hyperparameter

app = typer.Typer(
    help="Hyperparameter sweeps: every trial is a fine-tuning job with the searched values applied.",
    no_args_is_help=True,
)


class _SweepStateChoice(str, enum.Enum):
    """--state values of finetune sweep list."""

    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class _SweepMethodChoice(str, enum.Enum):
    """--search values."""

    grid = "grid"
    bayesian = "bayesian"


class _ObjectiveChoice(str, enum.Enum):
    """--objective values."""

    validation_loss = "validation_loss"
    train_loss = "train_loss"


def _number(text: str, option: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"expected a number, got {text!r}", param_hint=option) from None


def _search_dimension(name: str, text: str) -> Any:
    """One --space value: LOW..HIGH[:log][:step=N][:points=N] is a range (integers when both ends are), anything
    else comma-separated choices (a list-valued hyperparameter's items joined with '+')."""
    option = "--space"
    if ".." in text:
        bounds, *flags = text.split(":")
        low_text, _, high_text = bounds.partition("..")
        low, high = _number(low_text.strip(), option), _number(high_text.strip(), option)
        settings: dict[str, Any] = {}
        for flag in flags:
            key, _, value = flag.strip().partition("=")
            if key == "log" and not value:
                settings["log"] = True
            elif key in ("step", "points") and value.isdigit():
                settings["step" if key == "step" else "grid_points"] = int(value)
            else:
                raise typer.BadParameter(f"unknown range flag {flag!r} (log, step=N, points=N)", param_hint=option)
        integers = isinstance(low, int) and isinstance(high, int) and "grid_points" not in settings
        if not integers and "step" in settings:
            raise typer.BadParameter("step=N is for integer ranges; use points=N", param_hint=option)
        try:
            if integers:
                return IntRange(int(low), int(high), **settings)
            return FloatRange(float(low), float(high), **settings)
        except ValueError as err:
            raise typer.BadParameter(f"{name}: {err}", param_hint=option) from None
    choices = [choice.strip() for choice in text.split(",") if choice.strip()]
    if not choices:
        raise typer.BadParameter(f"{name}: no values", param_hint=option)
    try:
        return [parse_hyperparameter(name, choice.replace("+", ",")) for choice in choices]
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint=option) from None


def _value_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "+".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _space_text(space: Any) -> str:
    if isinstance(space, FloatRange):
        return f"{space.min:g}..{space.max:g}" + (":log" if space.log else "")
    if isinstance(space, IntRange):
        return f"{space.min}..{space.max}" + (f":step={space.step}" if space.step != 1 else "")
    return ",".join(_value_text(v) for v in space)


def _sweep_lines(sweep: Sweep) -> list[str]:
    spec = sweep.spec
    done = sum(1 for t in sweep.trials if t.state in ("succeeded", "failed", "cancelled"))
    lines = [
        f"{'id':<12}{sweep.id}",
        f"{'state':<12}{sweep.state}" + (" (cancel requested)" if sweep.cancel_requested else ""),
        f"{'search':<12}{spec.method}, minimizing {spec.objective}, {spec.parallelism} at a time",
        f"{'space':<12}" + "; ".join(f"{name}={_space_text(s)}" for name, s in spec.search_space.items()),
        f"{'trials':<12}{len(sweep.trials)} created, {done} ended"
        + (f" of {spec.max_trials}" if spec.max_trials else ""),
    ]
    if sweep.best_trial is not None:
        best = sweep.best_trial
        lines.append(f"{'best':<12}trial {best.index} ({best.job_id}): {best.result_model or '-'}")
    errors = job_error_lines(sweep.error)
    if errors:
        lines.append(f"{'error':<12}{errors[0]}")
    names = list(spec.search_space)
    best_index = sweep.best_trial.index if sweep.best_trial is not None else None
    rows = [
        [
            "*" if t.index == best_index else "",
            str(t.index),
            t.job_id,
            t.state,
            *(_value_text(t.parameters.get(n, "-")) for n in names),
            loss_text(t.objective_value),
            loss_text(t.validation_loss),
        ]
        for t in sweep.trials
    ]
    if rows:
        lines.append("")
        lines += table(["", "#", "JOB", "STATE", *names, "OBJECTIVE", "VAL LOSS"], rows)
    return lines


_SWEEP_CREATE_HELP = "\n\n".join(
    [
        "Start a hyperparameter sweep over the job DATA.jsonl and the job options describe.",
        "--space NAME=VALUES (repeatable) searches a hyperparameter: comma-separated choices "
        "(--space lr_scheduler=linear,cosine; a list-valued one joins items with '+': "
        "--space lora_target_modules=q_proj+v_proj,all-linear), or a range LOW..HIGH[:log][:step=N][:points=N] "
        "(--space learning_rate=1e-5..1e-3:log, --space lora_rank=4..16:step=4).",
        f"With --wait the exit status is 0 when the sweep succeeded, {EXIT_JOB_FAILED} when it failed and "
        f"{EXIT_JOB_CANCELLED} when it was cancelled.",
    ]
)


@app.command("create", help=_SWEEP_CREATE_HELP)
@job_options
def sweep_create(
    ctx: typer.Context,
    data: FtDataArg,
    space: Annotated[list[str], typer.Option("--space", metavar="NAME=VALUES", help="A searched hyperparameter.")],
    search: Annotated[_SweepMethodChoice, typer.Option(help="grid: every combination; bayesian: TPE.")] = (
        _SweepMethodChoice.grid
    ),
    max_trials: Annotated[int, typer.Option(min=0, help="Trials to run (0: the whole grid, or 10).")] = 0,
    parallelism: Annotated[int, typer.Option(min=0, help="Trials running at once (0: 2).")] = 0,
    objective: Annotated[
        Optional[_ObjectiveChoice],  # noqa: UP045
        typer.Option(help="What to minimize (default validation_loss)."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the Bayesian sampler.")] = 0,
    *,
    options: JobOptions,
    wait: Annotated[bool, typer.Option("--wait", help="Poll the sweep until it ends, then show its trials.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start a hyperparameter sweep."""
    search_space = {name: _search_dimension(name, text) for name, text in key_values(space, "--space")}
    spec = options.spec(data)
    with ctx.obj.client() as client:
        try:
            sweep = client.finetune.sweeps.create(
                spec,
                search_space=search_space,
                method=search.value,
                max_trials=max_trials,
                parallelism=parallelism,
                objective=objective.value if objective else None,
                seed=seed,
                idempotency_key=options.idempotency_key,
                webhook_url=options.webhook_url,
                webhook_secret=options.webhook_secret,
            )
            typer.echo(dump(sweep) if as_json else f"{sweep.id} {sweep.state}")
            if not wait:
                return
            sweep = client.finetune.sweeps.wait(sweep.id, on_update=SweepStatusLine())
        except APIStatusError as err:
            fail(err)
        except (OSError, ValueError) as err:
            raise typer.BadParameter(str(err)) from None
    typer.echo(dump(sweep) if as_json else "\n".join(_sweep_lines(sweep)))
    if sweep.state != "succeeded":
        raise typer.Exit(EXIT_JOB_CANCELLED if sweep.state == "cancelled" else EXIT_JOB_FAILED)


@app.command("get")
def sweep_get(
    ctx: typer.Context,
    sweep_id: Annotated[str, typer.Argument(metavar="SWEEP", help="The sweep's id.")],
    as_json: JsonOpt = False,
) -> None:
    """Show a sweep and its trials, the best marked with '*'."""
    with ctx.obj.client() as client:
        try:
            sweep = client.finetune.sweeps.get(sweep_id)
        except APIStatusError as err:
            fail(err)
    typer.echo(dump(sweep) if as_json else "\n".join(_sweep_lines(sweep)))


@app.command("list")
def sweep_list(
    ctx: typer.Context,
    state: Annotated[list[_SweepStateChoice], typer.Option(help="Only sweeps in this state (repeatable).")] = [],  # noqa: B006
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many sweeps.")] = 20,
    show_all: Annotated[bool, typer.Option("--all", help="Show every sweep (all pages).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print each sweep as a JSON line.")] = False,
) -> None:
    """List sweeps, newest first."""
    with ctx.obj.client() as client:
        try:
            pages = client.finetune.sweeps.list(state=[s.value for s in state] or None, limit=min(limit, 100))
            sweeps = list(pages) if show_all else list(itertools.islice(pages, limit))
        except APIStatusError as err:
            fail(err)
    if as_json:
        for sweep in sweeps:
            typer.echo(dump(sweep))
        return
    rows = [
        [
            s.id,
            s.state,
            s.spec.method,
            str(len(s.trials)),
            loss_text(s.best_trial.objective_value) if s.best_trial else "-",
            when(s.created_at),
        ]
        for s in sweeps
    ]
    for line in table(["ID", "STATE", "SEARCH", "TRIALS", "BEST", "CREATED"], rows):
        typer.echo(line)


@app.command("cancel")
def sweep_cancel(
    ctx: typer.Context,
    sweep_id: Annotated[str, typer.Argument(metavar="SWEEP", help="The sweep's id.")],
    as_json: JsonOpt = False,
) -> None:
    """Cancel a sweep: no further trials start, and running ones are cancelled."""
    with ctx.obj.client() as client:
        try:
            sweep = client.finetune.sweeps.cancel(sweep_id)
        except APIStatusError as err:
            fail(err)
    if as_json:
        typer.echo(dump(sweep))
    elif sweep.state == "cancelled":
        typer.echo(f"{sweep.id} cancelled")
    else:
        typer.echo(f"{sweep.id} cancel requested: its running trials are stopping")

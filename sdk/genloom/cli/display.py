"""How the commands print: value formatting, tables, JSON dumps and the live progress displays.

Formatting helpers (times, durations, losses, column tables, JSON of SDK records), the progress bars of
`genloom eval` and of a watched fine-tuning job, the event lines of a job and the status line of a waited sweep.
Used by the eval, fine-tuning and sweep commands. rich is imported only when a display starts, and is optional:
without it the bars are plain lines on standard error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

import typer

from genloom.types.finetune import JobError, JobEvent, JobMetrics, Sweep
from genloom.types.tasks import EvalProgress


def json_default(value: Any) -> Any:
    """json.dumps's default for SDK records: datetimes as ISO text, bytes as their size."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def dump(value: Any) -> str:
    """A record (dataclass) as one JSON line."""
    return json.dumps(asdict(value), ensure_ascii=False, default=json_default)


def when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def loss_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    return ["  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in [headers, *rows]]


def progress(metrics: JobMetrics | None) -> str:
    if metrics is None or not metrics.total_steps:
        return "-"
    return f"{metrics.step}/{metrics.total_steps}"


def job_error_lines(error: JobError | None) -> list[str]:
    if error is None:
        return []
    lines = [f"{error.code}: {error.message}"]
    lines += [f"  {line_error}" for line_error in error.line_errors]
    return lines


class EvalProgressDisplay:
    """A progress bar per configuration on standard error: rich's when it is installed, else a plain line."""

    def __init__(self, configurations: int) -> None:
        self.configurations = configurations
        self._bars: dict[int, Any] = {}
        self._progress: Any = None
        self._last_line = ""
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )

    def __enter__(self) -> EvalProgressDisplay:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self._last_line:
            typer.echo(err=True)

    def update(self, event: EvalProgress) -> None:
        label = f"[{event.configuration_index + 1}/{self.configurations}] {event.configuration_name}"
        failed = f"{event.items_failed} failed" if event.items_failed else ""
        if self._progress is None:
            line = f"\r{label}  {event.items_done}/{event.items_total} {failed}"
            if line != self._last_line:
                typer.echo(line, nl=False, err=True)
                self._last_line = line
            return
        bar = self._bars.get(event.configuration_index)
        if bar is None:
            bar = self._bars[event.configuration_index] = self._progress.add_task(
                label, total=event.items_total, failed=failed
            )
        self._progress.update(bar, completed=event.items_done, total=event.items_total, failed=failed)


class JobProgressDisplay:
    """A job's step progress bar on standard error (rich's when installed, else a plain line), with training
    loss and ETA; event lines go to standard output above it."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._bar: Any = None
        self._last_line = ""
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        except ImportError:
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[eta]}"),
            console=Console(stderr=True),
        )

    def __enter__(self) -> JobProgressDisplay:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self._last_line:
            typer.echo(err=True)

    def update(self, metrics: JobMetrics) -> None:
        loss = f"loss {metrics.train_loss:.4f}" if metrics.train_loss is not None else ""
        eta = f"eta {duration(metrics.eta_seconds)}" if metrics.eta_seconds is not None else ""
        epoch = f"epoch {metrics.epoch:.2f}"
        if self._progress is None:
            line = f"\rstep {metrics.step}/{metrics.total_steps}  {epoch}  {loss}  {eta}".rstrip()
            if line != self._last_line:
                typer.echo(line, nl=False, err=True)
                self._last_line = line
            return
        if self._bar is None:
            self._bar = self._progress.add_task(epoch, total=metrics.total_steps or None, loss=loss, eta=eta)
        self._progress.update(
            self._bar, description=epoch, completed=metrics.step, total=metrics.total_steps or None, loss=loss, eta=eta
        )

    def line(self, text: str, *, err: bool = False) -> None:
        """An event line, printed above the bar."""
        if self._progress is None and self._last_line:
            typer.echo(err=True)
            self._last_line = ""
        typer.echo(text, err=err)


def show_event(event: JobEvent, display: JobProgressDisplay) -> None:
    """One job event: metrics move the bar, everything else is a line above it."""
    stamp = f"[{event.created_at.astimezone():%H:%M:%S}] " if event.created_at else ""
    if event.type == "metrics" and event.metrics is not None:
        display.update(event.metrics)
        if event.metrics.validation_loss is not None:
            m = event.metrics
            display.line(f"{stamp}step {m.step}/{m.total_steps}: validation loss {m.validation_loss:.4f}")
    elif event.type == "checkpoint" and event.checkpoint is not None:
        c = event.checkpoint
        losses = f"train loss {loss_text(c.train_loss)}" + (
            f", validation loss {loss_text(c.validation_loss)}" if c.validation_loss is not None else ""
        )
        display.line(f"{stamp}saved {c.name} (step {c.step}, epoch {c.epoch:.2f}, {losses})")
    elif event.type == "state_change" and event.state is not None:
        if event.state == "succeeded":
            display.line(f"{stamp}succeeded: {event.result_model}")
        elif event.state == "failed":
            display.line(f"{stamp}failed: " + "\n".join(job_error_lines(event.error) or [event.message]), err=True)
        else:
            display.line(f"{stamp}{event.state}")
    elif event.level == "warning":
        display.line(f"{stamp}warning: {event.message}")
    elif event.level == "error":
        display.line(f"{stamp}error: {event.message}", err=True)
    else:
        display.line(f"{stamp}{event.message}")


class SweepStatusLine:
    """`sweeps.wait()`'s on_update for --wait: one line on standard error whenever the trial counts change."""

    def __init__(self) -> None:
        self._last = ""

    def __call__(self, sweep: Sweep) -> None:
        counts: dict[str, int] = {}
        for trial in sweep.trials:
            counts[trial.state] = counts.get(trial.state, 0) + 1
        line = f"{sweep.state}: " + ", ".join(f"{n} {state}" for state, n in counts.items())
        if line != self._last:
            typer.echo(line, err=True)
            self._last = line

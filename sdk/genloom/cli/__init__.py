"""The `genloom` command: run servers (`genloom serve`) and call them (`genloom tokenize`, `genloom classify`, ...).

This package's root assembles the command line from one module per command group: tokenizer, inference, tasks,
evaluate (`eval`), serve (`serve`, `worker`), finetune and its sweeps, in the order `genloom --help` lists them.
Shared pieces: root.py (the root app, global options, error exit), options.py (option declarations and input
readers), jobspec.py (the job options of `finetune create` and `finetune sweep create`) and display.py (output
formatting and progress displays). `main` is the console script (pyproject.toml's [project.scripts]).
"""

from __future__ import annotations

from genloom.cli import evaluate, finetune, inference, serve, sweeps, tasks, tokenizer
from genloom.cli.root import EXIT_JOB_CANCELLED, EXIT_JOB_FAILED, app

__all__ = ["EXIT_JOB_CANCELLED", "EXIT_JOB_FAILED", "app", "main"]

# Unnamed groups: their commands join the root's, in this order.
app.add_typer(tokenizer.app)
app.add_typer(inference.app)
app.add_typer(tasks.app)
app.add_typer(evaluate.app)
app.add_typer(serve.app)
finetune.app.add_typer(sweeps.app, name="sweep")
app.add_typer(finetune.app, name="finetune")


def main() -> None:
    app()

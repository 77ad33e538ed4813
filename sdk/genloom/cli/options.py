"""Option declarations and input readers shared by the calling commands.

The Annotated option types several commands declare alike (texts, --file, --model, --chat, --json, the prompting
options of the task commands) and the helpers that turn their values into request inputs: texts from arguments,
files or standard input, JSONL example records, comma-separated lists and NAME=VALUE pairs. Used by the tokenizer,
inference, task, eval, fine-tuning and sweep commands.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from genloom.types.tasks import EvalRecord, read_eval_records


class StrategyChoice(str, enum.Enum):
    """--strategy values."""

    zero_shot = "zero-shot"
    one_shot = "one-shot"
    few_shot = "few-shot"


class TaskChoice(str, enum.Enum):
    """--task values of eval (and of fine-tuning on task records)."""

    classify = "classify"
    summarize = "summarize"
    answer = "answer"


TextsArg = Annotated[Optional[list[str]], typer.Argument(help="Texts (none: read --file or standard input).")]  # noqa: UP045
FilesOpt = Annotated[
    list[Path], typer.Option("--file", "-f", exists=True, dir_okay=False, help="Read a text from a file (repeatable).")
]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name (default: the server's default model).")]
ChatOpt = Annotated[bool, typer.Option("--chat", help="Send each text as a user message through the chat template.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
AdapterOpt = Annotated[str, typer.Option(help="A loaded LoRA adapter's name.")]
StrategyOpt = Annotated[
    Optional[StrategyChoice],  # noqa: UP045 - typer reads module-level annotations at run time
    typer.Option(help="Prompting strategy (default: zero-shot without --examples, else one- or few-shot)."),
]
MaxExamplesOpt = Annotated[int, typer.Option(help="Most examples with few-shot (0: as many as fit).")]
InstructionOpt = Annotated[Optional[str], typer.Option(help="Replace the built-in task instruction.")]  # noqa: UP045
MaxNewTokensOpt = Annotated[Optional[int], typer.Option(help="Tokens to generate at most (default: the task's).")]  # noqa: UP045
TemperatureOpt = Annotated[Optional[float], typer.Option(help="Sampling temperature (default 0: greedy).")]  # noqa: UP045
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")]  # noqa: UP045


def inputs(texts: list[str], files: list[Path], chat: bool) -> list[Any]:
    """The texts of TEXT arguments and --file options, else standard input; as chat messages with --chat."""
    items: list[str] = list(texts) + [f.read_text() for f in files]
    if not items and not sys.stdin.isatty():
        items = [sys.stdin.read()]
    if not items:
        raise typer.BadParameter("give TEXT arguments, --file, or text on standard input")
    return [[{"role": "user", "content": t}] for t in items] if chat else list(items)


def read_text(path: str) -> str:
    """A file's text, or standard input for "-"."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise typer.BadParameter(f"cannot read {path}: {err.strerror or err}") from None


def read_records(path: str | Path, task: str, option: str) -> list[EvalRecord]:
    """The records of a local JSONL file (the EvalDataset format), or a usage error naming file and line."""
    try:
        return read_eval_records(path, task)  # type: ignore[arg-type]
    except OSError as err:
        raise typer.BadParameter(f"cannot read {path}: {err.strerror or err}", param_hint=option) from None
    except ValueError as err:
        raise typer.BadParameter(f"{path}: {err}", param_hint=option) from None


def split_list(value: str, option: str) -> list[str]:
    """A comma-separated option value's items, or a usage error when it names none."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise typer.BadParameter("give a comma-separated list", param_hint=option)
    return items


def key_values(items: Sequence[str], option: str) -> list[tuple[str, str]]:
    """NAME=VALUE option values as (name, value) pairs, or a usage error for one without '='."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint=option)
        pairs.append((key.strip(), value.strip()))
    return pairs

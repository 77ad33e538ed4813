"""The job options `genloom finetune create` and `genloom finetune sweep create` share, declared once.

`JobOptions` lists them (method, model, data format, hyperparameters, validation, metadata, idempotency key,
webhook, ...) with their typer declarations; `job_options` puts them on a command in place of its JobOptions
parameter and hands them back as one `JobOptions`, whose `spec()` turns them into the FineTuneSpec both commands send.
Used by finetune.py and sweeps.py.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from genloom.cli.options import TaskChoice, key_values
from genloom.types.finetune import FineTuneSpec, parse_hyperparameter


class FineTuneMethodChoice(str, enum.Enum):
    """--method values of finetune."""

    lora = "lora"
    full = "full"


class DataFormatChoice(str, enum.Enum):
    """--format values."""

    chat = "chat"
    prompt_completion = "prompt_completion"
    task_records = "task_records"


FtDataArg = Annotated[
    str,
    typer.Argument(
        metavar="DATA.jsonl",
        help="Training data, one JSON object per line: read here and sent with the request (--server-path: a path "
        "the server reads).",
    ),
]
FtMethodOpt = Annotated[FineTuneMethodChoice, typer.Option(help="lora: train an adapter; full: all weights.")]
FtModelOpt = Annotated[str, typer.Option("--model", "-m", help="Base model (default: the server's default model).")]
FtValidationOpt = Annotated[
    Optional[str],  # noqa: UP045 - typer reads module-level annotations at run time
    typer.Option("--validation", metavar="V.jsonl", help="Validation data (default: hold out --validation-split)."),
]
EpochsOpt = Annotated[Optional[int], typer.Option(help="Passes over the training data (default 3).")]  # noqa: UP045
BatchSizeOpt = Annotated[Optional[int], typer.Option(help="Examples per micro-step (default 8).")]  # noqa: UP045
LearningRateOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(help="Peak learning rate (default 2e-4 for LoRA, 2e-5 for full)."),
]
LoraRankOpt = Annotated[Optional[int], typer.Option(help="LoRA rank (default 8).")]  # noqa: UP045
SuffixOpt = Annotated[str, typer.Option(help="Part of the result's name, ft:<base>:<suffix>:<job-id>.")]
FormatOpt = Annotated[
    Optional[DataFormatChoice],  # noqa: UP045
    typer.Option("--format", help="Line format (default: detected from the first line; task_records with --task)."),
]
FtTaskOpt = Annotated[
    Optional[TaskChoice],  # noqa: UP045
    typer.Option("--task", help="The data are task records for this task (served with the same prompt)."),
]
LabelOpt = Annotated[
    list[str],
    typer.Option("--label", "-l", help="Classify task records: a label, in order (repeatable; default: the data's)."),
]
MultiLabelOpt = Annotated[bool, typer.Option("--multi-label", help="Classify task records: several labels per text.")]
HpOpt = Annotated[
    list[str],
    typer.Option(
        "--hp",
        metavar="NAME=VALUE",
        help="Any hyperparameter by name, e.g. --hp lr_scheduler=cosine --hp lora_target_modules=q_proj,v_proj "
        "(repeatable).",
    ),
]
ValidationSplitOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(help="Without --validation: fraction of the data held out (default 0.1; 0 = none)."),
]
TruncateOpt = Annotated[
    bool, typer.Option("--truncate", help="Truncate over-long examples instead of failing validation.")
]
MetadataOpt = Annotated[
    list[str], typer.Option("--metadata", metavar="KEY=VALUE", help="A label kept with the job (repeatable).")
]
FtServerPathOpt = Annotated[
    bool, typer.Option("--server-path", help="DATA and --validation are paths on the server (not read here).")
]
IdempotencyKeyOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="Repeating the command with the same key returns the first job instead of a new one."),
]
WebhookUrlOpt = Annotated[Optional[str], typer.Option(help="URL POSTed the record when it ends.")]  # noqa: UP045
WebhookSecretOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(envvar="GENLOOM_WEBHOOK_SECRET", help="Sign webhook calls with this secret (HMAC-SHA256)."),
]


@dataclass
class JobOptions:
    """The shared job options as parsed; the fields are the command-line options, in the order --help lists them."""

    method: FtMethodOpt = FineTuneMethodChoice.lora
    model: FtModelOpt = ""
    validation: FtValidationOpt = None
    epochs: EpochsOpt = None
    batch_size: BatchSizeOpt = None
    learning_rate: LearningRateOpt = None
    lora_rank: LoraRankOpt = None
    suffix: SuffixOpt = ""
    data_format: FormatOpt = None
    task: FtTaskOpt = None
    label: LabelOpt = field(default_factory=list)
    multi_label: MultiLabelOpt = False
    hp: HpOpt = field(default_factory=list)
    validation_split: ValidationSplitOpt = None
    truncate: TruncateOpt = False
    metadata: MetadataOpt = field(default_factory=list)
    server_path: FtServerPathOpt = False
    idempotency_key: IdempotencyKeyOpt = None
    webhook_url: WebhookUrlOpt = None
    webhook_secret: WebhookSecretOpt = None

    def hyperparameters(self) -> dict[str, Any]:
        """--hp NAME=VALUE pairs, then the named options (--epochs, ...) that were given."""
        named = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "lora_rank": self.lora_rank,
        }
        values: dict[str, Any] = {}
        try:
            for name, text in key_values(self.hp, "--hp"):
                values[name] = parse_hyperparameter(name, text)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--hp") from None
        values.update({name: value for name, value in named.items() if value is not None})
        return values

    def spec(self, data: str) -> FineTuneSpec:
        """The job spec DATA and the options describe; usage errors for what the SDK rejects before sending."""
        hyperparameters = self.hyperparameters()
        labels, multi_label, task = self.label, self.multi_label, self.task
        if (labels or multi_label) and (task is None or task.value != "classify"):
            raise typer.BadParameter("--label and --multi-label are for --task classify")
        validation, server_path = self.validation, self.server_path
        for path, option in ((data, "DATA.jsonl"), (validation, "--validation")):
            if path is not None and not server_path and not Path(path).is_file():
                raise typer.BadParameter(
                    f"no file {path} (for a path on the server, add --server-path)", param_hint=option
                )
        try:
            return FineTuneSpec(
                training_file=data if server_path else Path(data),
                model=self.model,
                method=self.method.value,
                validation_file=(validation if server_path else Path(validation)) if validation is not None else None,
                data_format=self.data_format.value if self.data_format else None,
                task=task.value if task else None,
                task_options={"labels": list(labels), "multi_label": multi_label} if labels or multi_label else None,
                hyperparameters=hyperparameters or None,
                suffix=self.suffix,
                validation_split=self.validation_split,
                truncate_long_examples=self.truncate,
                metadata=dict(key_values(self.metadata, "--metadata")) or None,
                send_path=server_path,
            )
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None


def _option_parameters() -> list[inspect.Parameter]:
    """JobOptions' fields as the parameters typer reads options from (annotation and default of each)."""
    hints = typing.get_type_hints(JobOptions, include_extras=True)
    defaults = JobOptions()
    return [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name], default=getattr(defaults, f.name)
        )
        for f in dataclasses.fields(JobOptions)
    ]


def job_options(command: Callable[..., None]) -> Callable[..., None]:
    """Declare the shared job options on `command` where its JobOptions parameter stands (its other options keep
    their places), and call it with them gathered into that parameter."""
    declared = inspect.signature(command, eval_str=True)
    shared = _option_parameters()
    parameters: list[inspect.Parameter] = []
    for parameter in declared.parameters.values():
        if parameter.annotation is JobOptions:
            parameters += shared
        else:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    names = [p.name for p in shared]
    (gathered,) = [p.name for p in declared.parameters.values() if p.annotation is JobOptions]

    @functools.wraps(command)
    def with_job_options(**values: Any) -> None:
        values[gathered] = JobOptions(**{name: values.pop(name) for name in names})
        command(**values)

    # typer reads a command's options from its signature and annotations: give it the expanded ones.
    with_job_options.__signature__ = declared.replace(parameters=parameters)  # type: ignore[attr-defined]
    with_job_options.__annotations__ = {p.name: p.annotation for p in parameters} | {
        "return": declared.return_annotation
    }
    return with_job_options

"""Inputs and results of the fine-tuning service: jobs, their events and checkpoints, and hyperparameter sweeps.

Enum values are lowercase names without their proto prefix ("running", "cosine", "bf16", "invalid_data"), the
same names `ParameterValue.string_value` takes, so one spelling works for arguments, results and the CLI.
Hyperparameters are a dataclass whose field names are those of the proto's `Hyperparameters`; every place that
takes one also takes a plain mapping of those names, checked here before anything is sent.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Union, cast

from google.protobuf.descriptor import FieldDescriptor

from genloom._exceptions import GenLoomError
from genloom.types.common import ChatMessage
from genloom.types.tasks import (
    SUMMARY_FORMATS,
    TASKS,
    AnswerExample,
    ClassifyExample,
    ClassLabel,
    ClassLabelLike,
    SummarizeExample,
    SummaryFormatName,
    TaskName,
    _name_of,
    enum_value,
)
from genloom.v1 import common_pb2, finetune_pb2, tasks_pb2

JobStateName = Literal["validating", "queued", "running", "succeeded", "failed", "cancelled"]
"""A job's state; the last three are terminal."""
FineTuneMethodName = Literal["lora", "full"]
"""A LoRA adapter on the frozen base model, or all weights."""
DataFormatName = Literal["chat", "prompt_completion", "task_records"]
"""The shape of each JSONL line (see DataFormat in finetune.proto)."""
LrSchedulerName = Literal["linear", "cosine"]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
JobEventLevelName = Literal["info", "warning", "error"]
JobEventTypeName = Literal["message", "metrics", "state_change", "checkpoint"]
JobErrorCodeName = Literal[
    "invalid_data",
    "model_unavailable",
    "worker_lost",
    "out_of_memory",
    "unsupported",
    "internal",
    "all_trials_failed",
]
SweepMethodName = Literal["grid", "bayesian"]
SweepObjectiveName = Literal["validation_loss", "train_loss"]
SweepStateName = Literal["running", "succeeded", "failed", "cancelled"]
SortOrderName = Literal["desc", "asc"]
"""Newest first (the default) or oldest first."""


def _enum_names(descriptor: Any) -> dict[str, Any]:
    """{"cosine": LR_SCHEDULER_COSINE, ...}: each non-zero value's name without the enum's prefix, lowercased.
    Read from the descriptor so the tables cannot drift from the proto."""
    prefix = descriptor.values[0].name.removesuffix("UNSPECIFIED")
    return {v.name.removeprefix(prefix).lower(): v.number for v in descriptor.values if v.number != 0}


JOB_STATES = _enum_names(finetune_pb2.JobState.DESCRIPTOR)
METHODS = _enum_names(finetune_pb2.FineTuneMethod.DESCRIPTOR)
DATA_FORMATS = _enum_names(finetune_pb2.DataFormat.DESCRIPTOR)
EVENT_LEVELS = _enum_names(finetune_pb2.JobEventLevel.DESCRIPTOR)
EVENT_TYPES = _enum_names(finetune_pb2.JobEventType.DESCRIPTOR)
ERROR_CODES = _enum_names(finetune_pb2.JobErrorCode.DESCRIPTOR)
SWEEP_METHODS = _enum_names(finetune_pb2.SweepMethod.DESCRIPTOR)
SWEEP_OBJECTIVES = _enum_names(finetune_pb2.SweepObjective.DESCRIPTOR)
SWEEP_STATES = _enum_names(finetune_pb2.SweepState.DESCRIPTOR)
SORT_ORDERS: dict[str, Any] = {"desc": common_pb2.SORT_ORDER_DESCENDING, "asc": common_pb2.SORT_ORDER_ASCENDING}

TERMINAL_JOB_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
"""States a job never leaves."""
TERMINAL_SWEEP_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
"""States a sweep never leaves."""


def _name(table: Mapping[str, Any], number: int, default: Any = "unspecified") -> Any:
    """The name of `number` in `table`; `default` for 0 or a value newer than this SDK."""
    return next((name for name, value in table.items() if value == number), default)


def _optional_name(table: Mapping[str, Any], number: int) -> Any:
    return _name(table, number, default=None) if number else None


def _time(pb: Any, name: str) -> datetime | None:
    """A Timestamp field as an aware UTC datetime; None when unset."""
    return getattr(pb, name).ToDatetime(tzinfo=timezone.utc) if pb.HasField(name) else None


def _optional(pb: Any, name: str) -> Any:
    return getattr(pb, name) if pb.HasField(name) else None


def _states(table: Mapping[str, Any], states: str | Iterable[str] | None, what: str) -> list[Any]:
    """A state filter: one name or several."""
    if states is None:
        return []
    names = [states] if isinstance(states, str) else list(states)
    return [enum_value(table, name, what) for name in names]


# --- hyperparameters -----------------------------------------------------------------------------------------------

_HP_FIELDS: dict[str, Any] = {f.name: f for f in finetune_pb2.Hyperparameters.DESCRIPTOR.fields}
_UNSIGNED = (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64)


def hyperparameter_names() -> list[str]:
    """Every hyperparameter's name, in proto order (the keys `hyperparameters=` and sweeps accept)."""
    return list(_HP_FIELDS)


def _hp_field(name: Any) -> Any:
    """The descriptor of hyperparameter `name`, or a ValueError that suggests the closest name."""
    descriptor = _HP_FIELDS.get(name) if isinstance(name, str) else None
    if descriptor is None:
        close = difflib.get_close_matches(str(name), _HP_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown hyperparameter {name!r}{hint}; known: {', '.join(_HP_FIELDS)}")
    return descriptor


def _hp_kind(descriptor: Any) -> str:
    """What Python value a hyperparameter takes: "int", "float", "bool", "enum" or "list"."""
    if descriptor.is_repeated:
        return "list"
    if descriptor.type == FieldDescriptor.TYPE_BOOL:
        return "bool"
    if descriptor.type == FieldDescriptor.TYPE_ENUM:
        return "enum"
    if descriptor.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return "float"
    return "int"


def check_hyperparameter(name: str, value: Any) -> Any:
    """`value` checked and normalized for hyperparameter `name` (enum names lowercased, lists as tuples, ints
    as floats for real-valued ones), or a ValueError naming the hyperparameter. Ranges are the server's to check:
    some limits are server settings."""
    descriptor = _hp_field(name)
    kind = _hp_kind(descriptor)
    where = f"hyperparameters.{name}"
    if kind == "list":
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: expected a list of strings, not {value!r}")
        return tuple(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected True or False, not {value!r}")
        return value
    if kind == "enum":
        names = _enum_names(descriptor.enum_type)
        if not isinstance(value, str) or value.lower() not in names:
            raise ValueError(f"{where}: expected one of {', '.join(repr(n) for n in names)}, not {value!r}")
        return value.lower()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: expected a number, not {value!r}")
    if kind == "float":
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, not {value!r}")
        return float(value)
    if not isinstance(value, int):
        raise ValueError(f"{where}: expected a whole number, not {value!r}")
    if descriptor.type in _UNSIGNED and value < 0:
        raise ValueError(f"{where}: must be 0 or more, not {value}")
    return value


def parse_hyperparameter(name: str, text: str) -> Any:
    """Parse a hyperparameter's value from text (the CLI's `--hp name=value`), by the hyperparameter's kind:
    lists are comma-separated, booleans true/false (or 1/0, yes/no)."""
    kind = _hp_kind(_hp_field(name))
    text = text.strip()
    value: Any = text
    if kind == "list":
        value = [item.strip() for item in text.split(",") if item.strip()]
    elif kind == "bool":
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"hyperparameters.{name}: expected true or false, not {text!r}")
        value = lowered in ("true", "1", "yes")
    elif kind == "int":
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"hyperparameters.{name}: expected a whole number, not {text!r}") from None
    elif kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"hyperparameters.{name}: expected a number, not {text!r}") from None
    return check_hyperparameter(name, value)


@dataclass(frozen=True)
class Hyperparameters:
    """Training hyperparameters. None = unset: the server's default applies (in a job record every field shows
    the effective value). Enum values are names: lr_scheduler "linear"/"cosine", precision
    "auto"/"fp32"/"bf16"/"fp16". Limits are in finetune.proto; values out of range are an InvalidArgumentError."""

    epochs: int | None = None
    """Passes over the training data (default 3). Ignored when max_steps is set."""
    batch_size: int | None = None
    """Examples per device per micro-step (default 8)."""
    gradient_accumulation_steps: int | None = None
    """Micro-steps per optimizer step (default 1)."""
    learning_rate: float | None = None
    """Peak AdamW learning rate (default 2e-4 for LoRA, 2e-5 for full)."""
    warmup_ratio: float | None = None
    """Fraction of the optimizer steps spent warming up (default 0.03)."""
    warmup_steps: int | None = None
    """Warmup in optimizer steps; overrides warmup_ratio when above 0."""
    lr_scheduler: LrSchedulerName | None = None
    """Schedule after warmup: "linear" (default) or "cosine"."""
    weight_decay: float | None = None
    """AdamW decoupled weight decay (default 0)."""
    dropout: float | None = None
    """Dropout set on the model's dropout layers (default: the model's own)."""
    max_seq_length: int | None = None
    """Longest training example in tokens (default min(1024, context window))."""
    seed: int | None = None
    """Seed for shuffling, initialisation and dropout (default 42)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement (default 0: never)."""
    early_stopping_threshold: float | None = None
    """Least decrease of validation loss that counts as improvement (default 0)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory (default False)."""
    precision: PrecisionName | None = None
    """"auto" (default: bf16 where supported), "fp32", "bf16" or "fp16"."""
    lora_rank: int | None = None
    """LoRA rank r (default 8). LoRA only."""
    lora_alpha: float | None = None
    """LoRA alpha (default 2 x lora_rank). LoRA only."""
    lora_dropout: float | None = None
    """Dropout on the LoRA path (default 0.05). LoRA only."""
    lora_target_modules: Sequence[str] | None = None
    """Modules to adapt, e.g. ("q_proj", "v_proj"), or ("all-linear",); stored as a tuple. LoRA only."""
    checkpoint_interval_steps: int | None = None
    """Save a checkpoint every N optimizer steps (default: the server's, 100)."""
    eval_interval_steps: int | None = None
    """Evaluate validation loss every N optimizer steps (default: at every checkpoint)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, overriding epochs (default 0: no limit)."""
    logging_interval_steps: int | None = None
    """Emit a metrics event every N optimizer steps (default 1)."""
    max_checkpoints: int | None = None
    """Keep only the newest N checkpoints (default 3)."""
    max_grad_norm: float | None = None
    """Clip gradients to this global L2 norm (default 1.0; 0 = no clipping)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, check_hyperparameter(f.name, value))

    @classmethod
    def coerce(cls, value: HyperparametersLike) -> Hyperparameters:
        """Accept Hyperparameters or a mapping of hyperparameter names to values (unknown names are a ValueError
        that suggests the closest one)."""
        if isinstance(value, Hyperparameters):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"hyperparameters must be a mapping or Hyperparameters, not {type(value).__name__}")
        for name in value:
            _hp_field(name)
        return cls(**value)

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set (not None), in proto order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_pb(self) -> finetune_pb2.Hyperparameters:
        pb = finetune_pb2.Hyperparameters()
        for name, value in self.as_dict().items():
            descriptor = _HP_FIELDS[name]
            kind = _hp_kind(descriptor)
            if kind == "list":
                getattr(pb, name).extend(value)
            elif kind == "enum":
                setattr(pb, name, _enum_names(descriptor.enum_type)[value])
            else:
                setattr(pb, name, value)
        return pb

    @classmethod
    def from_pb(cls, pb: finetune_pb2.Hyperparameters) -> Hyperparameters:
        values: dict[str, Any] = {}
        for name, descriptor in _HP_FIELDS.items():
            kind = _hp_kind(descriptor)
            if kind == "list":
                values[name] = tuple(getattr(pb, name))
            elif kind == "enum":
                values[name] = _optional_name(_enum_names(descriptor.enum_type), getattr(pb, name))
            elif descriptor.has_presence:
                values[name] = _optional(pb, name)
            else:
                values[name] = getattr(pb, name)
        return cls(**values)


HyperparametersLike = Union[Hyperparameters, Mapping[str, Any]]  # noqa: UP007 - a runtime alias, valid on 3.10
"""Hyperparameters, or a mapping such as {"learning_rate": 1e-4, "lr_scheduler": "cosine", "precision": "bf16"}."""


# --- search spaces -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloatRange:
    """A real interval to search, e.g. FloatRange(1e-5, 1e-3, log=True) for a learning rate."""

    min: float
    """Lower bound, inclusive."""
    max: float
    """Upper bound, inclusive; greater than min."""
    log: bool = False
    """Sample (bayesian) or space grid points (grid) on a log scale; min must then be above 0."""
    grid_points: int = 0
    """Grid only: evenly spaced points from min to max, both included (0 = the server's default, 3)."""

    def __post_init__(self) -> None:
        if not self.min < self.max:
            raise ValueError(f"FloatRange: min ({self.min}) must be less than max ({self.max})")
        if self.log and self.min <= 0:
            raise ValueError("FloatRange: a log-scale range needs min > 0")
        if self.grid_points < 0:
            raise ValueError("FloatRange: grid_points must be 0 or more")

    def to_pb(self) -> finetune_pb2.FloatRange:
        return finetune_pb2.FloatRange(min=self.min, max=self.max, log=self.log, grid_points=self.grid_points)


@dataclass(frozen=True)
class IntRange:
    """An integer interval to search, e.g. IntRange(4, 16, step=4) for lora_rank 4, 8, 12, 16."""

    min: int
    """Lower bound, inclusive."""
    max: int
    """Upper bound, inclusive; at least min."""
    step: int = 1
    """Distance between the values a grid tries (min, min+step, ... up to max)."""
    log: bool = False
    """Bayesian only: sample on a log scale (step must then be 1, min at least 1)."""

    def __post_init__(self) -> None:
        if self.min > self.max:
            raise ValueError(f"IntRange: min ({self.min}) must not exceed max ({self.max})")
        if self.step < 1:
            raise ValueError("IntRange: step must be 1 or more")
        if self.log and (self.min < 1 or self.step != 1):
            raise ValueError("IntRange: a log-scale range needs min >= 1 and step 1")

    def to_pb(self) -> finetune_pb2.IntRange:
        return finetune_pb2.IntRange(min=self.min, max=self.max, log=self.log, step=self.step)


SearchSpaceLike = Union[FloatRange, IntRange, range, Sequence[Any], tuple[float, float]]  # noqa: UP007
"""One dimension of a sweep's search space:

- a list of values: tried in order (a choice), e.g. [1e-4, 3e-4], ["linear", "cosine"], [["q_proj"], "all-linear"];
- FloatRange(min, max, log=, grid_points=) or IntRange(min, max, step=, log=);
- range(4, 17, 4): the integers it yields (IntRange(4, 16, step=4));
- a (min, max) tuple of two numbers: IntRange(min, max) when both are ints, else FloatRange(min, max).
"""


def _parameter_value(name: str, value: Any) -> finetune_pb2.ParameterValue:
    checked = check_hyperparameter(name, value)
    kind = _hp_kind(_HP_FIELDS[name])
    if kind == "list":
        return finetune_pb2.ParameterValue(string_list=finetune_pb2.StringList(values=list(checked)))
    if kind == "bool":
        return finetune_pb2.ParameterValue(bool_value=checked)
    if kind == "enum":
        return finetune_pb2.ParameterValue(string_value=checked)
    if kind == "float":
        return finetune_pb2.ParameterValue(float_value=checked)
    return finetune_pb2.ParameterValue(int_value=checked)


def parameter_value_from_pb(pb: finetune_pb2.ParameterValue) -> Any:
    """A ParameterValue as a Python value (a list of strings for string_list; None when unset)."""
    kind = pb.WhichOneof("value")
    if kind == "string_list":
        return list(pb.string_list.values)
    return getattr(pb, kind) if kind else None


def search_dimension_to_pb(name: str, space: SearchSpaceLike) -> finetune_pb2.SearchDimension:
    """One SearchDimension; names and value kinds are checked against the hyperparameters here."""
    kind = _hp_kind(_hp_field(name))
    where = f"search_space[{name!r}]"
    if isinstance(space, range):
        if len(space) == 0 or space.step < 1:
            raise ValueError(f"{where}: the range is empty or decreasing")
        space = IntRange(space[0], space[-1], step=space.step)
    elif isinstance(space, tuple):
        numbers = len(space) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in space)
        if not numbers:
            raise ValueError(f"{where}: a tuple is a (min, max) range of two numbers; use a list for a choice")
        low, high = space
        space = IntRange(low, high) if isinstance(low, int) and isinstance(high, int) else FloatRange(low, high)
    if isinstance(space, FloatRange | IntRange):
        if kind not in ("int", "float"):
            raise ValueError(f"{where}: a range needs a numeric hyperparameter; give a list of values")
        if isinstance(space, FloatRange):
            if kind != "float":
                raise ValueError(f"{where}: {name} takes whole numbers; use IntRange")
            return finetune_pb2.SearchDimension(name=name, float_range=space.to_pb())
        return finetune_pb2.SearchDimension(name=name, int_range=space.to_pb())
    if isinstance(space, str) or not isinstance(space, Sequence):
        raise ValueError(
            f"{where}: give a list of values to try, a range, FloatRange or IntRange (a single value belongs in "
            "hyperparameters)"
        )
    if not space:
        raise ValueError(f"{where}: the list of values is empty")
    values = [_parameter_value(name, v) for v in space]
    return finetune_pb2.SearchDimension(name=name, choice=finetune_pb2.ChoiceSpace(values=values))


def search_space_to_pb(space: Mapping[str, SearchSpaceLike]) -> list[finetune_pb2.SearchDimension]:
    if not isinstance(space, Mapping) or not space:
        raise ValueError("search_space must be a non-empty mapping of hyperparameter names to values or ranges")
    return [search_dimension_to_pb(name, values) for name, values in space.items()]


def _search_dimension_from_pb(pb: finetune_pb2.SearchDimension) -> Any:
    kind = pb.WhichOneof("space")
    if kind == "float_range":
        r = pb.float_range
        return FloatRange(r.min, r.max, r.log, r.grid_points) if r.min < r.max else [r.min]
    if kind == "int_range":
        i = pb.int_range
        return IntRange(i.min, i.max, i.step or 1, i.log) if i.min <= i.max else [i.min]
    return [parameter_value_from_pb(v) for v in pb.choice.values]


# --- job inputs ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskOptions:
    """The task prompt options task records are rendered with (DATA_FORMAT_TASK_RECORDS). Serve the result with
    the same options to get the same prompt."""

    labels: Sequence[ClassLabelLike] | Mapping[str, str] = ()
    """Classify: the labels (names, ClassLabels, (name, description) pairs or one {name: description} mapping);
    empty = the distinct labels of the data. Stored as a tuple of ClassLabel."""
    multi_label: bool = False
    """Classify: several labels per text."""
    target_words: int | None = None
    """Summarize: about this many words."""
    target_sentences: int | None = None
    """Summarize: about this many sentences (not with target_words)."""
    format: SummaryFormatName | None = None
    """Summarize: "prose" (default) or "bullets"."""
    allow_unanswerable: bool = False
    """Answer: the model may say the question is unanswerable."""
    instruction: str = ""
    """Replaces the built-in task instruction ("" = the built-in one)."""

    def __post_init__(self) -> None:
        labels = self.labels
        if isinstance(labels, str):
            raise TypeError(f"labels must be a list of labels, not a str (did you mean {labels.split(',')!r}?)")
        if isinstance(labels, Mapping):
            coerced = tuple(ClassLabel(name, description) for name, description in labels.items())
        else:
            coerced = tuple(ClassLabel.coerce(label) for label in labels)
        object.__setattr__(self, "labels", coerced)
        if self.target_words is not None and self.target_sentences is not None:
            raise ValueError("give target_words or target_sentences, not both")
        enum_value(SUMMARY_FORMATS, self.format, "format")

    @classmethod
    def coerce(cls, value: TaskOptions | Mapping[str, Any]) -> TaskOptions:
        """Accept TaskOptions or a mapping of its fields."""
        if isinstance(value, TaskOptions):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"task_options must be a mapping or TaskOptions, not {type(value).__name__}")
        return cls(**value)

    def to_pb(self) -> tasks_pb2.TaskPromptOptions:
        pb = tasks_pb2.TaskPromptOptions(
            labels=[ClassLabel.coerce(label).to_pb() for label in self.labels],
            multi_label=self.multi_label,
            format=enum_value(SUMMARY_FORMATS, self.format, "format"),
            allow_unanswerable=self.allow_unanswerable,
            instruction=self.instruction,
        )
        if self.target_words is not None:
            pb.target_length.CopyFrom(
                tasks_pb2.SummaryLength(unit=tasks_pb2.SUMMARY_LENGTH_UNIT_WORDS, value=self.target_words)
            )
        elif self.target_sentences is not None:
            pb.target_length.CopyFrom(
                tasks_pb2.SummaryLength(unit=tasks_pb2.SUMMARY_LENGTH_UNIT_SENTENCES, value=self.target_sentences)
            )
        return pb

    @classmethod
    def from_pb(cls, pb: tasks_pb2.TaskPromptOptions) -> TaskOptions:
        length = pb.target_length if pb.HasField("target_length") else None
        words = length.value if length and length.unit == tasks_pb2.SUMMARY_LENGTH_UNIT_WORDS else None
        sentences = length.value if length and length.unit == tasks_pb2.SUMMARY_LENGTH_UNIT_SENTENCES else None
        return cls(
            labels=tuple(ClassLabel.from_pb(label) for label in pb.labels),
            multi_label=pb.multi_label,
            target_words=words,
            target_sentences=sentences,
            format=_name_of(SUMMARY_FORMATS, pb.format),
            allow_unanswerable=pb.allow_unanswerable,
            instruction=pb.instruction,
        )


TrainingRecord = Union[Mapping[str, Any], ClassifyExample, SummarizeExample, AnswerExample, Sequence[Any]]  # noqa: UP007
"""One line of training data: a JSON object (mapping); a task example (ClassifyExample, SummarizeExample,
AnswerExample: written as a task record); or a conversation, a list of ChatMessage or {"role", "content"} (written
as {"messages": [...]})."""
TrainingFile = Union[str, os.PathLike[str], bytes, Sequence[TrainingRecord]]  # noqa: UP007
"""Training or validation data: a local JSONL file's path (read here and sent inline; with send_path=True the
path is sent for the server to read instead), the JSONL bytes themselves, or a list of records."""


def _record_to_json(record: Any) -> Any:
    if isinstance(record, Mapping):
        return dict(record)
    if isinstance(record, ClassifyExample):
        labels = list(record.labels)
        return (
            {"text": record.text, "label": labels[0]} if len(labels) == 1 else {"text": record.text, "labels": labels}
        )
    if isinstance(record, SummarizeExample):
        return {"document": record.document, "summary": record.summary}
    if isinstance(record, AnswerExample):
        out: dict[str, Any] = {"question": record.question}
        if record.context:
            out["context"] = record.context
        if record.unanswerable:
            out["unanswerable"] = True
        else:
            out["answer"] = record.answer
        return out
    if isinstance(record, Sequence) and not isinstance(record, str | bytes):
        messages = []
        for message in record:
            if isinstance(message, ChatMessage):
                messages.append({"role": message.role, "content": message.content})
            elif isinstance(message, Mapping):
                messages.append(dict(message))
            else:
                raise TypeError(f"a chat message is a ChatMessage or a mapping, not {type(message).__name__}")
        return {"messages": messages}
    raise TypeError(
        "a training record is a mapping, a task example or a list of chat messages, not " + type(record).__name__
    )


def records_to_jsonl(records: Iterable[TrainingRecord]) -> bytes:
    """JSONL bytes, one record per line (see `TrainingRecord` for the accepted forms)."""
    lines = []
    for index, record in enumerate(records):
        try:
            lines.append(json.dumps(_record_to_json(record), ensure_ascii=False))
        except (TypeError, ValueError) as err:
            raise type(err)(f"record {index}: {err}") from None
    if not lines:
        raise ValueError("the list of training records is empty")
    return ("\n".join(lines) + "\n").encode("utf-8")


# How job records name data that was sent inline (upload:<job-or-sweep-id>/<name>.jsonl).
UPLOAD_PREFIX = "upload:"


def training_data_to_pb(data: TrainingFile, *, send_path: bool, what: str) -> finetune_pb2.TrainingDataSource:
    """A TrainingDataSource: bytes and records inline; a path read here and sent inline, or sent as a path."""
    if isinstance(data, bytes | bytearray | memoryview):
        if send_path:
            raise ValueError(f"{what}: send_path=True needs a path, not bytes")
        return finetune_pb2.TrainingDataSource(jsonl=bytes(data))
    if isinstance(data, str | os.PathLike):
        path = os.fspath(data)
        if send_path:
            if path.startswith(UPLOAD_PREFIX):
                # A job record's name for data that was sent inline: servers keep it private to that job.
                raise ValueError(
                    f"{what}: {path[:80]!r} is data uploaded with another job, which only that job may read; "
                    "pass the data itself again (a local file, bytes or records)"
                )
            return finetune_pb2.TrainingDataSource(path=path)
        try:
            return finetune_pb2.TrainingDataSource(jsonl=Path(path).read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{what}: no local file {path!r} (for a file on the server, pass send_path=True)"
            ) from None
    if send_path:
        raise ValueError(f"{what}: send_path=True needs a path, not records")
    if not isinstance(data, Sequence):
        raise TypeError(f"{what}: expected a path, bytes or a list of records, not {type(data).__name__}")
    return finetune_pb2.TrainingDataSource(jsonl=records_to_jsonl(cast(Sequence[TrainingRecord], data)))


def _training_data_from_pb(pb: finetune_pb2.TrainingDataSource) -> str | bytes | None:
    kind = pb.WhichOneof("source")
    if kind == "path":
        return pb.path
    if kind == "jsonl":
        return pb.jsonl
    return None


@dataclass(frozen=True)
class FineTuneSpec:
    """What to train: everything about a job except how it is submitted. `client.finetune.create()` builds one
    from its arguments; a sweep takes one as its `base_job` (or a mapping of these fields); a job record's
    `spec` is one too, with defaults filled in and inline data replaced by the server's stored path (so
    `sweeps.create(job.spec, ...)` reuses that data)."""

    training_file: TrainingFile
    """The training data (see `TrainingFile`); in records, the path the server stored it at."""
    model: str = ""
    """Base model name or a model directory the workers can read ("" = the server's default)."""
    method: FineTuneMethodName = "lora"
    """"lora" (an adapter on the frozen model) or "full" (all weights)."""
    validation_file: TrainingFile | None = None
    """Validation data, same format; None = hold out validation_split of the training data."""
    data_format: DataFormatName | None = None
    """"chat", "prompt_completion" or "task_records"; None = detected from the first line ("task_records" when
    `task` is set)."""
    task: TaskName | None = None
    """For task records: "classify", "summarize" or "answer"."""
    task_options: TaskOptions | Mapping[str, Any] | None = None
    """For task records: the prompt options (labels, ...), a TaskOptions or a mapping of its fields."""
    hyperparameters: HyperparametersLike | None = None
    """Hyperparameters or a mapping of their names; None = all defaults. Stored as Hyperparameters."""
    suffix: str = ""
    """Part of the result's name "ft:<base>:<suffix>:<job-id>": up to 40 characters of [A-Za-z0-9._-]."""
    validation_split: float | None = None
    """Without validation data: the fraction of training examples held out (server default 0.1; 0 = none)."""
    truncate_long_examples: bool = False
    """Truncate examples longer than max_seq_length instead of failing validation."""
    metadata: Mapping[str, str] | None = None
    """Free-form labels, returned unchanged (at most 16)."""
    send_path: bool = False
    """Send str/path data as a path for the server to read (inside its data root) instead of reading it here."""

    def __post_init__(self) -> None:
        enum_value(METHODS, self.method, "method")
        if self.data_format is not None:
            enum_value(DATA_FORMATS, self.data_format, "data_format")
        if self.task is not None:
            enum_value(TASKS, self.task, "task")
        if self.hyperparameters is not None:
            object.__setattr__(self, "hyperparameters", Hyperparameters.coerce(self.hyperparameters))
        if self.task_options is not None:
            object.__setattr__(self, "task_options", TaskOptions.coerce(self.task_options))
        if self.metadata is not None:
            object.__setattr__(self, "metadata", dict(self.metadata))

    @classmethod
    def coerce(cls, value: FineTuneSpec | Mapping[str, Any]) -> FineTuneSpec:
        """Accept a FineTuneSpec or a mapping of its fields (the keyword arguments of `finetune.create()`)."""
        if isinstance(value, FineTuneSpec):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"a job spec is a FineTuneSpec or a mapping, not {type(value).__name__}")
        return cls(**value)

    def to_pb(self) -> finetune_pb2.JobSpec:
        if self.data_format == "task_records" and self.task is None:
            raise ValueError("data_format='task_records' needs task ('classify', 'summarize' or 'answer')")
        data_format = self.data_format or ("task_records" if self.task is not None else None)
        pb = finetune_pb2.JobSpec(
            base_model=self.model,
            method=METHODS[self.method],
            training_data=training_data_to_pb(self.training_file, send_path=self.send_path, what="training_file"),
            data_format=DATA_FORMATS[data_format] if data_format else finetune_pb2.DATA_FORMAT_UNSPECIFIED,
            task=TASKS[self.task] if self.task else tasks_pb2.TASK_TYPE_UNSPECIFIED,
            suffix=self.suffix,
            truncate_long_examples=self.truncate_long_examples,
            metadata=dict(self.metadata or {}),
        )
        if self.validation_file is not None:
            pb.validation_data.CopyFrom(
                training_data_to_pb(self.validation_file, send_path=self.send_path, what="validation_file")
            )
        if isinstance(self.task_options, TaskOptions):
            pb.task_options.CopyFrom(self.task_options.to_pb())
        if isinstance(self.hyperparameters, Hyperparameters):
            pb.hyperparameters.CopyFrom(self.hyperparameters.to_pb())
        if self.validation_split is not None:
            pb.validation_split = self.validation_split
        return pb

    @classmethod
    def from_pb(cls, pb: finetune_pb2.JobSpec) -> FineTuneSpec:
        training = _training_data_from_pb(pb.training_data)
        return cls(
            training_file=training if training is not None else b"",
            model=pb.base_model,
            method=_name(METHODS, pb.method, default="lora"),
            validation_file=_training_data_from_pb(pb.validation_data) if pb.HasField("validation_data") else None,
            data_format=_optional_name(DATA_FORMATS, pb.data_format),
            task=_name_of(TASKS, pb.task),
            task_options=TaskOptions.from_pb(pb.task_options) if pb.HasField("task_options") else None,
            hyperparameters=Hyperparameters.from_pb(pb.hyperparameters),
            suffix=pb.suffix,
            validation_split=_optional(pb, "validation_split"),
            truncate_long_examples=pb.truncate_long_examples,
            metadata=dict(pb.metadata),
            send_path=isinstance(training, str),
        )


def webhook_to_pb(url: str | None, secret: str | None) -> finetune_pb2.Webhook | None:
    if url is None:
        if secret is not None:
            raise ValueError("webhook_secret needs webhook_url")
        return None
    return finetune_pb2.Webhook(url=url, secret=secret or "")


# --- results -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineError:
    """A problem on one line of a data file."""

    file: str
    """"training" or "validation"."""
    line: int
    """1-based line number."""
    message: str
    """What is wrong, e.g. "missing key 'completion'"."""

    def __str__(self) -> str:
        return f"{self.file} line {self.line}: {self.message}"


@dataclass(frozen=True)
class JobError:
    """Why a job or sweep failed."""

    code: JobErrorCodeName | Literal["unspecified"]
    """Machine-readable reason: "invalid_data", "model_unavailable", "worker_lost", "out_of_memory",
    "unsupported", "internal" or (sweeps) "all_trials_failed"."""
    message: str
    """Human-readable explanation."""
    line_errors: list[LineError] = field(default_factory=list)
    """For "invalid_data": the offending lines, in file and line order (at most 50)."""

    @classmethod
    def from_pb(cls, pb: finetune_pb2.JobError) -> JobError:
        return cls(
            _name(ERROR_CODES, pb.code), pb.message, [LineError(e.file, e.line, e.message) for e in pb.line_errors]
        )


@dataclass(frozen=True)
class JobMetrics:
    """Training progress at one moment; metrics absent at that moment are None."""

    step: int
    """Optimizer steps completed."""
    total_steps: int
    """Optimizer steps the job will take in total (early stopping may end it sooner)."""
    epoch: float
    """Fractional epoch reached."""
    train_loss: float | None
    """Mean training loss since the previous metrics event."""
    validation_loss: float | None
    """Validation loss, on steps where it was evaluated."""
    learning_rate: float | None
    """Learning rate at this step."""
    tokens_per_second: float | None
    """Training throughput in non-padding tokens per second."""
    grad_norm: float | None
    """Global gradient L2 norm before clipping."""
    trained_tokens: int
    """Non-padding tokens trained on so far."""
    eta_seconds: float | None
    """Estimated seconds to the last step."""

    @property
    def progress(self) -> float:
        """Fraction of the steps done, 0 to 1 (0 while the total is unknown)."""
        return min(self.step / self.total_steps, 1.0) if self.total_steps else 0.0

    @classmethod
    def from_pb(cls, pb: finetune_pb2.JobMetrics) -> JobMetrics:
        return cls(
            step=pb.step,
            total_steps=pb.total_steps,
            epoch=pb.epoch,
            train_loss=_optional(pb, "train_loss"),
            validation_loss=_optional(pb, "validation_loss"),
            learning_rate=_optional(pb, "learning_rate"),
            tokens_per_second=_optional(pb, "tokens_per_second"),
            grad_norm=_optional(pb, "grad_norm"),
            trained_tokens=pb.trained_tokens,
            eta_seconds=_optional(pb, "eta_seconds"),
        )


@dataclass(frozen=True)
class Checkpoint:
    """A saved checkpoint."""

    name: str
    """"checkpoint-<step>"."""
    step: int
    """Optimizer step it was saved at."""
    epoch: float
    """Fractional epoch at that step."""
    train_loss: float | None
    """Training loss at that step."""
    validation_loss: float | None
    """Validation loss at that step, when evaluated there."""
    path: str
    """Its directory in the server's artifact store."""
    created_at: datetime | None
    """When it was saved."""
    size_bytes: int
    """Total size of its files."""

    @classmethod
    def from_pb(cls, pb: finetune_pb2.Checkpoint) -> Checkpoint:
        return cls(
            name=pb.name,
            step=pb.step,
            epoch=pb.epoch,
            train_loss=_optional(pb, "train_loss"),
            validation_loss=_optional(pb, "validation_loss"),
            path=pb.path,
            created_at=_time(pb, "created_at"),
            size_bytes=pb.size_bytes,
        )


@dataclass(frozen=True)
class WebhookInfo:
    """A job's or sweep's webhook (its secret is never returned)."""

    url: str
    """The URL called when it ends."""
    has_secret: bool
    """Whether calls are signed."""


class FineTuneJobFailed(GenLoomError):
    """`FineTuneJob.raise_for_status()` on a failed job: `job` is the record, `error` why it failed."""

    def __init__(self, job: FineTuneJob) -> None:
        self.job = job
        self.error = job.error or JobError("unspecified", "")
        lines = [f"fine-tuning job {job.id} failed ({self.error.code}): {self.error.message}"]
        lines += [f"  {e}" for e in self.error.line_errors[:10]]
        if len(self.error.line_errors) > 10:
            lines.append(f"  ... and {len(self.error.line_errors) - 10} more")
        super().__init__("\n".join(lines))

    @property
    def line_errors(self) -> list[LineError]:
        """For invalid data: the offending lines."""
        return self.error.line_errors


class SweepFailed(GenLoomError):
    """`Sweep.raise_for_status()` on a failed sweep: `sweep` is the record, `error` why it failed."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.error = sweep.error or JobError("unspecified", "")
        super().__init__(f"sweep {sweep.id} failed ({self.error.code}): {self.error.message}")


class WaitTimeoutError(GenLoomError, TimeoutError):
    """`wait()` or `watch()` ran out of time; the job or sweep carries on (cancel it to stop it)."""


@dataclass(frozen=True)
class FineTuneJob:
    """A fine-tuning job's record. Terminal states: "succeeded", "failed", "cancelled" (`is_terminal`); a failed
    job's `error` says why and `raise_for_status()` raises it as FineTuneJobFailed."""

    id: str
    """"ftjob-" followed by a ULID."""
    state: JobStateName | Literal["unspecified"]
    """"validating", "queued", "running", "succeeded", "failed" or "cancelled"."""
    spec: FineTuneSpec
    """What is trained, with defaults filled in (effective hyperparameters, resolved base model, stored data
    paths)."""
    created_at: datetime | None
    """When it was created (aware, UTC, like every timestamp here)."""
    queued_at: datetime | None
    """When it (last) entered the queue."""
    started_at: datetime | None
    """When a worker first started training it."""
    finished_at: datetime | None
    """When it reached a terminal state."""
    updated_at: datetime | None
    """When the record last changed."""
    error: JobError | None
    """Why it failed (state "failed" only)."""
    result_model: str
    """The servable model "ft:<base>:<suffix>:<job-id>" once succeeded: pass it as `model` to inference and
    task calls. "" before."""
    result_path: str
    """The result's directory in the artifact store, once succeeded."""
    trained_tokens: int
    """Non-padding tokens trained on (all epochs)."""
    latest_metrics: JobMetrics | None
    """The latest training progress; None before training started."""
    best_validation_loss: float | None
    """Lowest validation loss so far; None without validation."""
    cancel_requested: bool
    """cancel() was called and the running job has not stopped yet."""
    idempotency_key: str
    """The idempotency key it was created with."""
    webhook: WebhookInfo | None
    """The webhook called when it ends."""
    sweep_id: str
    """The sweep it is a trial of ("" otherwise)."""
    trial_index: int | None
    """Its trial index in that sweep."""
    attempts: int
    """Deliveries to a worker (above 1 after a worker died and it resumed)."""
    resumed_from_step: int
    """Step of the checkpoint the latest attempt resumed from (0: from scratch)."""
    worker: str
    """The worker running or last running it."""
    training_examples: int
    """Training examples after validation (and any hold-out)."""
    validation_examples: int
    """Validation examples."""
    last_event_id: str
    """Id of its newest event: `watch(job.id, after_event_id=job.last_event_id)` follows from here."""
    created: bool | None = None
    """From create(): False when an earlier call with the same idempotency key created it. None elsewhere."""

    @property
    def is_terminal(self) -> bool:
        """Whether it succeeded, failed or was cancelled."""
        return self.state in TERMINAL_JOB_STATES

    @property
    def base_model(self) -> str:
        """The base model (resolved by the server)."""
        return self.spec.model

    @property
    def method(self) -> str:
        """The training method: "lora" or "full"."""
        return self.spec.method

    @property
    def hyperparameters(self) -> Hyperparameters:
        """The effective hyperparameters."""
        hp = self.spec.hyperparameters
        return hp if isinstance(hp, Hyperparameters) else Hyperparameters()

    def raise_for_status(self) -> FineTuneJob:
        """Raise FineTuneJobFailed (with the error's code, message and line errors) if the job failed; else
        return the job, so `client.finetune.wait(id).raise_for_status().result_model` reads naturally."""
        if self.state == "failed":
            raise FineTuneJobFailed(self)
        return self

    @classmethod
    def from_pb(cls, pb: finetune_pb2.Job, created: bool | None = None) -> FineTuneJob:
        return cls(
            id=pb.id,
            state=_name(JOB_STATES, pb.state),
            spec=FineTuneSpec.from_pb(pb.spec),
            created_at=_time(pb, "created_at"),
            queued_at=_time(pb, "queued_at"),
            started_at=_time(pb, "started_at"),
            finished_at=_time(pb, "finished_at"),
            updated_at=_time(pb, "updated_at"),
            error=JobError.from_pb(pb.error) if pb.HasField("error") else None,
            result_model=pb.result_model,
            result_path=pb.result_path,
            trained_tokens=pb.trained_tokens,
            latest_metrics=JobMetrics.from_pb(pb.latest_metrics) if pb.HasField("latest_metrics") else None,
            best_validation_loss=_optional(pb, "best_validation_loss"),
            cancel_requested=pb.cancel_requested,
            idempotency_key=pb.idempotency_key,
            webhook=WebhookInfo(pb.webhook.url, pb.webhook.has_secret) if pb.HasField("webhook") else None,
            sweep_id=pb.sweep_id,
            trial_index=_optional(pb, "trial_index"),
            attempts=pb.attempts,
            resumed_from_step=pb.resumed_from_step,
            worker=pb.worker,
            training_examples=pb.training_examples,
            validation_examples=pb.validation_examples,
            last_event_id=pb.last_event_id,
            created=created,
        )


@dataclass(frozen=True)
class JobEvent:
    """Something that happened to a job. `type` says which of the optional fields are set: "metrics" ->
    `metrics`; "state_change" -> `state` (with `result_model` on success, `error` on failure); "checkpoint" ->
    `checkpoint`; "message" -> only `message`."""

    id: str
    """Unique within the job and increasing; pass the last one received as `after_event_id` to resume."""
    job_id: str
    """The job it belongs to."""
    created_at: datetime | None
    """When it happened."""
    level: JobEventLevelName | Literal["unspecified"]
    """"info", "warning" (e.g. examples truncated, resumed after a worker died) or "error" (the job failed)."""
    type: JobEventTypeName | Literal["unspecified"]
    """"message", "metrics", "state_change" or "checkpoint"."""
    message: str
    """Human-readable description, e.g. "step 40/120 loss 1.234"."""
    state: JobStateName | None
    """state_change: the new state."""
    metrics: JobMetrics | None
    """metrics: the metrics."""
    checkpoint: Checkpoint | None
    """checkpoint: the checkpoint saved."""
    result_model: str
    """The change to "succeeded": the registered model name."""
    error: JobError | None
    """The change to "failed": why."""

    @property
    def is_terminal(self) -> bool:
        """Whether this is the job's last event: its change to a terminal state."""
        return self.type == "state_change" and self.state in TERMINAL_JOB_STATES

    @classmethod
    def from_pb(cls, pb: finetune_pb2.JobEvent) -> JobEvent:
        return cls(
            id=pb.id,
            job_id=pb.job_id,
            created_at=_time(pb, "created_at"),
            level=_name(EVENT_LEVELS, pb.level),
            type=_name(EVENT_TYPES, pb.type),
            message=pb.message,
            state=_optional_name(JOB_STATES, pb.state),
            metrics=JobMetrics.from_pb(pb.metrics) if pb.HasField("metrics") else None,
            checkpoint=Checkpoint.from_pb(pb.checkpoint) if pb.HasField("checkpoint") else None,
            result_model=pb.result_model,
            error=JobError.from_pb(pb.error) if pb.HasField("error") else None,
        )


@dataclass(frozen=True)
class Trial:
    """One trial of a sweep (a job; follow it with `finetune.watch(trial.job_id)`)."""

    index: int
    """0-based trial number, in creation order."""
    job_id: str
    """The trial's job."""
    state: JobStateName | Literal["unspecified"]
    """The job's state."""
    parameters: dict[str, Any]
    """The searched hyperparameters' values for this trial, in search-space order."""
    hyperparameters: Hyperparameters
    """The trial job's full effective hyperparameters."""
    objective_value: float | None
    """The objective (lower is better); None until known."""
    validation_loss: float | None
    """The lowest validation loss."""
    train_loss: float | None
    """The latest training loss."""
    result_model: str
    """The registered model, once succeeded."""
    started_at: datetime | None
    """When its job started running."""
    finished_at: datetime | None
    """When its job ended."""

    @classmethod
    def from_pb(cls, pb: finetune_pb2.Trial) -> Trial:
        return cls(
            index=pb.index,
            job_id=pb.job_id,
            state=_name(JOB_STATES, pb.state),
            parameters={p.name: parameter_value_from_pb(p.value) for p in pb.parameters},
            hyperparameters=Hyperparameters.from_pb(pb.hyperparameters),
            objective_value=_optional(pb, "objective_value"),
            validation_loss=_optional(pb, "validation_loss"),
            train_loss=_optional(pb, "train_loss"),
            result_model=pb.result_model,
            started_at=_time(pb, "started_at"),
            finished_at=_time(pb, "finished_at"),
        )


@dataclass(frozen=True)
class SweepSpec:
    """A sweep's search, with defaults filled in."""

    base_job: FineTuneSpec
    """The job every trial runs before the searched hyperparameters are applied."""
    search_space: dict[str, Any]
    """Each searched hyperparameter's values: a list (choice), FloatRange or IntRange."""
    method: SweepMethodName | Literal["unspecified"]
    """"grid" or "bayesian"."""
    max_trials: int
    """Number of trials."""
    parallelism: int
    """Trials queued or running at once."""
    objective: SweepObjectiveName | Literal["unspecified"]
    """"validation_loss" or "train_loss" (minimized)."""
    seed: int
    """Seed of the Bayesian sampler."""

    @classmethod
    def from_pb(cls, pb: finetune_pb2.SweepSpec) -> SweepSpec:
        return cls(
            base_job=FineTuneSpec.from_pb(pb.base_job),
            search_space={d.name: _search_dimension_from_pb(d) for d in pb.search_space},
            method=_name(SWEEP_METHODS, pb.method),
            max_trials=pb.max_trials,
            parallelism=pb.parallelism,
            objective=_name(SWEEP_OBJECTIVES, pb.objective),
            seed=pb.seed,
        )


@dataclass(frozen=True)
class Sweep:
    """A hyperparameter sweep's record: its trials and the best one so far."""

    id: str
    """"ftsweep-" followed by a ULID."""
    state: SweepStateName | Literal["unspecified"]
    """"running", "succeeded", "failed" or "cancelled"."""
    spec: SweepSpec
    """The search, with defaults filled in."""
    trials: list[Trial]
    """Trials created so far, by index."""
    best_trial: Trial | None
    """The succeeded trial with the lowest objective so far; None before one succeeded."""
    created_at: datetime | None
    """When it was created."""
    finished_at: datetime | None
    """When it reached a terminal state."""
    updated_at: datetime | None
    """When the record last changed."""
    error: JobError | None
    """Why it failed (state "failed" only)."""
    cancel_requested: bool
    """cancel() was called and trials are still stopping."""
    idempotency_key: str
    """The idempotency key it was created with."""
    webhook: WebhookInfo | None
    """The webhook called when it ends."""
    created: bool | None = None
    """From create(): False when an earlier call with the same idempotency key created it. None elsewhere."""

    @property
    def is_terminal(self) -> bool:
        """Whether it succeeded, failed or was cancelled."""
        return self.state in TERMINAL_SWEEP_STATES

    def raise_for_status(self) -> Sweep:
        """Raise SweepFailed if the sweep failed; else return it."""
        if self.state == "failed":
            raise SweepFailed(self)
        return self

    @classmethod
    def from_pb(cls, pb: finetune_pb2.Sweep, created: bool | None = None) -> Sweep:
        return cls(
            id=pb.id,
            state=_name(SWEEP_STATES, pb.state),
            spec=SweepSpec.from_pb(pb.spec),
            trials=[Trial.from_pb(t) for t in pb.trials],
            best_trial=Trial.from_pb(pb.best_trial) if pb.HasField("best_trial") else None,
            created_at=_time(pb, "created_at"),
            finished_at=_time(pb, "finished_at"),
            updated_at=_time(pb, "updated_at"),
            error=JobError.from_pb(pb.error) if pb.HasField("error") else None,
            cancel_requested=pb.cancel_requested,
            idempotency_key=pb.idempotency_key,
            webhook=WebhookInfo(pb.webhook.url, pb.webhook.has_secret) if pb.HasField("webhook") else None,
            created=created,
        )

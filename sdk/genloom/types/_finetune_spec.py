"""What a fine-tuning job trains: `FineTuneSpec`, the task prompt options of task records, and the webhook.

`client.finetune.create()` and sweeps build a FineTuneSpec; job records carry one. `genloom.types.finetune`
re-exports the public names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from genloom.types._finetune_enums import (
    DATA_FORMATS,
    METHODS,
    DataFormatName,
    FineTuneMethodName,
    _name,
    _optional,
    _optional_name,
)
from genloom.types._hyperparameters import Hyperparameters, HyperparametersLike
from genloom.types._task_inputs import (
    SUMMARY_FORMATS,
    TASKS,
    ClassLabel,
    ClassLabelLike,
    SummaryFormatName,
    TaskName,
    _name_of,
    enum_value,
)
from genloom.types._training_data import TrainingFile, _training_data_from_pb, training_data_to_pb
from genloom.v1 import finetune_pb2, tasks_pb2


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

"""Synchronous checks and defaults of fine-tuning requests.

CreateJob and CreateSweep check everything that needs neither a model nor a data file here, before anything is
stored: every violation is collected with its full field path ("spec.hyperparameters.learning_rate",
"webhook.url") and reported at once as one INVALID_ARGUMENT, so a client fixes its request in one round trip.
The limits and defaults are the ones the field comments of protos/genloom/v1/finetune.proto promise.

Early stopping and checkpoints: the result of an early-stopped job is its best checkpoint, so the best evaluation
must have been saved. The rule chosen here: with early stopping on, eval_interval_steps must be a multiple of the
(effective) checkpoint_interval_steps, so every evaluation falls on a step where a checkpoint is saved. The default
(evaluate at every checkpoint) satisfies it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from genloom.services.finetune import webhooks
from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.server.errors import FieldViolation, InvalidArgument
from genloom.services.server.paths import MAX_PATH_LENGTH
from genloom.services.tasks.settings import TasksSettings
from genloom.services.tasks.validation import MAX_INSTRUCTION
from genloom.services.tasks.validation import Checks as TaskChecks
from genloom.v1 import finetune_pb2, tasks_pb2

UINT32_MAX = 2**32 - 1
MAX_SUFFIX = 40
SUFFIX = re.compile(rf"[A-Za-z0-9._-]{{0,{MAX_SUFFIX}}}")
MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_URL = 2048
MAX_SECRET_BYTES = 256
MAX_IDEMPOTENCY_KEY = 128
MAX_VALIDATION_SPLIT = 0.5
MAX_TARGET_MODULES = 64
MAX_MODULE_NAME = 128
MIN_SEQ_LENGTH = 16
ALL_LINEAR = "all-linear"
# Module names as PEFT matches them: a name ("q_proj") or a dotted path suffix ("self_attn.q_proj").
MODULE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Fields that configure the LoRA adapter; with FINE_TUNE_METHOD_FULL they would be silently ignored.
LORA_ONLY = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")

DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 8
DEFAULT_GRADIENT_ACCUMULATION = 1
DEFAULT_LORA_LEARNING_RATE = 2e-4
DEFAULT_FULL_LEARNING_RATE = 2e-5
DEFAULT_WARMUP_RATIO = 0.03
DEFAULT_MAX_SEQ_LENGTH = 1024
DEFAULT_SEED = 42
DEFAULT_LORA_RANK = 8
DEFAULT_LORA_DROPOUT = 0.05
DEFAULT_LOGGING_INTERVAL = 1
DEFAULT_MAX_CHECKPOINTS = 3
DEFAULT_MAX_GRAD_NORM = 1.0
DEFAULT_VALIDATION_SPLIT = 0.1

# Hyperparameters field name -> its descriptor. (protobuf's stubs type a message's descriptors as those of either
# implementation, pure-Python or upb, which share this API: the cast picks one.)
HYPERPARAMETER_FIELDS: dict[str, FieldDescriptor] = {
    f.name: cast(FieldDescriptor, f) for f in finetune_pb2.Hyperparameters.DESCRIPTOR.fields
}


def _number(value: float) -> str:
    """A limit or value as people write it: 100, not 100.0; 0.0002, not 0.00020000000000000001."""
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}"


@dataclass(frozen=True)
class Bounds:
    """The values a numeric hyperparameter accepts."""

    low: float
    high: float
    # `low` itself is excluded ("greater than 0").
    low_open: bool = False
    # 0 means "take the default": accepted as a value even when below `low`, but never inside a range, where it
    # would mix defaults with real values.
    zero_is_default: bool = False

    def describe(self, *, with_default: bool = True) -> str:
        """The limits in words; `with_default=False` for range ends, where 0 is not "the default"."""
        if self.low_open:
            text = f"greater than {_number(self.low)} and at most {_number(self.high)}"
        elif math.isinf(self.high):
            text = f"{_number(self.low)} or more"
        else:
            text = f"{_number(self.low)} to {_number(self.high)}"
        return text + (" (or 0 for the default)" if self.zero_is_default and with_default else "")

    def contains(self, value: float) -> bool:
        """Whether `value` is a real (non-default) value in range."""
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def problem(self, value: float) -> str | None:
        """Why `value` cannot be set, or None when it can."""
        if not math.isfinite(value):
            return f"{value} is not a finite number"
        if (self.zero_is_default and value == 0) or self.contains(value):
            return None
        return f"{_number(value)} is out of range: must be {self.describe()}"


def hyperparameter_bounds(settings: FinetuneSettings) -> dict[str, Bounds]:
    """Bounds of every numeric Hyperparameters field (as finetune.proto documents them)."""
    u32 = float(UINT32_MAX)
    return {
        "epochs": Bounds(1, 100, zero_is_default=True),
        "batch_size": Bounds(1, 1024, zero_is_default=True),
        "gradient_accumulation_steps": Bounds(1, 1024, zero_is_default=True),
        "learning_rate": Bounds(0, 1, low_open=True, zero_is_default=True),
        "warmup_ratio": Bounds(0, 0.5),
        "warmup_steps": Bounds(0, u32),
        "weight_decay": Bounds(0, 1),
        "dropout": Bounds(0, 0.9),
        # The upper limit is the base model's context window, checked by effective_hyperparameters.
        "max_seq_length": Bounds(MIN_SEQ_LENGTH, u32, zero_is_default=True),
        "seed": Bounds(0, u32),
        "early_stopping_patience": Bounds(0, u32),
        "early_stopping_threshold": Bounds(0, math.inf),
        "lora_rank": Bounds(1, settings.finetune_max_lora_rank, zero_is_default=True),
        "lora_alpha": Bounds(0, 1024, low_open=True, zero_is_default=True),
        "lora_dropout": Bounds(0, 0.9),
        "checkpoint_interval_steps": Bounds(0, u32),
        "eval_interval_steps": Bounds(0, u32),
        "max_steps": Bounds(0, u32),
        "logging_interval_steps": Bounds(1, 10_000, zero_is_default=True),
        "max_checkpoints": Bounds(0, u32),
        "max_grad_norm": Bounds(0, math.inf),
    }


def enum_value_names(enum: EnumDescriptor) -> dict[str, int]:
    """An enum's values by their name without the type prefix, lowercase ("cosine" -> LR_SCHEDULER_COSINE);
    the UNSPECIFIED value is left out (it stands for "the default", never a value to choose)."""
    prefix = enum.values_by_number[0].name.removesuffix("UNSPECIFIED")
    return {v.name.removeprefix(prefix).lower(): v.number for v in enum.values if v.number != 0}


def enum_of(field: FieldDescriptor) -> EnumDescriptor:
    """The enum type of an enum field."""
    assert field.enum_type is not None, field.full_name
    return field.enum_type


def _target_modules_problem(modules: Sequence[str]) -> str | None:
    if len(modules) > MAX_TARGET_MODULES:
        return f"{len(modules)} modules; at most {MAX_TARGET_MODULES}"
    if ALL_LINEAR in modules and len(modules) > 1:
        return f"{ALL_LINEAR!r} must be the only value"
    seen: set[str] = set()
    for name in modules:
        if not name:
            return "a module name is empty"
        if len(name) > MAX_MODULE_NAME or not MODULE_NAME.fullmatch(name):
            return f"{name[:MAX_MODULE_NAME]!r} is not a module name ([A-Za-z0-9_.-], at most {MAX_MODULE_NAME})"
        if name in seen:
            return f"duplicate module {name!r}"
        seen.add(name)
    return None


def hyperparameter_problem(name: str, value: Any, settings: FinetuneSettings) -> str | None:
    """Why `value` cannot be set as Hyperparameters.`name` (alone, ignoring other fields), or None.

    `value` is what would be assigned to the field: a number, an enum number, a bool or a list of strings.
    Sweeps check each searched value with this.
    """
    field = HYPERPARAMETER_FIELDS[name]
    if field.is_repeated:
        return _target_modules_problem(list(value))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return None
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum = enum_of(field)
        return None if value in enum.values_by_number else f"{value} is not a valid {enum.name}"
    problem = hyperparameter_bounds(settings)[name].problem(float(value))
    if problem is None and field.type != FieldDescriptor.TYPE_DOUBLE and value != int(value):
        return f"{value} is not an integer"
    return problem


def effective_checkpoint_interval(hp: finetune_pb2.Hyperparameters, settings: FinetuneSettings) -> int:
    return int(hp.checkpoint_interval_steps or settings.checkpoint_steps)


def effective_eval_interval(hp: finetune_pb2.Hyperparameters, settings: FinetuneSettings) -> int:
    return hp.eval_interval_steps or effective_checkpoint_interval(hp, settings)


def early_stopping_interval_problem(hp: finetune_pb2.Hyperparameters, settings: FinetuneSettings) -> str | None:
    """With early stopping the result is the best checkpoint, judged by the validation loss measured when it was
    saved: every checkpoint step has to be an evaluation step, i.e. the checkpoint interval a multiple of the
    eval interval (transformers' Trainer requires the same). None when that holds."""
    checkpoint = effective_checkpoint_interval(hp, settings)
    evaluation = effective_eval_interval(hp, settings)
    if checkpoint % evaluation == 0:
        return None
    return (
        f"with early stopping every checkpoint must be evaluated (the result is the best checkpoint): the "
        f"checkpoint interval {checkpoint} is not a multiple of the eval interval {evaluation}"
    )


def has_validation(spec: finetune_pb2.JobSpec) -> bool:
    """Whether the job will have validation data: its own file, or a held-out split (default 0.1)."""
    if spec.HasField("validation_data") and spec.validation_data.WhichOneof("source") is not None:
        return True
    return not spec.HasField("validation_split") or spec.validation_split > 0


def lora_field_set(hp: finetune_pb2.Hyperparameters, name: str) -> bool:
    """Whether a LoRA-only field was given a value (rather than left to its default)."""
    field = HYPERPARAMETER_FIELDS[name]
    if field.is_repeated:
        return len(getattr(hp, name)) > 0
    if field.has_presence:
        return bool(hp.HasField(name))
    return bool(getattr(hp, name))


class Violations:
    """Collects violations, each with its full field path, to report them all at once."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def require(self, ok: bool, field: str, description: str) -> None:
        if not ok:
            self.violations.append(FieldViolation(field, description))

    def enum(self, value: int, enum: EnumDescriptor, field: str) -> None:
        self.require(value in enum.values_by_number, field, f"{value} is not a valid {enum.name}")

    def webhook(self, webhook: finetune_pb2.Webhook, field: str, policy: webhooks.WebhookPolicy | None = None) -> None:
        """The URL's form and destination (see webhooks.url_problem: no loopback, private or metadata hosts
        unless `policy` allows them) and the secret's size."""
        url = webhook.url
        at = f"{field}.url"
        if not url:
            self.require(False, at, "required: an http or https URL")
        elif len(url) > MAX_URL:
            self.require(False, at, f"{len(url)} characters; at most {MAX_URL}")
        elif any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
            self.require(False, at, "contains whitespace or control characters")
        else:
            problem = webhooks.url_problem(url, policy or webhooks.WebhookPolicy())
            self.require(problem is None, at, problem or "")
        size = len(webhook.secret.encode())
        self.require(size <= MAX_SECRET_BYTES, f"{field}.secret", f"{size} bytes; at most {MAX_SECRET_BYTES}")

    def idempotency_key(self, key: str, field: str) -> None:
        self.require(len(key) <= MAX_IDEMPOTENCY_KEY, field, f"{len(key)} characters; at most {MAX_IDEMPOTENCY_KEY}")
        self.require(not any(ord(ch) < 32 or ord(ch) == 127 for ch in key), field, "contains control characters")


class Checks(Violations):
    """The checks of JobSpec and Hyperparameters, whose limits depend on the service's settings."""

    def __init__(self, settings: FinetuneSettings) -> None:
        super().__init__()
        self.settings = settings

    # -- JobSpec ---------------------------------------------------------------------------------------------

    def job_spec(self, spec: finetune_pb2.JobSpec, field: str) -> None:
        base = spec.base_model
        if base.startswith("ft:"):
            self.require(
                False,
                f"{field}.base_model",
                "a fine-tuned model cannot be the base of another job: name its base model instead",
            )
        else:
            self.require(":" not in base, f"{field}.base_model", "must not contain ':'")
        self.require(base == base.strip(), f"{field}.base_model", "has leading or trailing whitespace")
        self.require(
            len(base) <= MAX_PATH_LENGTH, f"{field}.base_model", f"{len(base)} characters; at most {MAX_PATH_LENGTH}"
        )
        self.require("\x00" not in base, f"{field}.base_model", "contains a NUL character")
        self.enum(spec.method, finetune_pb2.FineTuneMethod.DESCRIPTOR, f"{field}.method")
        self.data_source(spec.training_data, f"{field}.training_data", required=True)
        if spec.HasField("validation_data") and spec.validation_data.WhichOneof("source") is not None:
            self.data_source(spec.validation_data, f"{field}.validation_data", required=True)
        self.enum(spec.data_format, finetune_pb2.DataFormat.DESCRIPTOR, f"{field}.data_format")
        self.enum(spec.task, tasks_pb2.TaskType.DESCRIPTOR, f"{field}.task")
        if spec.data_format == finetune_pb2.DATA_FORMAT_TASK_RECORDS:
            self.require(
                spec.task != tasks_pb2.TASK_TYPE_UNSPECIFIED,
                f"{field}.task",
                "required for DATA_FORMAT_TASK_RECORDS: TASK_TYPE_CLASSIFY, _SUMMARIZE or _ANSWER",
            )
            self.task_options(spec.task, spec.task_options, f"{field}.task_options")
        elif spec.HasField("task_options"):
            # Unused by other formats, yet stored and shown on the job: unknown enum values are refused anyway.
            self.task_options(tasks_pb2.TASK_TYPE_UNSPECIFIED, spec.task_options, f"{field}.task_options")
        self.require(
            SUFFIX.fullmatch(spec.suffix) is not None,
            f"{field}.suffix",
            f"must be 0 to {MAX_SUFFIX} characters from [A-Za-z0-9._-]",
        )
        if spec.HasField("validation_split"):
            split = spec.validation_split
            self.require(
                math.isfinite(split) and 0 <= split <= MAX_VALIDATION_SPLIT,
                f"{field}.validation_split",
                f"{split} is out of range: must be 0 to {MAX_VALIDATION_SPLIT}",
            )
        self.metadata(spec.metadata, f"{field}.metadata")
        self.hyperparameters(
            spec.hyperparameters, method=spec.method, validation=has_validation(spec), field=f"{field}.hyperparameters"
        )

    def data_source(self, source: finetune_pb2.TrainingDataSource, field: str, *, required: bool) -> None:
        kind = source.WhichOneof("source")
        if kind is None:
            self.require(not required, field, "required: set path (a JSONL file) or jsonl (the file's bytes)")
            return
        if kind == "path":
            path = source.path
            self.require(bool(path.strip()), f"{field}.path", "is empty")
            self.require("\x00" not in path, f"{field}.path", "contains a NUL character")
            self.require(
                len(path) <= MAX_PATH_LENGTH, f"{field}.path", f"{len(path)} characters; at most {MAX_PATH_LENGTH}"
            )
        else:
            size = len(source.jsonl)
            limit = self.settings.max_inline_bytes
            self.require(size > 0, f"{field}.jsonl", "is empty")
            self.require(
                size <= limit,
                f"{field}.jsonl",
                f"{size} bytes; inline data may have at most {limit} (GENLOOM_FINETUNE_MAX_INLINE_BYTES): "
                "pass a path instead",
            )

    def task_options(self, task: int, options: tasks_pb2.TaskPromptOptions, field: str) -> None:
        """The options the records are rendered with must be ones the task RPC accepts, or the fine-tuned model
        could not be served with its training prompt."""
        tasks = TaskChecks(TasksSettings())
        if task == tasks_pb2.TASK_TYPE_CLASSIFY and options.labels:
            tasks.labels(options.labels, options.multi_label, f"{field}.labels")
        # Every enum is checked whatever the task: a value no RPC accepts is never stored.
        tasks.enum(options.format, tasks_pb2.SummaryFormat, f"{field}.format")
        if task == tasks_pb2.TASK_TYPE_SUMMARIZE or options.HasField("target_length"):
            tasks.target_length(options.target_length, f"{field}.target_length")
        self.violations.extend(tasks.violations)
        self.require(
            len(options.instruction) <= MAX_INSTRUCTION,
            f"{field}.instruction",
            f"longer than {MAX_INSTRUCTION} characters",
        )

    def metadata(self, metadata: Any, field: str) -> None:
        if len(metadata) > MAX_METADATA_ENTRIES:
            # Over the limit the entries are not looked at (nor sorted): a request may carry millions of them.
            self.require(False, field, f"{len(metadata)} entries; at most {MAX_METADATA_ENTRIES}")
            return
        for key in sorted(metadata):
            if not 1 <= len(key) <= MAX_METADATA_KEY:
                shown = key[:MAX_METADATA_KEY]
                self.require(False, field, f"key {shown!r}: keys are 1 to {MAX_METADATA_KEY} characters")
                continue
            self.require(
                len(metadata[key]) <= MAX_METADATA_VALUE,
                f"{field}[{key!r}]",
                f"longer than {MAX_METADATA_VALUE} characters",
            )

    # -- Hyperparameters -------------------------------------------------------------------------------------

    def hyperparameters(self, hp: finetune_pb2.Hyperparameters, *, method: int, validation: bool, field: str) -> None:
        bounds = hyperparameter_bounds(self.settings)
        for name, descriptor in HYPERPARAMETER_FIELDS.items():
            if descriptor.has_presence and not hp.HasField(name):
                continue
            at = f"{field}.{name}"
            value = getattr(hp, name)
            if descriptor.is_repeated:
                problem = _target_modules_problem(value)  # counts first: no copy of a huge list
                self.require(problem is None, at, problem or "")
            elif descriptor.type == FieldDescriptor.TYPE_ENUM:
                self.enum(value, enum_of(descriptor), at)
            elif name in bounds:
                problem = bounds[name].problem(float(value))
                self.require(problem is None, at, problem or "")
        if method == finetune_pb2.FINE_TUNE_METHOD_FULL:
            for name in LORA_ONLY:
                self.require(
                    not lora_field_set(hp, name),
                    f"{field}.{name}",
                    "LoRA only: leave it unset with FINE_TUNE_METHOD_FULL",
                )
        if hp.early_stopping_patience > 0:
            self.require(
                validation,
                f"{field}.early_stopping_patience",
                "early stopping needs validation data: set validation_data, or a validation_split above 0",
            )
            problem = early_stopping_interval_problem(hp, self.settings)
            self.require(problem is None, f"{field}.eval_interval_steps", problem or "")


def check_job_spec(
    spec: finetune_pb2.JobSpec, settings: FinetuneSettings, *, field: str = "spec"
) -> list[FieldViolation]:
    """Every violation in `spec` that needs neither the base model nor the data files (those are checked when
    the model is resolved and by the asynchronous data validation)."""
    checks = Checks(settings)
    checks.job_spec(spec, field)
    return checks.violations


def effective_hyperparameters(
    hp: finetune_pb2.Hyperparameters,
    *,
    method: int,
    context_window: int,
    settings: FinetuneSettings,
    field: str = "spec.hyperparameters",
) -> finetune_pb2.Hyperparameters:
    """A copy of (checked) `hp` with every default written out, as the job record shows and the worker trains.

    Defaults that depend on things unknown here stay unset: `dropout` (the model's own configuration) and
    `lora_target_modules` (PEFT's choice for the architecture); warmup_steps 0 (use warmup_ratio), max_steps 0
    (train `epochs`) and early_stopping_patience 0 (off) are themselves the defaults. With FINE_TUNE_METHOD_FULL
    the LoRA fields are cleared rather than filled, so the record never shows an adapter rank for a full job.
    Raises InvalidArgument when max_seq_length exceeds `context_window` (the only limit that needs the model).
    """
    if context_window <= 0:
        raise ValueError(f"context_window must be positive, got {context_window}")
    lora = method != finetune_pb2.FINE_TUNE_METHOD_FULL
    out = finetune_pb2.Hyperparameters()
    out.CopyFrom(hp)
    out.epochs = hp.epochs or DEFAULT_EPOCHS
    out.batch_size = hp.batch_size or DEFAULT_BATCH_SIZE
    out.gradient_accumulation_steps = hp.gradient_accumulation_steps or DEFAULT_GRADIENT_ACCUMULATION
    out.learning_rate = hp.learning_rate or (DEFAULT_LORA_LEARNING_RATE if lora else DEFAULT_FULL_LEARNING_RATE)
    if not hp.HasField("warmup_ratio"):
        out.warmup_ratio = DEFAULT_WARMUP_RATIO
    out.lr_scheduler = hp.lr_scheduler or finetune_pb2.LR_SCHEDULER_LINEAR
    out.max_seq_length = hp.max_seq_length or min(DEFAULT_MAX_SEQ_LENGTH, context_window)
    if not MIN_SEQ_LENGTH <= out.max_seq_length <= context_window:
        raise InvalidArgument.field(
            f"{field}.max_seq_length",
            f"{out.max_seq_length} is out of range: must be {MIN_SEQ_LENGTH} to the base model's context window "
            f"({context_window} tokens)",
        )
    if not hp.HasField("seed"):
        out.seed = DEFAULT_SEED
    out.precision = hp.precision or finetune_pb2.PRECISION_AUTO
    if lora:
        out.lora_rank = hp.lora_rank or DEFAULT_LORA_RANK
        out.lora_alpha = hp.lora_alpha or 2.0 * out.lora_rank
        if not hp.HasField("lora_dropout"):
            out.lora_dropout = DEFAULT_LORA_DROPOUT
    else:
        for name in LORA_ONLY:
            out.ClearField(name)
    out.checkpoint_interval_steps = effective_checkpoint_interval(hp, settings)
    out.eval_interval_steps = effective_eval_interval(hp, settings)
    out.logging_interval_steps = hp.logging_interval_steps or DEFAULT_LOGGING_INTERVAL
    out.max_checkpoints = hp.max_checkpoints or DEFAULT_MAX_CHECKPOINTS
    if not hp.HasField("max_grad_norm"):
        out.max_grad_norm = DEFAULT_MAX_GRAD_NORM
    return out


def check_webhook(
    webhook: finetune_pb2.Webhook, *, field: str = "webhook", policy: webhooks.WebhookPolicy | None = None
) -> list[FieldViolation]:
    """Violations of a webhook (call only when the request sets one); `policy` is the allow-list of the
    service's settings (none: public destinations only)."""
    checks = Violations()
    checks.webhook(webhook, field, policy)
    return checks.violations


def check_idempotency_key(key: str, *, field: str = "idempotency_key") -> list[FieldViolation]:
    checks = Violations()
    checks.idempotency_key(key, field)
    return checks.violations


def request_digest(message: Message) -> str:
    """Hex SHA-256 of a request, to tell an idempotent retry (same digest) from a different request reusing its
    key. Deterministic serialization orders map entries, and proto3 leaves default values out, so the digest
    depends only on what the request says; the message type is included, so a job and a sweep request with the
    same bytes differ."""
    digest = hashlib.sha256(message.DESCRIPTOR.full_name.encode())
    digest.update(b"\x00")
    digest.update(message.SerializeToString(deterministic=True))
    return digest.hexdigest()


def raise_if(violations: Sequence[FieldViolation]) -> None:
    """Raise one InvalidArgument listing `violations` (a google.rpc.BadRequest on the wire); nothing when empty."""
    InvalidArgument.raise_for(list(violations))

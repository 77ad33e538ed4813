"""Inputs and results of the fine-tuning service: jobs, their events and checkpoints, and hyperparameter sweeps.

Enum values are lowercase names without their proto prefix ("running", "cosine", "bf16", "invalid_data"), the
same names `ParameterValue.string_value` takes, so one spelling works for arguments, results and the CLI.
Hyperparameters are a dataclass whose field names are those of the proto's `Hyperparameters`; every place that
takes one also takes a plain mapping of those names, checked here before anything is sent.

This module is the public import path; the definitions live in `_finetune_enums` (enum names and tables),
`_hyperparameters`, `_search_space` (sweep dimensions), `_training_data` (JSONL writing), `_finetune_spec` (job
inputs) and `_finetune_records` (job and sweep records); the errors in `genloom._exceptions`.
"""

from __future__ import annotations

from genloom._exceptions import (
    FineTuneJobFailed,
    JobError,
    JobErrorCodeName,
    LineError,
    SweepFailed,
    WaitTimeoutError,
)
from genloom.types._finetune_enums import (
    DATA_FORMATS,
    ERROR_CODES,
    EVENT_LEVELS,
    EVENT_TYPES,
    JOB_STATES,
    METHODS,
    SORT_ORDERS,
    SWEEP_METHODS,
    SWEEP_OBJECTIVES,
    SWEEP_STATES,
    TERMINAL_JOB_STATES,
    TERMINAL_SWEEP_STATES,
    DataFormatName,
    FineTuneMethodName,
    JobEventLevelName,
    JobEventTypeName,
    JobStateName,
    LrSchedulerName,
    PrecisionName,
    SortOrderName,
    SweepMethodName,
    SweepObjectiveName,
    SweepStateName,
)
from genloom.types._finetune_records import (
    Checkpoint,
    FineTuneJob,
    JobEvent,
    JobMetrics,
    Sweep,
    SweepSpec,
    Trial,
    WebhookInfo,
)
from genloom.types._finetune_spec import (
    FineTuneSpec,
    TaskOptions,
    webhook_to_pb,
)
from genloom.types._hyperparameters import (
    Hyperparameters,
    HyperparametersLike,
    check_hyperparameter,
    hyperparameter_names,
    parse_hyperparameter,
)
from genloom.types._search_space import (
    FloatRange,
    IntRange,
    SearchSpaceLike,
    parameter_value_from_pb,
    search_dimension_to_pb,
    search_space_to_pb,
)
from genloom.types._training_data import (
    UPLOAD_PREFIX,
    TrainingFile,
    TrainingRecord,
    records_to_jsonl,
    training_data_to_pb,
)

__all__ = [
    "DATA_FORMATS",
    "ERROR_CODES",
    "EVENT_LEVELS",
    "EVENT_TYPES",
    "JOB_STATES",
    "METHODS",
    "SORT_ORDERS",
    "SWEEP_METHODS",
    "SWEEP_OBJECTIVES",
    "SWEEP_STATES",
    "TERMINAL_JOB_STATES",
    "TERMINAL_SWEEP_STATES",
    "UPLOAD_PREFIX",
    "Checkpoint",
    "DataFormatName",
    "FineTuneJob",
    "FineTuneJobFailed",
    "FineTuneMethodName",
    "FineTuneSpec",
    "FloatRange",
    "Hyperparameters",
    "HyperparametersLike",
    "IntRange",
    "JobError",
    "JobErrorCodeName",
    "JobEvent",
    "JobEventLevelName",
    "JobEventTypeName",
    "JobMetrics",
    "JobStateName",
    "LineError",
    "LrSchedulerName",
    "PrecisionName",
    "SearchSpaceLike",
    "SortOrderName",
    "Sweep",
    "SweepFailed",
    "SweepMethodName",
    "SweepObjectiveName",
    "SweepSpec",
    "SweepStateName",
    "TaskOptions",
    "TrainingFile",
    "TrainingRecord",
    "Trial",
    "WaitTimeoutError",
    "WebhookInfo",
    "check_hyperparameter",
    "hyperparameter_names",
    "parameter_value_from_pb",
    "parse_hyperparameter",
    "records_to_jsonl",
    "search_dimension_to_pb",
    "search_space_to_pb",
    "training_data_to_pb",
    "webhook_to_pb",
]

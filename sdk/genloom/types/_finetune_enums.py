"""The fine-tuning enums as the SDK spells them, and the small proto converters every fine-tuning type uses.

Enum values are lowercase names without their proto prefix ("running", "cosine", "bf16"), read from the proto's
descriptors so the tables cannot drift from it. Used by the other fine-tuning type modules and the fine-tuning
resource; `genloom.types.finetune` re-exports the public names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, Literal

from genloom.types._task_inputs import enum_value
from genloom.v1 import common_pb2, finetune_pb2

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

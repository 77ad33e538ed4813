"""Hyperparameters: the dataclass, and the checks and text parsing shared by jobs, sweeps and the CLI.

Field names are those of the proto's `Hyperparameters`; every place that takes one also takes a plain mapping of
those names, checked here before anything is sent. `genloom.types.finetune` re-exports the public names.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Union

from google.protobuf.descriptor import FieldDescriptor

from genloom.types._finetune_enums import LrSchedulerName, PrecisionName, _enum_names, _optional, _optional_name
from genloom.v1 import finetune_pb2

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

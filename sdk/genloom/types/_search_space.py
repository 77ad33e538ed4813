"""A sweep's search space: FloatRange, IntRange, and the conversion of each dimension to and from the proto.

Names and value kinds are checked against the hyperparameters (`_hyperparameters`). Used by the sweep records and
the sweep resource; `genloom.types.finetune` re-exports the public names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from genloom.types._hyperparameters import _HP_FIELDS, _hp_field, _hp_kind, check_hyperparameter
from genloom.v1 import finetune_pb2


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

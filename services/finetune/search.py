"""Hyperparameter sweeps: search-space checks, grid expansion, applying a trial's values, and Bayesian search.

A sweep's trials are ordinary jobs whose hyperparameters are the base job's with the searched ones overridden
(`apply_parameters`). Grid sweeps enumerate their trials up front (`grid`); Bayesian sweeps ask Optuna's TPE
sampler for each next trial (`BayesianSearch`), with the study kept in Redis so that whichever process advances
the sweep (a service replica, a worker reporting a result) sees every earlier trial.

Choices on list hyperparameters (lora_target_modules) work with both methods: Optuna's categorical values must be
scalars, so each choice is handed to Optuna as its canonical scalar form (a list as its comma-joined names, an
enum as its short name) and mapped back to the ParameterValue the request gave.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
import redis
from google.protobuf.descriptor import FieldDescriptor
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, TPESampler
from optuna.storages.journal import JournalRedisBackend, JournalStorage
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from genloom.services.finetune import spec as job_spec
from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.server.errors import FieldViolation
from genloom.v1 import finetune_pb2

# Optuna's records go through the server's logging (format, level, request ids), not a stderr handler of its own.
optuna.logging.disable_default_handler()
optuna.logging.enable_propagation()

MAX_DIMENSIONS = 16
MAX_CHOICES = 64
MIN_GRID_POINTS = 2
MAX_GRID_POINTS = 64
DEFAULT_GRID_POINTS = 3
MAX_PARALLELISM = 32
DEFAULT_PARALLELISM = 2
DEFAULT_BAYESIAN_TRIALS = 10
# Optuna's study of sweep <id> lives under this Redis key prefix (its journal: <prefix>:log_number,
# <prefix>:log:<n>, <prefix>:snapshot).
OPTUNA_KEY_PREFIX = "genloom:ft:optuna:"
_SWEEP_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Searching these with early stopping on could put an evaluation between checkpoints (see spec.py).
_INTERVALS = ("checkpoint_interval_steps", "eval_interval_steps")


def _kind(field: FieldDescriptor) -> str:
    if field.is_repeated:
        return "list"
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return "float"
    if field.type == FieldDescriptor.TYPE_ENUM:
        return "enum"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "bool"
    return "int"


# Hyperparameters field name -> "float" | "int" | "enum" | "bool" | "list", read from the proto so a field added
# there is searchable without touching this module.
HYPERPARAMETER_KINDS: dict[str, str] = {name: _kind(f) for name, f in job_spec.HYPERPARAMETER_FIELDS.items()}

# Which ParameterValue cases each kind accepts (the ParameterValue field comments).
_ACCEPTED: dict[str, tuple[str, ...]] = {
    "float": ("float_value", "int_value"),
    "int": ("int_value",),
    "enum": ("string_value",),
    "bool": ("bool_value",),
    "list": ("string_list",),
}


def parameter_value(name: str, value: finetune_pb2.ParameterValue) -> Any:
    """What `value` sets Hyperparameters.`name` to (a float, int, enum number, bool or list of strings); ValueError
    naming the problem when its kind does not suit the hyperparameter."""
    kind = HYPERPARAMETER_KINDS.get(name)
    if kind is None:
        raise ValueError(f"{name!r} is not a Hyperparameters field")
    case = value.WhichOneof("value")
    if case is None:
        raise ValueError("no value set")
    if case not in _ACCEPTED[kind]:
        wanted = " or ".join(_ACCEPTED[kind])
        raise ValueError(f"{name} is a {kind} hyperparameter: give {wanted}, not {case}")
    if kind == "float":
        return float(value.float_value if case == "float_value" else value.int_value)
    if kind == "int":
        return value.int_value
    if kind == "bool":
        return value.bool_value
    if kind == "list":
        return list(value.string_list.values)
    enum = job_spec.enum_of(job_spec.HYPERPARAMETER_FIELDS[name])
    names = job_spec.enum_value_names(enum)
    prefix = enum.values_by_number[0].name.removesuffix("UNSPECIFIED").lower()
    key = value.string_value.strip().lower().removeprefix(prefix)
    if key not in names:
        raise ValueError(f"{value.string_value!r} is not a {enum.name}: one of {', '.join(names)}")
    return names[key]


def _scalar(name: str, value: finetune_pb2.ParameterValue) -> bool | int | float | str:
    """A choice's canonical scalar: equal for values that set the same thing (1 and 1.0 on a float field,
    "COSINE" and "cosine"), and a valid Optuna categorical value."""
    python = parameter_value(name, value)
    kind = HYPERPARAMETER_KINDS[name]
    if kind == "list":
        return ",".join(python)
    if kind == "enum":
        enum = job_spec.enum_of(job_spec.HYPERPARAMETER_FIELDS[name])
        prefix = enum.values_by_number[0].name.removesuffix("UNSPECIFIED")
        return str(enum.values_by_number[python].name.removeprefix(prefix).lower())
    return python  # type: ignore[no-any-return]


# -- grid -------------------------------------------------------------------------------------------------------


def _float_points(r: finetune_pb2.FloatRange) -> list[float]:
    n = r.grid_points or DEFAULT_GRID_POINTS
    if r.log:
        low, high = math.log10(r.min), math.log10(r.max)
        points = [10 ** (low + (high - low) * k / (n - 1)) for k in range(n)]
    else:
        points = [r.min + (r.max - r.min) * k / (n - 1) for k in range(n)]
    # 12 significant digits: 1e-4, not 9.999999999999999e-05, in trial records; the ends stay exact.
    return [r.min, *(float(f"{p:.12g}") for p in points[1:-1]), r.max]


class _Axis:
    """One dimension's grid values, indexable without building them (an int range may be long)."""

    def __init__(self, dimension: finetune_pb2.SearchDimension) -> None:
        self.space = dimension.WhichOneof("space")
        self.dimension = dimension
        self.floats: list[float] = []
        if self.space == "float_range":
            self.floats = _float_points(dimension.float_range)
            self.length = len(self.floats)
        elif self.space == "int_range":
            r = dimension.int_range
            self.step = r.step or 1
            self.length = max(0, (r.max - r.min) // self.step + 1)
        elif self.space == "choice":
            self.length = len(dimension.choice.values)
        else:
            self.length = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> finetune_pb2.ParameterValue:
        if self.space == "float_range":
            return finetune_pb2.ParameterValue(float_value=self.floats[i])
        if self.space == "int_range":
            return finetune_pb2.ParameterValue(int_value=self.dimension.int_range.min + i * self.step)
        value = finetune_pb2.ParameterValue()
        value.CopyFrom(self.dimension.choice.values[i])
        return value


def grid_size(spec: finetune_pb2.SweepSpec) -> int:
    """Combinations in the full grid of `spec`'s search space."""
    return math.prod(len(_Axis(d)) for d in spec.search_space)


def grid(spec: finetune_pb2.SweepSpec) -> list[list[finetune_pb2.TrialParameter]]:
    """The grid's trials, in order (the last dimension varying fastest), the first max_trials of them when it is
    set; each trial's values are in search_space order. Call it on a checked spec."""
    axes = [_Axis(d) for d in spec.search_space]
    total = math.prod(len(a) for a in axes)
    count = min(total, spec.max_trials) if spec.max_trials else total
    trials = []
    for k in range(count):
        indexes = []
        for axis in reversed(axes):
            k, i = divmod(k, len(axis))
            indexes.append(i)
        indexes.reverse()
        trials.append(
            [
                finetune_pb2.TrialParameter(name=d.name, value=axis[i])
                for d, axis, i in zip(spec.search_space, axes, indexes, strict=True)
            ]
        )
    return trials


def apply_parameters(
    hp: finetune_pb2.Hyperparameters, params: Sequence[finetune_pb2.TrialParameter]
) -> finetune_pb2.Hyperparameters:
    """A copy of `hp` with each trial parameter set (enums by name, lists replaced); ValueError for a parameter
    whose name or kind is wrong (a checked sweep has none)."""
    out = finetune_pb2.Hyperparameters()
    out.CopyFrom(hp)
    for param in params:
        value = parameter_value(param.name, param.value)
        if HYPERPARAMETER_KINDS[param.name] == "list":
            out.ClearField(param.name)
            getattr(out, param.name).extend(value)
        else:
            setattr(out, param.name, value)
    return out


# -- checks -----------------------------------------------------------------------------------------------------


def _largest(name: str, dimension: finetune_pb2.SearchDimension) -> float:
    """The largest numeric value a (numeric) dimension can take; -inf when it cannot tell."""
    space = dimension.WhichOneof("space")
    if space == "float_range":
        return float(dimension.float_range.max)
    if space == "int_range":
        return float(dimension.int_range.max)
    values = []
    for v in dimension.choice.values:
        try:
            values.append(float(parameter_value(name, v)))
        except (ValueError, TypeError):
            continue
    return max(values, default=-math.inf)


class _SweepChecks(job_spec.Checks):
    def sweep(self, spec: finetune_pb2.SweepSpec, field: str) -> None:
        base = spec.base_job
        if spec.HasField("base_job"):
            self.violations.extend(job_spec.check_job_spec(base, self.settings, field=f"{field}.base_job"))
        else:
            self.require(False, f"{field}.base_job", "required: the job every trial runs")
        self.enum(spec.method, finetune_pb2.SweepMethod.DESCRIPTOR, f"{field}.method")
        self.enum(spec.objective, finetune_pb2.SweepObjective.DESCRIPTOR, f"{field}.objective")
        is_grid = spec.method in (finetune_pb2.SWEEP_METHOD_UNSPECIFIED, finetune_pb2.SWEEP_METHOD_GRID)
        dims = spec.search_space
        self.require(
            1 <= len(dims) <= MAX_DIMENSIONS,
            f"{field}.search_space",
            f"{len(dims)} dimensions; 1 to {MAX_DIMENSIONS} allowed",
        )
        patience = [d for d in dims if d.name == "early_stopping_patience"]
        early_stopping = base.hyperparameters.early_stopping_patience > 0 or any(
            _largest(d.name, d) > 0 for d in patience
        )
        seen: dict[str, int] = {}
        sizes: list[int | None] = []
        for i, dimension in enumerate(dims):
            at = f"{field}.search_space[{i}]"
            sizes.append(self.dimension(spec, dimension, at, seen, i, is_grid=is_grid, early_stopping=early_stopping))
        limit = self.settings.max_sweep_trials
        self.require(
            spec.max_trials <= limit,
            f"{field}.max_trials",
            f"{spec.max_trials} trials; a sweep may run at most {limit} (GENLOOM_FINETUNE_MAX_SWEEP_TRIALS)",
        )
        if is_grid and dims and all(s is not None for s in sizes) and spec.max_trials == 0:
            total = math.prod(s for s in sizes if s is not None)
            self.require(
                total <= limit,
                f"{field}.max_trials",
                f"0 runs the whole grid, {total} combinations, but a sweep may run at most {limit} trials "
                f"(GENLOOM_FINETUNE_MAX_SWEEP_TRIALS): set max_trials to run the first ones, or search fewer values",
            )
        self.require(
            spec.parallelism <= MAX_PARALLELISM,
            f"{field}.parallelism",
            f"{spec.parallelism} is out of range: must be 1 to {MAX_PARALLELISM} (or 0 for the default)",
        )
        if spec.objective in (finetune_pb2.SWEEP_OBJECTIVE_UNSPECIFIED, finetune_pb2.SWEEP_OBJECTIVE_VALIDATION_LOSS):
            self.require(
                job_spec.has_validation(base),
                f"{field}.objective",
                "the validation-loss objective (the default) needs validation data: set base_job.validation_data "
                "or a base_job.validation_split above 0, or use SWEEP_OBJECTIVE_TRAIN_LOSS",
            )

    def dimension(
        self,
        spec: finetune_pb2.SweepSpec,
        dimension: finetune_pb2.SearchDimension,
        at: str,
        seen: dict[str, int],
        index: int,
        *,
        is_grid: bool,
        early_stopping: bool,
    ) -> int | None:
        """Check one dimension; its number of grid values, or None when it is invalid."""
        name = dimension.name
        if not name:
            self.require(False, f"{at}.name", "required: a Hyperparameters field name, e.g. learning_rate")
            return None
        if name not in HYPERPARAMETER_KINDS:
            self.require(False, f"{at}.name", f"{name!r} is not a Hyperparameters field")
            return None
        if name in seen:
            self.require(False, f"{at}.name", f"{name!r} is already searched by search_space[{seen[name]}]")
            return None
        seen[name] = index
        base = spec.base_job
        if spec.base_job.method == finetune_pb2.FINE_TUNE_METHOD_FULL:
            self.require(
                name not in job_spec.LORA_ONLY,
                f"{at}.name",
                f"{name} is LoRA only and the base job uses FINE_TUNE_METHOD_FULL",
            )
        if name in _INTERVALS:
            self.require(
                not early_stopping,
                f"{at}.name",
                f"{name} cannot be searched with early stopping: every evaluation must fall on a checkpoint",
            )
        if name == "early_stopping_patience" and _largest(name, dimension) > 0:
            self.require(
                job_spec.has_validation(base),
                at,
                "early stopping needs validation data: set base_job.validation_data, or a validation_split above 0",
            )
            if base.hyperparameters.early_stopping_patience == 0:  # else the base job's own check reports it
                problem = job_spec.early_stopping_interval_problem(base.hyperparameters, self.settings)
                self.require(problem is None, at, problem or "")
        space = dimension.WhichOneof("space")
        if space == "choice":
            return self.choice(name, dimension.choice, f"{at}.choice")
        if space == "float_range":
            return self.float_range(name, dimension.float_range, f"{at}.float_range")
        if space == "int_range":
            return self.int_range(name, dimension.int_range, f"{at}.int_range", is_grid=is_grid)
        self.require(False, at, "required: one of choice, float_range or int_range")
        return None

    def choice(self, name: str, choice: finetune_pb2.ChoiceSpace, at: str) -> int | None:
        values = choice.values
        ok = 1 <= len(values) <= MAX_CHOICES
        self.require(ok, f"{at}.values", f"{len(values)} values; 1 to {MAX_CHOICES} allowed")
        first: dict[Any, int] = {}
        for j, value in enumerate(values):
            where = f"{at}.values[{j}]"
            try:
                python = parameter_value(name, value)
                scalar = _scalar(name, value)
            except ValueError as err:
                self.require(False, where, str(err))
                ok = False
                continue
            problem = job_spec.hyperparameter_problem(name, python, self.settings)
            self.require(problem is None, where, problem or "")
            # The type is part of the key so that True and 1 stay apart (they only meet in invalid mixes).
            key = (type(scalar).__name__, scalar)
            if key in first:
                self.require(False, where, f"the same value as values[{first[key]}]")
            first.setdefault(key, j)
            ok = ok and problem is None
        return len(values) if ok else None

    def _range_end(self, name: str, value: float, where: str) -> bool:
        bounds = job_spec.hyperparameter_bounds(self.settings)[name]
        inside = bounds.contains(value)
        self.require(
            inside,
            where,
            f"{value:g} is out of range for {name}: must be {bounds.describe(with_default=False)}",
        )
        return inside

    def float_range(self, name: str, r: finetune_pb2.FloatRange, at: str) -> int | None:
        kind = HYPERPARAMETER_KINDS[name]
        if kind != "float":
            self.require(
                False,
                at,
                f"{name} is a{'n' if kind == 'int' else ''} {kind} hyperparameter: use "
                + ("int_range or choice" if kind == "int" else "choice"),
            )
            return None
        ok = self._range_end(name, r.min, f"{at}.min") & self._range_end(name, r.max, f"{at}.max")
        if ok:
            ok = r.max > r.min
            self.require(ok, f"{at}.max", f"{r.max:g} must be greater than min ({r.min:g})")
        if r.log:
            self.require(r.min > 0, f"{at}.min", "must be greater than 0 on a log scale")
            ok = ok and r.min > 0
        points_ok = r.grid_points == 0 or MIN_GRID_POINTS <= r.grid_points <= MAX_GRID_POINTS
        self.require(
            points_ok,
            f"{at}.grid_points",
            f"{r.grid_points} is out of range: must be {MIN_GRID_POINTS} to {MAX_GRID_POINTS} (or 0 for 3)",
        )
        return (r.grid_points or DEFAULT_GRID_POINTS) if ok and points_ok else None

    def int_range(self, name: str, r: finetune_pb2.IntRange, at: str, *, is_grid: bool) -> int | None:
        kind = HYPERPARAMETER_KINDS[name]
        if kind not in ("int", "float"):
            self.require(False, at, f"{name} is a{'n' if kind == 'enum' else ''} {kind} hyperparameter: use choice")
            return None
        ok = self._range_end(name, r.min, f"{at}.min") & self._range_end(name, r.max, f"{at}.max")
        if ok:
            ok = r.max >= r.min
            self.require(ok, f"{at}.max", f"{r.max} must be at least min ({r.min})")
        if r.log:
            self.require(r.step <= 1, f"{at}.step", "must be 1 (or 0) on a log scale")
            self.require(r.min >= 1, f"{at}.min", "must be at least 1 on a log scale")
            self.require(
                not is_grid,
                f"{at}.log",
                "log-scale integer ranges are for Bayesian sweeps: list a grid's values in a choice",
            )
            ok = ok and r.step <= 1 and r.min >= 1 and not is_grid
        return (r.max - r.min) // (r.step or 1) + 1 if ok else None


def check_sweep_spec(
    spec: finetune_pb2.SweepSpec, settings: FinetuneSettings, *, field: str = "spec"
) -> list[FieldViolation]:
    """Every violation of a sweep request: its base job (as CreateJob checks a spec), each dimension (a known,
    unique hyperparameter; values of a kind that suits it and inside its limits; valid ranges), the trial count
    (a grid larger than GENLOOM_FINETUNE_MAX_SWEEP_TRIALS needs max_trials), parallelism and the objective.

    Rules that tie fields together hold for every trial: LoRA-only fields cannot be searched for a full
    fine-tune, searched early stopping needs validation data, and with early stopping the checkpoint and eval
    intervals cannot be searched (a trial could otherwise evaluate between checkpoints).
    """
    checks = _SweepChecks(settings)
    checks.sweep(spec, field)
    return checks.violations


def effective_sweep_spec(spec: finetune_pb2.SweepSpec, settings: FinetuneSettings) -> finetune_pb2.SweepSpec:
    """A copy of (checked) `spec` with its defaults written out, as the sweep record shows it: method GRID,
    parallelism 2, objective VALIDATION_LOSS, max_trials the number of trials that will run (grid: the whole
    grid or the first max_trials; Bayesian: 10 unless set), grid_points 3 for grid float ranges, step 1 for
    integer ranges. The base job is copied as given (its effective hyperparameters need the model)."""
    out = finetune_pb2.SweepSpec()
    out.CopyFrom(spec)
    out.method = spec.method or finetune_pb2.SWEEP_METHOD_GRID
    out.parallelism = spec.parallelism or DEFAULT_PARALLELISM
    out.objective = spec.objective or finetune_pb2.SWEEP_OBJECTIVE_VALIDATION_LOSS
    is_grid = out.method == finetune_pb2.SWEEP_METHOD_GRID
    for dimension in out.search_space:
        if dimension.HasField("float_range") and is_grid and not dimension.float_range.grid_points:
            dimension.float_range.grid_points = DEFAULT_GRID_POINTS
        if dimension.HasField("int_range") and not dimension.int_range.step:
            dimension.int_range.step = 1
    if is_grid:
        size = grid_size(out)
        out.max_trials = min(spec.max_trials or size, size)
    else:
        out.max_trials = spec.max_trials or min(DEFAULT_BAYESIAN_TRIALS, settings.max_sweep_trials)
    return out


# -- Bayesian search --------------------------------------------------------------------------------------------


def _startup_trials(max_trials: int) -> int:
    """Random trials before TPE models the results: a third of the budget, 2 to 10 (Optuna's fixed 10 would make
    a default 10-trial sweep pure random search)."""
    return max(2, min(10, max_trials // 3))


class _TrialSeededTPE(BaseSampler):
    """TPE whose randomness is a function of (sweep seed, trial number) only.

    A plain seeded TPESampler keeps its random state in the process; each process (or each BayesianSearch built
    for one request) would then start from the same state and propose trial 0's values again. Seeding per trial
    number makes every trial's suggestion depend only on the seed, its number and the study's history in Redis,
    whichever process asks.
    """

    def __init__(self, seed: int, n_startup_trials: int) -> None:
        self._seed = seed
        self._n_startup_trials = n_startup_trials
        self._samplers: dict[int, TPESampler] = {}

    def _sampler(self, trial: FrozenTrial) -> TPESampler:
        sampler = self._samplers.get(trial.number)
        if sampler is None:
            seed = int(np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                # multivariate: learning rate and batch size, say, interact; constant_liar: trials running in
                # parallel count as bad results, so concurrent asks are not all sent to the same spot.
                sampler = TPESampler(
                    seed=seed, n_startup_trials=self._n_startup_trials, multivariate=True, constant_liar=True
                )
            self._samplers[trial.number] = sampler
        return sampler

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._sampler(trial).before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._sampler(trial).after_trial(study, trial, state, values)
        self._samplers.pop(trial.number, None)

    def reseed_rng(self) -> None:
        """Nothing: the state is derived from the seed per trial, never reseeded at random."""


def _distribution(dimension: finetune_pb2.SearchDimension) -> BaseDistribution:
    space = dimension.WhichOneof("space")
    if space == "float_range":
        r = dimension.float_range
        return FloatDistribution(r.min, r.max, log=r.log)
    if space == "int_range":
        i = dimension.int_range
        step = i.step or 1
        # Optuna wants max - min divisible by step; the grid's last value is the same one.
        return IntDistribution(i.min, i.min + (i.max - i.min) // step * step, log=i.log, step=step)
    return CategoricalDistribution([_scalar(dimension.name, v) for v in dimension.choice.values])


class BayesianSearch:
    """Optuna TPE (seeded) whose study lives in Redis (optuna JournalStorage over its Redis journal backend, keyed
    by the sweep id), so any process (service replica or worker) can ask for the next trial and report results.

    Concurrent asks from several processes are safe: the journal appends each operation atomically (a Lua
    script increments the log number and stores the entry), and every process replays the same log, so two
    asks create two distinct trials. Build it from the sweep's effective spec.
    """

    def __init__(self, redis_url: str, sweep_id: str, spec: finetune_pb2.SweepSpec) -> None:
        if not _SWEEP_ID.fullmatch(sweep_id):
            raise ValueError(f"{sweep_id!r} is not a usable sweep id ([A-Za-z0-9._-], at most 128 characters)")
        self.sweep_id = sweep_id
        self._prefix = OPTUNA_KEY_PREFIX + sweep_id
        self._redis_url = redis_url
        self._dimensions = list(spec.search_space)
        self._distributions = {d.name: _distribution(d) for d in self._dimensions}
        self._choices = {d.name: [_scalar(d.name, v) for v in d.choice.values] for d in self._dimensions}
        sampler = _TrialSeededTPE(spec.seed, _startup_trials(spec.max_trials or DEFAULT_BAYESIAN_TRIALS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            backend = JournalRedisBackend(redis_url, prefix=self._prefix)
        storage = JournalStorage(backend)
        try:
            self._study = optuna.load_study(study_name=sweep_id, storage=storage, sampler=sampler)
        except KeyError:
            # Two processes may get here at once; the journal keeps the first creation and the other loads it.
            self._study = optuna.create_study(
                storage=storage, sampler=sampler, study_name=sweep_id, direction="minimize", load_if_exists=True
            )

    def ask(self) -> tuple[int, list[finetune_pb2.TrialParameter]]:
        """Start a trial: its Optuna trial number and its values, in search_space order."""
        trial = self._study.ask(self._distributions)
        params = []
        for dimension in self._dimensions:
            chosen = trial.params[dimension.name]
            space = dimension.WhichOneof("space")
            if space == "float_range":
                value = finetune_pb2.ParameterValue(float_value=float(chosen))
            elif space == "int_range":
                value = finetune_pb2.ParameterValue(int_value=int(chosen))
            else:
                value = finetune_pb2.ParameterValue()
                value.CopyFrom(dimension.choice.values[self._choices[dimension.name].index(chosen)])
            params.append(finetune_pb2.TrialParameter(name=dimension.name, value=value))
        return trial.number, params

    def tell(self, number: int, value: float | None) -> None:
        """Report trial `number`'s objective value (lower is better); None (or a non-finite value) when it failed
        or was cancelled, so that it informs nothing. Telling a trial twice keeps the first report, so a retried
        report is harmless."""
        if value is None or not math.isfinite(value):
            self._study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        else:
            self._study.tell(number, value, skip_if_finished=True)

    def trials(self) -> list[FrozenTrial]:
        """The study's trials, by number (for inspection and tests)."""
        return self._study.get_trials(deepcopy=False)

    def delete(self) -> None:
        """Drop the study's Redis data (call when the sweep's record is deleted or it no longer needs search)."""
        client = redis.Redis.from_url(self._redis_url)
        try:
            keys = list(client.scan_iter(match=self._prefix + ":*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()

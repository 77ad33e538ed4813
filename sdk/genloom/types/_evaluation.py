"""Evaluations: datasets and their JSONL records, configurations to compare, and the progress, predictions,
metrics and summary an evaluation streams back. Used by the task resource and the CLI through
`genloom.types.tasks`, which re-exports the public names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from genloom.types._task_inputs import (
    CLASSIFY_METHODS,
    EXAMPLE_SELECTIONS,
    STRATEGIES,
    TASKS,
    AnswerExample,
    ClassifyExample,
    ClassifyMethodName,
    EvalDatasetLike,
    EvalRecord,
    EvalRecordLike,
    ExampleSelectionName,
    StrategyName,
    SummarizeExample,
    TaskName,
    _name_of,
    enum_value,
)
from genloom.types.inference import Usage
from genloom.v1 import inference_pb2, tasks_pb2


def coerce_eval_record(task: TaskName, record: EvalRecordLike) -> EvalRecord:
    """The typed record for a task from a typed record, a tuple or a mapping (JSONL keys)."""
    if isinstance(record, ClassifyExample | SummarizeExample | AnswerExample):
        return record
    if task == "classify":
        return ClassifyExample.coerce(record)
    if task == "summarize":
        return SummarizeExample.coerce(record)
    if task == "answer":
        return AnswerExample.coerce(record)
    enum_value(TASKS, task, "task")
    raise AssertionError("unreachable")


def eval_record_to_pb(record: EvalRecord) -> tasks_pb2.EvalRecord:
    if isinstance(record, ClassifyExample):
        return tasks_pb2.EvalRecord(classify=record.to_pb())
    if isinstance(record, SummarizeExample):
        return tasks_pb2.EvalRecord(summarize=record.to_pb())
    return tasks_pb2.EvalRecord(answer=record.to_pb())


def eval_dataset_to_pb(task: TaskName, dataset: EvalDatasetLike) -> tasks_pb2.EvalDataset:
    """An EvalDataset: a str is a path on the server; a sequence is sent inline."""
    if isinstance(dataset, str):
        return tasks_pb2.EvalDataset(path=dataset)
    if isinstance(dataset, os.PathLike):
        raise TypeError(
            "a path object is ambiguous here: pass str(path) for a file on the server, or "
            "read_eval_records(path, task) to send a local file's records"
        )
    records = [eval_record_to_pb(coerce_eval_record(task, r)) for r in dataset]
    return tasks_pb2.EvalDataset(inline=tasks_pb2.EvalRecords(records=records))


def _eval_dataset_from_pb(pb: tasks_pb2.EvalDataset) -> str | list[EvalRecord]:
    if pb.WhichOneof("source") == "path":
        return pb.path
    records: list[EvalRecord] = []
    for r in pb.inline.records:
        kind = r.WhichOneof("record")
        if kind == "classify":
            records.append(ClassifyExample.from_pb(r.classify))
        elif kind == "summarize":
            records.append(SummarizeExample.from_pb(r.summarize))
        elif kind == "answer":
            records.append(AnswerExample.from_pb(r.answer))
    return records


def parse_eval_records(lines: Iterable[str], task: TaskName) -> list[EvalRecord]:
    """Parse JSONL lines (the EvalDataset format of tasks.proto) into typed records; blank lines are skipped.

    Raises ValueError naming the 1-based line number of a line that is not a JSON object or lacks a key."""
    enum_value(TASKS, task, "task")
    records: list[EvalRecord] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(value, dict):
            raise ValueError(f"line {number}: expected a JSON object, not {type(value).__name__}")
        try:
            records.append(coerce_eval_record(task, value))
        except ValueError as err:
            raise ValueError(f"line {number}: {err}") from None
    return records


def read_eval_records(path: str | os.PathLike[str], task: TaskName) -> list[EvalRecord]:
    """Read a local JSONL dataset (see `parse_eval_records`), e.g. to send it inline to `tasks.evaluate()`."""
    with open(path, encoding="utf-8") as lines:
        return parse_eval_records(lines, task)


@dataclass(frozen=True)
class EvalExampleSource:
    """Where an evaluation configuration's examples come from (never from the items scored)."""

    split: EvalDatasetLike | None = None
    """Its own example split (a server path or records); None = the request's (`examples` or the held-out
    records)."""
    selection: ExampleSelectionName = "first"
    """"first": the split's first N examples for every item; "random": N drawn per item, seeded."""
    seed: int = 0
    """Seed for "random" (with the item index: runs are reproducible)."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.EvalExampleSource) -> EvalExampleSource:
        return cls(
            split=_eval_dataset_from_pb(pb.split) if pb.HasField("split") else None,
            selection=_name_of(EXAMPLE_SELECTIONS, pb.selection) or "first",
            seed=pb.seed,
        )


@dataclass(frozen=True)
class EvalConfiguration:
    """One way of running the task in an evaluation, compared against the others."""

    name: str = ""
    """A name for the results table; "" = generated from strategy, shots, model and method."""
    strategy: StrategyName | None = None
    """None = inferred from shots (0 zero-shot, 1 one-shot, more few-shot)."""
    shots: int | None = None
    """Examples per prompt (server default: 4 for few-shot). Fewer are used when they do not fit."""
    model: str = ""
    """Model name, alias or fine-tuned model ("" = the server's default)."""
    adapter: str = ""
    """A loaded LoRA adapter ("" = none)."""
    method: ClassifyMethodName | None = None
    """Classify only: "score" (default) or "generate"."""
    calibrate: bool = False
    """Classify only: contextual calibration (score method only)."""
    example_source: EvalExampleSource | None = None
    """Where the examples come from; None = the request's example split, first N."""
    sampling: Mapping[str, Any] | None = None
    """Generation parameters, keyword arguments of `inference.generate()` (max_new_tokens, temperature, ...);
    None = the request's."""

    @classmethod
    def coerce(cls, value: EvalConfiguration | Mapping[str, Any]) -> EvalConfiguration:
        """Accept an EvalConfiguration or a mapping of its fields ("example_source" may be a mapping too)."""
        if isinstance(value, EvalConfiguration):
            return value
        if isinstance(value, Mapping):
            fields = dict(value)
            source = fields.get("example_source")
            if isinstance(source, Mapping):
                fields["example_source"] = EvalExampleSource(**source)
            return cls(**fields)
        raise TypeError(f"a configuration is an EvalConfiguration or a mapping, not {type(value).__name__}")

    @classmethod
    def from_pb(cls, pb: tasks_pb2.EvalConfiguration) -> EvalConfiguration:
        return cls(
            name=pb.name,
            strategy=_name_of(STRATEGIES, pb.strategy),
            shots=pb.shots if pb.HasField("shots") else None,
            model=pb.model.model,
            adapter=pb.model.adapter,
            method=_name_of(CLASSIFY_METHODS, pb.method),
            calibrate=pb.calibrate,
            example_source=EvalExampleSource.from_pb(pb.example_source) if pb.HasField("example_source") else None,
            sampling=sampling_to_dict(pb.sampling) if pb.HasField("sampling") else None,
        )


def sampling_to_dict(pb: inference_pb2.SamplingParams) -> dict[str, Any]:
    """The fields of a SamplingParams that are set, as `inference.generate()` keyword arguments."""
    out: dict[str, Any] = {}
    for name in ("max_new_tokens", "top_k", "top_p", "repetition_penalty", "min_new_tokens", "ignore_eos"):
        if getattr(pb, name):
            out[name] = getattr(pb, name)
    for name in ("stop", "stop_token_ids"):
        if getattr(pb, name):
            out[name] = list(getattr(pb, name))
    for name in ("temperature", "seed", "logprobs", "skip_special_tokens"):
        if pb.HasField(name):
            out[name] = getattr(pb, name)
    return out


@dataclass(frozen=True)
class EvalProgress:
    """Progress of an evaluation (at each configuration's start, a few times a second, and at its end)."""

    configuration_index: int
    """0-based index of the configuration running."""
    configuration_name: str
    """Its name."""
    items_done: int
    """Items finished (scored or failed) in this configuration."""
    items_total: int
    """Items to score per configuration."""
    items_failed: int
    """Items that failed so far in this configuration."""
    elapsed_s: float
    """Seconds since the evaluation started."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.EvalProgress) -> EvalProgress:
        return cls(
            pb.configuration_index, pb.configuration_name, pb.items_done, pb.items_total, pb.items_failed, pb.elapsed_s
        )


@dataclass(frozen=True)
class EvalPrediction:
    """One item's prediction in one configuration (with return_predictions)."""

    configuration_index: int
    """0-based index of the configuration."""
    item_index: int
    """0-based index of the item among the items scored."""
    prediction: str
    """The summary or answer; classify: the top label."""
    predicted_labels: list[str]
    """Classify: the labels assigned."""
    unanswerable: bool
    """Answer: the model said unanswerable."""
    reference: str
    """The gold summary or answer; classify: the gold label(s) joined with ", "."""
    score: float | None
    """Classify 1 or 0, summarize ROUGE-L F1, answer token F1; None when the item failed."""
    latency_s: float
    """Seconds of the item's task call."""
    error: str
    """Why the item failed; "" when it did not."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.EvalPrediction) -> EvalPrediction:
        return cls(
            configuration_index=pb.configuration_index,
            item_index=pb.item_index,
            prediction=pb.prediction,
            predicted_labels=list(pb.predicted_labels),
            unanswerable=pb.unanswerable,
            reference=pb.reference,
            score=pb.score if pb.HasField("score") else None,
            latency_s=pb.latency_s,
            error=pb.error,
        )


@dataclass(frozen=True)
class LabelMetrics:
    """Classification metrics of one label."""

    label: str
    """The label."""
    precision: float
    """Correct assignments of the label / all its assignments."""
    recall: float
    """Correct assignments / gold occurrences."""
    f1: float
    """Harmonic mean of precision and recall."""
    support: int
    """Gold occurrences among the items scored."""


_TASK_METRICS = ("accuracy", "macro_f1", "rouge1", "rouge2", "rouge_l", "exact_match", "token_f1")


@dataclass(frozen=True)
class EvalMetrics:
    """Metrics of one configuration, over the items that did not fail. A task's own metrics are None for the
    other tasks."""

    items: int
    """Items scored."""
    items_failed: int
    """Items whose task call failed."""
    accuracy: float | None
    """Classify: fraction of items whose predicted label set equals the gold set."""
    macro_f1: float | None
    """Classify: unweighted mean of per-label F1."""
    rouge1: float | None
    """Summarize: mean ROUGE-1 F-measure."""
    rouge2: float | None
    """Summarize: mean ROUGE-2 F-measure."""
    rouge_l: float | None
    """Summarize: mean ROUGE-L F-measure."""
    exact_match: float | None
    """Answer: fraction of normalized answers equal to a normalized gold answer."""
    token_f1: float | None
    """Answer: mean SQuAD token F1 against the best gold answer."""
    mean_latency_s: float
    """Mean seconds per item's task call."""
    p95_latency_s: float
    """95th percentile of per-item seconds."""
    usage: Usage
    """Tokens used by the configuration in total."""
    mean_prompt_tokens: float
    """Mean prompt tokens per item."""
    mean_examples_used: float
    """Mean examples in the prompt per item (below `shots` when some did not fit)."""
    per_label: list[LabelMetrics]
    """Classify: per-label metrics, in label order."""
    total_s: float
    """Seconds the configuration took."""

    def metric(self, name: str) -> float | None:
        """A task metric by name ("accuracy", "macro_f1", "rouge1", "rouge2", "rouge_l", "exact_match",
        "token_f1"), e.g. the summary's primary_metric; None when not computed for this task."""
        if name not in _TASK_METRICS:
            raise KeyError(name)
        value: float | None = getattr(self, name)
        return value

    @classmethod
    def from_pb(cls, pb: tasks_pb2.EvalMetrics) -> EvalMetrics:
        task_metrics = {name: getattr(pb, name) if pb.HasField(name) else None for name in _TASK_METRICS}
        return cls(
            items=pb.items,
            items_failed=pb.items_failed,
            **task_metrics,
            mean_latency_s=pb.mean_latency_s,
            p95_latency_s=pb.p95_latency_s,
            usage=Usage.from_pb(pb.usage),
            mean_prompt_tokens=pb.mean_prompt_tokens,
            mean_examples_used=pb.mean_examples_used,
            per_label=[LabelMetrics(m.label, m.precision, m.recall, m.f1, m.support) for m in pb.per_label],
            total_s=pb.total_s,
        )


@dataclass(frozen=True)
class EvalConfigurationResult:
    """The outcome of one configuration."""

    configuration_index: int
    """0-based index of the configuration in the request."""
    name: str
    """Its name (as given, or generated)."""
    configuration: EvalConfiguration
    """The configuration as run, with defaults resolved (strategy, shots)."""
    model: str
    """The model that answered (name resolved)."""
    adapter: str
    """The adapter used ("" for none)."""
    metrics: EvalMetrics
    """The metrics."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.EvalConfigurationResult) -> EvalConfigurationResult:
        return cls(
            configuration_index=pb.configuration_index,
            name=pb.name,
            configuration=EvalConfiguration.from_pb(pb.configuration),
            model=pb.model.model,
            adapter=pb.model.adapter,
            metrics=EvalMetrics.from_pb(pb.metrics),
        )


@dataclass(frozen=True)
class EvalSummary:
    """The outcome of an evaluation: every configuration's result and the best one."""

    results: list[EvalConfigurationResult]
    """Every configuration's result, in request order."""
    primary_metric: str
    """The metric that ranks configurations: "accuracy", "rouge_l" or "token_f1"."""
    best_configuration_index: int
    """Index of the configuration with the highest primary metric (ties: the earlier)."""
    total_s: float
    """Seconds the whole evaluation took."""

    @property
    def best(self) -> EvalConfigurationResult:
        """The best configuration's result."""
        for result in self.results:
            if result.configuration_index == self.best_configuration_index:
                return result
        return self.results[self.best_configuration_index]

    @classmethod
    def from_pb(cls, pb: tasks_pb2.EvalSummary) -> EvalSummary:
        return cls(
            [EvalConfigurationResult.from_pb(r) for r in pb.results],
            pb.primary_metric,
            pb.best_configuration_index,
            pb.total_s,
        )


EvalEvent = Union[EvalProgress, EvalPrediction, EvalConfigurationResult, EvalSummary]  # noqa: UP007
"""What an evaluation stream yields: per configuration progress (and predictions), then its result; the summary
last."""


def eval_event_from_pb(pb: tasks_pb2.EvaluateResponse) -> EvalEvent | None:
    kind = pb.WhichOneof("event")
    if kind == "progress":
        return EvalProgress.from_pb(pb.progress)
    if kind == "prediction":
        return EvalPrediction.from_pb(pb.prediction)
    if kind == "result":
        return EvalConfigurationResult.from_pb(pb.result)
    if kind == "summary":
        return EvalSummary.from_pb(pb.summary)
    return None  # an event kind newer than this SDK

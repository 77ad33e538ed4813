"""Request building for the task resource, shared by `Tasks` and `AsyncTasks`: each method's keyword arguments
(taken from its locals()) become the task service's request, sampling arguments included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from genloom.resources.inference import _sampling_params, _side
from genloom.types._evaluation import EvalConfiguration, EvalExampleSource, eval_dataset_to_pb
from genloom.types._task_inputs import (
    CLASSIFY_METHODS,
    EXAMPLE_SELECTIONS,
    STRATEGIES,
    SUMMARY_FORMATS,
    TASKS,
    AnswerExample,
    AnswerItem,
    AnswerItemLike,
    ChunkingOptions,
    ClassifyExample,
    ClassLabel,
    ClassLabelLike,
    EvalDatasetLike,
    StrategyName,
    SummarizeExample,
    TaskName,
    enum_value,
)
from genloom.v1 import common_pb2, inference_pb2, tasks_pb2

LabelsLike = Sequence[ClassLabelLike] | Mapping[str, str]
"""Label names, ClassLabels, (name, description) pairs, or one mapping {name: description}."""
QuestionsLike = str | AnswerItem | Mapping[str, Any] | Sequence[AnswerItemLike]
"""One question (a str, an AnswerItem or a mapping), or a list of questions ((question, context) pairs too)."""

SAMPLING_OPTIONS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "seed",
    "min_new_tokens",
    "ignore_eos",
    "skip_special_tokens",
)
"""The `inference.generate()` keyword arguments the task methods take (logprobs: the task service sets them)."""


def _model(options: dict[str, Any]) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(model=options.pop("model") or "", adapter=options.pop("adapter") or "")


def _sampling(options: dict[str, Any]) -> inference_pb2.SamplingParams:
    """Pop the sampling arguments; anything left over in `options` is a caller's mistake."""
    sampling = _sampling_params(options)
    if options:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(options))}")
    return sampling


def _configuration_sampling(sampling: Mapping[str, Any]) -> inference_pb2.SamplingParams:
    unknown = set(sampling) - set(SAMPLING_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected sampling options: {', '.join(sorted(unknown))}")
    return _sampling_params(dict(sampling))


def _target_length(words: int | None, sentences: int | None) -> tasks_pb2.SummaryLength | None:
    if words is not None and sentences is not None:
        raise ValueError("give target_words or target_sentences, not both")
    if words is not None:
        return tasks_pb2.SummaryLength(unit=tasks_pb2.SUMMARY_LENGTH_UNIT_WORDS, value=words)
    if sentences is not None:
        return tasks_pb2.SummaryLength(unit=tasks_pb2.SUMMARY_LENGTH_UNIT_SENTENCES, value=sentences)
    return None


def _chunking(chunking: ChunkingOptions | None) -> tasks_pb2.ChunkingOptions | None:
    return chunking.to_pb() if chunking is not None else None


def _strategy(strategy: StrategyName | None) -> tasks_pb2.PromptStrategy:
    return enum_value(STRATEGIES, strategy, "strategy")


def _labels(labels: LabelsLike) -> list[tasks_pb2.ClassLabel]:
    if isinstance(labels, str):
        raise TypeError(f"labels must be a list of labels, not a str (did you mean {labels.split(',')!r}?)")
    if isinstance(labels, Mapping):
        return [ClassLabel(name, description).to_pb() for name, description in labels.items()]
    return [ClassLabel.coerce(label).to_pb() for label in labels]


def _batch(inputs: str | Sequence[str], what: str) -> list[str]:
    if isinstance(inputs, str):
        return [inputs]
    items = list(inputs)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{what}[{i}] must be a str, not {type(item).__name__}")
    return items


def _answer_items(questions: QuestionsLike, context: str | None) -> list[AnswerItem]:
    items: list[Any] = [questions] if isinstance(questions, str | AnswerItem | Mapping) else list(questions)
    return [AnswerItem(q, context or "") if isinstance(q, str) else AnswerItem.coerce(q) for q in items]


def _summarize_fields(options: dict[str, Any]) -> dict[str, Any]:
    """The fields SummarizeRequest and SummarizeStreamRequest share (they have the same numbers)."""
    fields = dict(
        model=_model(options),
        strategy=_strategy(options.pop("strategy")),
        examples=[SummarizeExample.coerce(e).to_pb() for e in options.pop("examples")],
        max_examples=options.pop("max_examples"),
        target_length=_target_length(options.pop("target_words"), options.pop("target_sentences")),
        format=enum_value(SUMMARY_FORMATS, options.pop("format"), "format"),
        instruction=options.pop("instruction") or "",
        chunking=_chunking(options.pop("chunking")),
        truncation=_side(options.pop("truncation")),
    )
    fields["sampling"] = _sampling(options)
    return fields


def _summarize_request(documents: str | Sequence[str], options: dict[str, Any]) -> tasks_pb2.SummarizeRequest:
    return tasks_pb2.SummarizeRequest(documents=_batch(documents, "documents"), **_summarize_fields(options))


def _summarize_stream_request(document: str, options: dict[str, Any]) -> tasks_pb2.SummarizeStreamRequest:
    if not isinstance(document, str):
        raise TypeError(f"summarize_stream() takes one document (a str), not {type(document).__name__}")
    return tasks_pb2.SummarizeStreamRequest(document=document, **_summarize_fields(options))


def _answer_request(questions: Any, options: dict[str, Any]) -> tasks_pb2.AnswerRequest:
    items = _answer_items(questions, options.pop("context"))
    request = tasks_pb2.AnswerRequest(
        model=_model(options),
        items=[item.to_pb() for item in items],
        strategy=_strategy(options.pop("strategy")),
        examples=[AnswerExample.coerce(e).to_pb() for e in options.pop("examples")],
        max_examples=options.pop("max_examples"),
        instruction=options.pop("instruction") or "",
        allow_unanswerable=options.pop("allow_unanswerable"),
        chunking=_chunking(options.pop("chunking")),
        truncation=_side(options.pop("truncation")),
    )
    request.sampling.CopyFrom(_sampling(options))
    return request


def _classify_request(texts: str | Sequence[str], options: dict[str, Any]) -> tasks_pb2.ClassifyRequest:
    request = tasks_pb2.ClassifyRequest(
        model=_model(options),
        texts=_batch(texts, "texts"),
        labels=_labels(options.pop("labels")),
        multi_label=options.pop("multi_label"),
        method=enum_value(CLASSIFY_METHODS, options.pop("method"), "method"),
        calibrate=options.pop("calibrate"),
        strategy=_strategy(options.pop("strategy")),
        examples=[ClassifyExample.coerce(e).to_pb() for e in options.pop("examples")],
        max_examples=options.pop("max_examples"),
        instruction=options.pop("instruction") or "",
        truncation=_side(options.pop("truncation")),
        normalize_by_length=options.pop("normalize_by_length"),
    )
    threshold = options.pop("threshold")
    if threshold is not None:
        request.threshold = threshold
    request.sampling.CopyFrom(_sampling(options))
    return request


def _example_source_to_pb(task: TaskName, source: EvalExampleSource) -> tasks_pb2.EvalExampleSource:
    pb = tasks_pb2.EvalExampleSource(
        selection=enum_value(EXAMPLE_SELECTIONS, source.selection, "selection"), seed=source.seed
    )
    if source.split is not None:
        pb.split.CopyFrom(eval_dataset_to_pb(task, source.split))
    return pb


def _configuration_to_pb(task: TaskName, configuration: EvalConfiguration) -> tasks_pb2.EvalConfiguration:
    c = configuration
    pb = tasks_pb2.EvalConfiguration(
        name=c.name,
        strategy=_strategy(c.strategy),
        model=common_pb2.ModelRef(model=c.model, adapter=c.adapter),
        method=enum_value(CLASSIFY_METHODS, c.method, "method"),
        calibrate=c.calibrate,
    )
    if c.shots is not None:
        pb.shots = c.shots
    if c.example_source is not None:
        pb.example_source.CopyFrom(_example_source_to_pb(task, c.example_source))
    if c.sampling is not None:
        pb.sampling.CopyFrom(_configuration_sampling(c.sampling))
    return pb


def _evaluate_request(task: TaskName, dataset: EvalDatasetLike, options: dict[str, Any]) -> tasks_pb2.EvaluateRequest:
    task_type = enum_value(TASKS, task, "task")
    configurations = options.pop("configurations")
    if configurations is None:
        configurations = [EvalConfiguration()]
    prompt_options = tasks_pb2.TaskPromptOptions(
        labels=_labels(options.pop("labels")),
        multi_label=options.pop("multi_label"),
        target_length=_target_length(options.pop("target_words"), options.pop("target_sentences")),
        format=enum_value(SUMMARY_FORMATS, options.pop("format"), "format"),
        allow_unanswerable=options.pop("allow_unanswerable"),
        instruction=options.pop("instruction") or "",
    )
    request = tasks_pb2.EvaluateRequest(
        task=task_type,
        dataset=eval_dataset_to_pb(task, dataset),
        holdout_examples=options.pop("holdout_examples"),
        configurations=[_configuration_to_pb(task, EvalConfiguration.coerce(c)) for c in configurations],
        options=prompt_options,
        chunking=_chunking(options.pop("chunking")),
        truncation=_side(options.pop("truncation")),
        limit=options.pop("limit"),
        concurrency=options.pop("concurrency"),
        return_predictions=options.pop("return_predictions"),
    )
    examples = options.pop("examples")
    if examples is not None:
        request.examples.CopyFrom(eval_dataset_to_pb(task, examples))
    request.sampling.CopyFrom(_sampling(options))
    return request


def _options(arguments: dict[str, Any], *positional: str) -> dict[str, Any]:
    """A method's keyword arguments from its locals(): without self, timeout and the positional ones."""
    return {k: v for k, v in arguments.items() if k not in ("self", "timeout", *positional)}

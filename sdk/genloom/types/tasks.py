"""Inputs and results of the task service: summarize, answer, classify, evaluate.

Inputs (examples, labels, chunking, evaluation configurations) are frozen dataclasses; wherever the SDK takes
one it also takes a plain tuple or mapping, converted by the type's `coerce()`. Mappings use the keys of the
JSONL dataset format of `EvalDataset` in tasks.proto, so one record shape works for examples, inline datasets
and files (`read_eval_records`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

from genloom.types.inference import _FINISH, _SIDE, Usage
from genloom.v1 import inference_pb2, tasks_pb2

TaskName = Literal["classify", "summarize", "answer"]
"""The task an evaluation (or a dataset record) is about."""
StrategyName = Literal["zero-shot", "one-shot", "few-shot"]
"""How many worked examples the prompt shows: none, the first that fits, or as many as fit."""
SummaryFormatName = Literal["prose", "bullets"]
ClassifyMethodName = Literal["score", "generate"]
ExampleSelectionName = Literal["first", "random"]

_Enum = TypeVar("_Enum", bound=int)

TASKS: dict[str, tasks_pb2.TaskType] = {
    "classify": tasks_pb2.TASK_TYPE_CLASSIFY,
    "summarize": tasks_pb2.TASK_TYPE_SUMMARIZE,
    "answer": tasks_pb2.TASK_TYPE_ANSWER,
}
STRATEGIES: dict[str | None, tasks_pb2.PromptStrategy] = {
    None: tasks_pb2.PROMPT_STRATEGY_UNSPECIFIED,
    "zero-shot": tasks_pb2.PROMPT_STRATEGY_ZERO_SHOT,
    "one-shot": tasks_pb2.PROMPT_STRATEGY_ONE_SHOT,
    "few-shot": tasks_pb2.PROMPT_STRATEGY_FEW_SHOT,
}
SUMMARY_FORMATS: dict[str | None, tasks_pb2.SummaryFormat] = {
    None: tasks_pb2.SUMMARY_FORMAT_UNSPECIFIED,
    "prose": tasks_pb2.SUMMARY_FORMAT_PROSE,
    "bullets": tasks_pb2.SUMMARY_FORMAT_BULLETS,
}
CLASSIFY_METHODS: dict[str | None, tasks_pb2.ClassifyMethod] = {
    None: tasks_pb2.CLASSIFY_METHOD_UNSPECIFIED,
    "score": tasks_pb2.CLASSIFY_METHOD_SCORE,
    "generate": tasks_pb2.CLASSIFY_METHOD_GENERATE,
}
EXAMPLE_SELECTIONS: dict[str, tasks_pb2.ExampleSelection] = {
    "first": tasks_pb2.EXAMPLE_SELECTION_FIRST,
    "random": tasks_pb2.EXAMPLE_SELECTION_RANDOM,
}
_STAGES = {
    tasks_pb2.SUMMARIZE_STAGE_MAP: "map",
    tasks_pb2.SUMMARIZE_STAGE_REDUCE: "reduce",
    tasks_pb2.SUMMARIZE_STAGE_FINAL: "final",
}


def enum_value(table: Mapping[Any, _Enum], value: Any, what: str) -> _Enum:
    """`table[value]`, or a ValueError that lists the accepted names."""
    try:
        return table[value]
    except (KeyError, TypeError):
        names = ", ".join(repr(k) for k in table if k is not None)
        raise ValueError(f"{what} must be one of {names}{' or None' if None in table else ''}, not {value!r}") from None


def _name_of(table: Mapping[Any, int], number: int) -> Any:
    """The name `table` maps to `number` (None for an unspecified enum value)."""
    return next((k for k, v in table.items() if v == number and k is not None), None)


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, not {type(value).__name__}")
    return value


def _texts(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{key!r} must be a list of strings, not {type(value).__name__}")
    return tuple(_text(v, f"{key}[{i}]") for i, v in enumerate(value))


def _required(record: Mapping[str, Any], key: str, kind: str) -> Any:
    if key not in record:
        raise ValueError(f"a {kind} record needs {key!r}")
    return record[key]


# --- inputs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SummarizeExample:
    """A worked summarization example (also a summarize record of an evaluation dataset)."""

    document: str
    """The example document."""
    summary: str
    """Its summary (the reference summary, in a dataset)."""

    @classmethod
    def coerce(cls, value: SummarizeExampleLike) -> SummarizeExample:
        """Accept a SummarizeExample, a (document, summary) pair or a mapping {"document", "summary"}."""
        if isinstance(value, SummarizeExample):
            return value
        if isinstance(value, Mapping):
            return cls(
                _text(_required(value, "document", "summarize"), "document"),
                _text(_required(value, "summary", "summarize"), "summary"),
            )
        if isinstance(value, tuple) and len(value) == 2:
            return cls(_text(value[0], "document"), _text(value[1], "summary"))
        raise TypeError(
            "a summarize example is a SummarizeExample, a (document, summary) pair or a mapping, "
            f"not {type(value).__name__}"
        )

    def to_pb(self) -> tasks_pb2.SummarizeExample:
        return tasks_pb2.SummarizeExample(document=self.document, summary=self.summary)

    @classmethod
    def from_pb(cls, pb: tasks_pb2.SummarizeExample) -> SummarizeExample:
        return cls(pb.document, pb.summary)


@dataclass(frozen=True)
class AnswerItem:
    """One question to answer, closed-book or from a context passage."""

    question: str
    """The question."""
    context: str = ""
    """A passage to answer from; "" = closed-book (from the model's own knowledge)."""

    @classmethod
    def coerce(cls, value: AnswerItemLike) -> AnswerItem:
        """Accept an AnswerItem, a question, a (question, context) pair or a mapping {"question", "context"?}."""
        if isinstance(value, AnswerItem):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            question = _text(_required(value, "question", "question"), "question")
            return cls(question, _text(value.get("context") or "", "context"))
        if isinstance(value, tuple) and len(value) == 2:
            return cls(_text(value[0], "question"), _text(value[1], "context"))
        raise TypeError(
            f"a question is a str, an AnswerItem, a (question, context) pair or a mapping, not {type(value).__name__}"
        )

    def to_pb(self) -> tasks_pb2.AnswerItem:
        return tasks_pb2.AnswerItem(question=self.question, context=self.context)


@dataclass(frozen=True)
class AnswerExample:
    """A worked question-answering example (also an answer record of an evaluation dataset)."""

    question: str
    """The question."""
    answer: str = ""
    """The answer; "" only when `unanswerable`."""
    context: str = ""
    """The passage the answer comes from; "" for a closed-book example."""
    unanswerable: bool = False
    """The context does not answer the question (shown in prompts only with allow_unanswerable)."""
    alternative_answers: Sequence[str] = ()
    """Evaluation only: other acceptable answers (exact match and token F1 take the best). Stored as a tuple."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "alternative_answers", tuple(self.alternative_answers))

    @classmethod
    def coerce(cls, value: AnswerExampleLike) -> AnswerExample:
        """Accept an AnswerExample, a (question, answer) pair, a (question, context, answer) triple, or a mapping
        {"question", "context"?, "answer"?, "answers"?: [...], "unanswerable"?: bool}: without "answer" the first
        of "answers" is the answer; the other entries of "answers" are alternatives."""
        if isinstance(value, AnswerExample):
            return value
        if isinstance(value, Mapping):
            question = _text(_required(value, "question", "answer"), "question")
            answers = list(_texts(value["answers"], "answers")) if "answers" in value else []
            unanswerable = value.get("unanswerable", False)
            if not isinstance(unanswerable, bool):
                raise ValueError(f"'unanswerable' must be true or false, not {unanswerable!r}")
            if "answer" in value:
                answer = _text(value["answer"], "answer")
            elif answers:
                answer = answers[0]
            elif unanswerable:
                answer = ""
            else:
                raise ValueError("an answer record needs 'answer', 'answers' or \"unanswerable\": true")
            return cls(
                question=question,
                answer=answer,
                context=_text(value.get("context") or "", "context"),
                unanswerable=unanswerable,
                alternative_answers=[a for a in answers if a != answer],
            )
        if isinstance(value, tuple) and len(value) == 2:
            return cls(_text(value[0], "question"), _text(value[1], "answer"))
        if isinstance(value, tuple) and len(value) == 3:
            return cls(_text(value[0], "question"), _text(value[2], "answer"), _text(value[1], "context"))
        raise TypeError(
            "an answer example is an AnswerExample, a (question, answer) pair, a (question, context, answer) "
            f"triple or a mapping, not {type(value).__name__}"
        )

    def to_pb(self) -> tasks_pb2.AnswerExample:
        return tasks_pb2.AnswerExample(
            question=self.question,
            context=self.context,
            answer=self.answer,
            unanswerable=self.unanswerable,
            alternative_answers=list(self.alternative_answers),
        )

    @classmethod
    def from_pb(cls, pb: tasks_pb2.AnswerExample) -> AnswerExample:
        return cls(pb.question, pb.answer, pb.context, pb.unanswerable, tuple(pb.alternative_answers))


@dataclass(frozen=True)
class ClassifyExample:
    """A worked classification example (also a classify record of an evaluation dataset)."""

    text: str
    """The example text."""
    labels: Sequence[str]
    """Its label(s): exactly one unless the request is multi-label. A single str is taken as one label; stored
    as a tuple."""

    def __post_init__(self) -> None:
        labels = (self.labels,) if isinstance(self.labels, str) else tuple(self.labels)
        object.__setattr__(self, "labels", labels)

    @classmethod
    def coerce(cls, value: ClassifyExampleLike) -> ClassifyExample:
        """Accept a ClassifyExample, a (text, label) or (text, [labels]) pair, or a mapping {"text", "label"} or
        {"text", "labels": [...]}."""
        if isinstance(value, ClassifyExample):
            return value
        if isinstance(value, Mapping):
            text = _text(_required(value, "text", "classify"), "text")
            if "labels" in value:
                return cls(text, _texts(value["labels"], "labels"))
            if "label" in value:
                return cls(text, (_text(value["label"], "label"),))
            raise ValueError("a classify record needs 'label' or 'labels'")
        if isinstance(value, tuple) and len(value) == 2:
            labels = value[1]
            return cls(
                _text(value[0], "text"),
                (labels,) if isinstance(labels, str) else _texts(labels, "labels"),
            )
        raise TypeError(
            "a classify example is a ClassifyExample, a (text, label or labels) pair or a mapping, "
            f"not {type(value).__name__}"
        )

    def to_pb(self) -> tasks_pb2.ClassifyExample:
        return tasks_pb2.ClassifyExample(text=self.text, labels=list(self.labels))

    @classmethod
    def from_pb(cls, pb: tasks_pb2.ClassifyExample) -> ClassifyExample:
        return cls(pb.text, tuple(pb.labels))


@dataclass(frozen=True)
class ClassLabel:
    """A label a text can get."""

    name: str
    """What the model scores or writes; unique within a request."""
    description: str = ""
    """Shown to the model next to the name ("name: description")."""

    @classmethod
    def coerce(cls, value: ClassLabelLike) -> ClassLabel:
        """Accept a ClassLabel, a name, a (name, description) pair or a mapping {"name", "description"?}."""
        if isinstance(value, ClassLabel):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            return cls(
                _text(_required(value, "name", "label"), "name"), _text(value.get("description") or "", "description")
            )
        if isinstance(value, tuple) and len(value) == 2:
            return cls(_text(value[0], "name"), _text(value[1], "description"))
        raise TypeError(
            f"a label is a name, a ClassLabel, a (name, description) pair or a mapping, not {type(value).__name__}"
        )

    def to_pb(self) -> tasks_pb2.ClassLabel:
        return tasks_pb2.ClassLabel(name=self.name, description=self.description)

    @classmethod
    def from_pb(cls, pb: tasks_pb2.ClassLabel) -> ClassLabel:
        return cls(pb.name, pb.description)


@dataclass(frozen=True)
class ChunkingOptions:
    """How the server handles a document or context that does not fit the context window whole."""

    disabled: bool = False
    """Never chunk: an input that does not fit is truncated per `truncation`, or rejected when that is None."""
    chunk_tokens: int = 0
    """Most tokens per chunk; 0 = the room left next to the instruction, examples and max_new_tokens."""
    overlap_tokens: int | None = None
    """Tokens shared by consecutive chunks (server default 64)."""
    max_chunks: int = 0
    """Most chunks per input (0 = the server's limit, default 64); more is an InvalidArgumentError."""

    def to_pb(self) -> tasks_pb2.ChunkingOptions:
        pb = tasks_pb2.ChunkingOptions(
            disabled=self.disabled, chunk_tokens=self.chunk_tokens, max_chunks=self.max_chunks
        )
        if self.overlap_tokens is not None:
            pb.overlap_tokens = self.overlap_tokens
        return pb


EvalRecord = Union[ClassifyExample, SummarizeExample, AnswerExample]  # noqa: UP007 - a runtime alias, valid on 3.10
"""One labeled item of an evaluation dataset: the example type of its task."""
SummarizeExampleLike = Union[SummarizeExample, tuple[str, str], Mapping[str, Any]]  # noqa: UP007
AnswerItemLike = Union[AnswerItem, str, tuple[str, str], Mapping[str, Any]]  # noqa: UP007
AnswerExampleLike = Union[AnswerExample, tuple[str, str], tuple[str, str, str], Mapping[str, Any]]  # noqa: UP007
ClassifyExampleLike = Union[ClassifyExample, tuple[str, Union[str, Sequence[str]]], Mapping[str, Any]]  # noqa: UP007
ClassLabelLike = Union[ClassLabel, str, tuple[str, str], Mapping[str, Any]]  # noqa: UP007
EvalRecordLike = Union[EvalRecord, tuple[Any, ...], Mapping[str, Any]]  # noqa: UP007
"""A typed record, or a tuple or mapping in the shape its task's example type accepts."""
EvalDatasetLike = Union[str, Sequence[EvalRecordLike]]  # noqa: UP007
"""A str: the path of a JSONL file on the server (inside GENLOOM_TASKS_DATA_ROOT); else the records themselves."""


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


# --- results -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextReport:
    """What the server's context-window policy did for one input. Token counts are the tokenizer's."""

    context_window: int
    """The model's context window."""
    prompt_tokens: int
    """Tokens of the prompt whose output is the result (the only one, the final reduce, or the winning chunk's)."""
    max_prompt_tokens: int
    """Tokens of the largest prompt sent for this input."""
    max_new_tokens: int
    """Tokens reserved for generation per call (0 for classify with the score method)."""
    input_tokens: int
    """Tokens of the input itself (document, context or text) before chunking or truncation."""
    examples_given: int
    """Examples the request gave."""
    examples_used: int
    """Examples in the prompt after the strategy, max_examples and fitting."""
    chunks: int
    """Chunks the input was split into: 1 when it fit whole, 0 without an input context (closed-book)."""
    chunk_tokens: int
    """Chunk size used; 0 when not chunked."""
    reduce_rounds: int
    """Summarize: reduce passes after the map pass."""
    truncated: bool
    """Whether the input was truncated."""
    truncation_side: str | None
    """"left" or "right" when truncated."""
    removed_tokens: int
    """Input tokens removed by truncation."""
    model_calls: int
    """Inference calls made for this input (generations and scorings, including calibration)."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.ContextReport) -> ContextReport:
        return cls(
            context_window=pb.context_window,
            prompt_tokens=pb.prompt_tokens,
            max_prompt_tokens=pb.max_prompt_tokens,
            max_new_tokens=pb.max_new_tokens,
            input_tokens=pb.input_tokens,
            examples_given=pb.examples_given,
            examples_used=pb.examples_used,
            chunks=pb.chunks,
            chunk_tokens=pb.chunk_tokens,
            reduce_rounds=pb.reduce_rounds,
            truncated=pb.truncated,
            truncation_side=_SIDE.get(pb.truncation_side),
            removed_tokens=pb.removed_tokens,
            model_calls=pb.model_calls,
        )


def _finish(value: inference_pb2.FinishReason) -> str:
    return _FINISH.get(value, "unspecified")


@dataclass(frozen=True)
class SummaryResult:
    """One document's summary."""

    summary: str
    """The summary (bullets: "- " lines separated by newlines)."""
    finish_reason: str
    """Why the final generation ended ("length": the summary may be cut short)."""
    context: ContextReport
    """What the context-window policy did."""
    usage: Usage
    """Tokens used for this document over all its calls."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.SummaryResult) -> SummaryResult:
        return cls(pb.summary, _finish(pb.finish_reason), ContextReport.from_pb(pb.context), Usage.from_pb(pb.usage))


@dataclass(frozen=True)
class Summaries:
    """Result of `tasks.summarize()`: one result per document, also for a single document."""

    model: str
    """The model that answered (name resolved)."""
    adapter: str
    """The adapter used ("" for none)."""
    results: list[SummaryResult]
    """One per document, in order."""
    usage: Usage
    """Sum of the results' usage."""

    @property
    def summaries(self) -> list[str]:
        """The summary texts, in document order."""
        return [r.summary for r in self.results]

    @classmethod
    def from_pb(cls, pb: tasks_pb2.SummarizeResponse) -> Summaries:
        return cls(
            pb.model.model, pb.model.adapter, [SummaryResult.from_pb(r) for r in pb.results], Usage.from_pb(pb.usage)
        )


@dataclass(frozen=True)
class SummarizeProgress:
    """Progress of the map/reduce passes over a long document (only sent when it was chunked)."""

    stage: str
    """"map" (summarizing chunks), "reduce" (combining chunk summaries) or "final"."""
    done: int
    """Summaries finished in this stage."""
    total: int
    """Summaries this stage needs."""
    reduce_round: int
    """1-based reduce pass during "reduce"; else 0."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.SummarizeProgress) -> SummarizeProgress:
        return cls(_STAGES.get(pb.stage, "unspecified"), pb.done, pb.total, pb.reduce_round)


@dataclass(frozen=True)
class SummaryDelta:
    """A piece of the final summary's text."""

    text: str
    """Text to append."""


@dataclass(frozen=True)
class SummarizeFinish:
    """The end of a streamed summary."""

    model: str
    """The model that answered (name resolved)."""
    adapter: str
    """The adapter used ("" for none)."""
    finish_reason: str
    """Why the final generation ended."""
    context: ContextReport
    """What the context-window policy did."""
    usage: Usage
    """Tokens used over all calls."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.SummarizeStreamFinish) -> SummarizeFinish:
        return cls(
            pb.model.model,
            pb.model.adapter,
            _finish(pb.finish_reason),
            ContextReport.from_pb(pb.context),
            Usage.from_pb(pb.usage),
        )


SummarizeEvent = Union[SummarizeProgress, SummaryDelta, SummarizeFinish]  # noqa: UP007
"""What a summary stream yields: progress (chunked documents only), then deltas, then the finish."""


def summarize_event_from_pb(pb: tasks_pb2.SummarizeStreamResponse) -> SummarizeEvent | None:
    kind = pb.WhichOneof("event")
    if kind == "progress":
        return SummarizeProgress.from_pb(pb.progress)
    if kind == "delta":
        return SummaryDelta(pb.delta.text)
    if kind == "finish":
        return SummarizeFinish.from_pb(pb.finish)
    return None  # an event kind newer than this SDK


@dataclass(frozen=True)
class SupportingChunk:
    """The part of the context that produced an answer."""

    chunk_index: int
    """0-based chunk index (0 when the context was not chunked)."""
    text: str
    """The chunk's text."""
    start: int
    """Start in the context, in code points (Python string indices)."""
    end: int
    """End in the context (exclusive): `context[start:end] == text`."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.SupportingChunk) -> SupportingChunk:
        return cls(pb.chunk_index, pb.text, pb.start, pb.end)


@dataclass(frozen=True)
class AnswerResult:
    """One question's answer."""

    answer: str
    """The answer; "" when unanswerable."""
    unanswerable: bool
    """The model found no support for an answer (only with allow_unanswerable)."""
    support: SupportingChunk | None
    """The chunk that produced the answer; None for closed-book questions and unanswerable results."""
    score: float
    """Mean token log-probability of the answer (at most 0); what picks the best chunk's answer."""
    finish_reason: str
    """Why the chosen answer's generation ended."""
    context: ContextReport
    """What the context-window policy did."""
    usage: Usage
    """Tokens used for this question over all its calls."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.AnswerResult) -> AnswerResult:
        return cls(
            answer=pb.answer,
            unanswerable=pb.unanswerable,
            support=SupportingChunk.from_pb(pb.support) if pb.HasField("support") else None,
            score=pb.score,
            finish_reason=_finish(pb.finish_reason),
            context=ContextReport.from_pb(pb.context),
            usage=Usage.from_pb(pb.usage),
        )


@dataclass(frozen=True)
class Answers:
    """Result of `tasks.answer()`: one result per question, also for a single question."""

    model: str
    """The model that answered (name resolved)."""
    adapter: str
    """The adapter used ("" for none)."""
    results: list[AnswerResult]
    """One per question, in order."""
    usage: Usage
    """Sum of the results' usage."""

    @property
    def answers(self) -> list[str]:
        """The answer texts, in question order ("" where unanswerable)."""
        return [r.answer for r in self.results]

    @classmethod
    def from_pb(cls, pb: tasks_pb2.AnswerResponse) -> Answers:
        return cls(
            pb.model.model, pb.model.adapter, [AnswerResult.from_pb(r) for r in pb.results], Usage.from_pb(pb.usage)
        )


@dataclass(frozen=True)
class LabelProbability:
    """One label's probability for one text."""

    label: str
    """The label's name."""
    probability: float
    """Calibrated when calibrate was set. Single-label: a text's probabilities sum to 1; multi-label: each in
    [0, 1] on its own; generate method: 1 or 0."""
    logprob: float
    """Score method: the label's summed (or length-normalized) log-probability; multi-label: that of " Yes";
    0 for the generate method."""
    uncalibrated_probability: float
    """With calibrate: the probability before calibration; else equal to `probability`."""
    content_free_probability: float
    """With calibrate: the calibration prior from content-free inputs; else 0."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.LabelProbability) -> LabelProbability:
        return cls(pb.label, pb.probability, pb.logprob, pb.uncalibrated_probability, pb.content_free_probability)


@dataclass(frozen=True)
class ClassifyResult:
    """One text's classification."""

    label: str
    """The most probable label ("" when the generate method matched none)."""
    labels: list[str]
    """The labels assigned: single-label [label]; multi-label those at or over the threshold, most probable first."""
    probabilities: list[LabelProbability]
    """A probability for every label, in the request's label order."""
    generated_text: str
    """Generate method: the model's raw output; else ""."""
    context: ContextReport
    """What the context-window policy did."""
    usage: Usage
    """Tokens used for this text (including calibration calls)."""

    def probability(self, label: str) -> float:
        """The probability of `label` (KeyError if it is not one of the request's labels)."""
        for p in self.probabilities:
            if p.label == label:
                return p.probability
        raise KeyError(label)

    def as_dict(self) -> dict[str, float]:
        """{label: probability} in label order."""
        return {p.label: p.probability for p in self.probabilities}

    @classmethod
    def from_pb(cls, pb: tasks_pb2.ClassifyResult) -> ClassifyResult:
        return cls(
            label=pb.label,
            labels=list(pb.labels),
            probabilities=[LabelProbability.from_pb(p) for p in pb.probabilities],
            generated_text=pb.generated_text,
            context=ContextReport.from_pb(pb.context),
            usage=Usage.from_pb(pb.usage),
        )


@dataclass(frozen=True)
class Classifications:
    """Result of `tasks.classify()`: one result per text, also for a single text."""

    model: str
    """The model that answered (name resolved)."""
    adapter: str
    """The adapter used ("" for none)."""
    results: list[ClassifyResult]
    """One per text, in order."""
    usage: Usage
    """Sum of the results' usage."""

    @property
    def labels(self) -> list[str]:
        """The most probable label of each text, in order."""
        return [r.label for r in self.results]

    @classmethod
    def from_pb(cls, pb: tasks_pb2.ClassifyResponse) -> Classifications:
        return cls(
            pb.model.model, pb.model.adapter, [ClassifyResult.from_pb(r) for r in pb.results], Usage.from_pb(pb.usage)
        )


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

"""Inputs of the task service and their enum tables: examples, labels, questions, chunking options.

Inputs are frozen dataclasses; wherever the SDK takes one it also takes a plain tuple or mapping, converted by the
type's `coerce()`. Mappings use the keys of the JSONL dataset format of `EvalDataset` in tasks.proto. Used by the
evaluation and fine-tuning types and the task resource; `genloom.types.tasks` re-exports the public names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

from genloom.v1 import tasks_pb2

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

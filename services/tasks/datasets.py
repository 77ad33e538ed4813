"""Evaluate's datasets: an EvalDataset (inline records or a JSONL file under the data root) -> checked EvalRecords.

Every problem is the client's to fix, so each one is an INVALID_ARGUMENT naming the request field and, for files,
the 1-based line; nothing bad reaches the evaluator. Reading files is confined to GENLOOM_TASKS_DATA_ROOT because
the path comes from the client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from genloom.services.server.errors import FieldViolation, InvalidArgument, NotFound, quote
from genloom.services.server.paths import resolve_within
from genloom.v1 import tasks_pb2

# The EvalRecord oneof case each task's records use.
RECORD_KIND: dict[int, str] = {
    tasks_pb2.TASK_TYPE_CLASSIFY: "classify",
    tasks_pb2.TASK_TYPE_SUMMARIZE: "summarize",
    tasks_pb2.TASK_TYPE_ANSWER: "answer",
}


def _record_kind(task: int) -> str:
    kind = RECORD_KIND.get(task)
    if kind is None:
        raise InvalidArgument.field("task", "required: TASK_TYPE_CLASSIFY, TASK_TYPE_SUMMARIZE or TASK_TYPE_ANSWER")
    return kind


def _blank(text: str) -> bool:
    return not text.strip()


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------------------------- JSONL


class _LineError(Exception):
    """What is wrong with one line; parse_jsonl adds the line number and the field."""


def _required_string(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise _LineError(f"missing key {json.dumps(key)}")
    value = obj[key]
    if not isinstance(value, str):
        raise _LineError(f"{json.dumps(key)} must be a string")
    if _blank(value):
        raise _LineError(f"{json.dumps(key)} is empty")
    return value


def _optional_string(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _LineError(f"{json.dumps(key)} must be a string")
    return value


def _string_list(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and not _blank(v) for v in value):
        raise _LineError(f"{json.dumps(key)} must be a list of non-empty strings")
    return _unique(value)


def _classify_record(obj: dict[str, Any]) -> tasks_pb2.EvalRecord:
    text = _required_string(obj, "text")
    if "label" in obj and "labels" in obj:
        raise _LineError('has both "label" and "labels": use one')
    if "labels" in obj:
        labels = _string_list("labels", obj["labels"])
        if not labels:
            raise _LineError('"labels" is empty')
    elif "label" in obj:
        labels = [_required_string(obj, "label")]
    else:
        raise _LineError('missing key "label" (or "labels")')
    return tasks_pb2.EvalRecord(classify=tasks_pb2.ClassifyExample(text=text, labels=labels))


def _summarize_record(obj: dict[str, Any]) -> tasks_pb2.EvalRecord:
    document = _required_string(obj, "document")
    summary = _required_string(obj, "summary")
    return tasks_pb2.EvalRecord(summarize=tasks_pb2.SummarizeExample(document=document, summary=summary))


def _answer_record(obj: dict[str, Any]) -> tasks_pb2.EvalRecord:
    question = _required_string(obj, "question")
    context = _optional_string(obj, "context")
    answer = _optional_string(obj, "answer")
    # SQuAD 2.0 exports write "answers": [] for unanswerable questions, so an empty list is fine here.
    more = obj.get("answers")
    answers = _unique(([] if _blank(answer) else [answer]) + ([] if more is None else _string_list("answers", more)))
    unanswerable = obj.get("unanswerable", False)
    if unanswerable is None:
        unanswerable = False
    if not isinstance(unanswerable, bool):
        raise _LineError('"unanswerable" must be true or false')
    if unanswerable and answers:
        raise _LineError('"unanswerable" is true but answers are given: an item is one or the other')
    if not unanswerable and not answers:
        raise _LineError('no answer: give "answer", "answers" or "unanswerable": true')
    return tasks_pb2.EvalRecord(
        answer=tasks_pb2.AnswerExample(
            question=question,
            context=context,
            answer=answers[0] if answers else "",
            unanswerable=unanswerable,
            alternative_answers=answers[1:],
        )
    )


_PARSERS = {"classify": _classify_record, "summarize": _summarize_record, "answer": _answer_record}


def _dataset_error(source: str, field: str, description: str) -> InvalidArgument:
    """'<source> <description>' for people, the description alone on the field for programs."""
    return InvalidArgument(f"{source} {description}", [FieldViolation(field, description)])


def parse_jsonl(
    text_lines: Iterable[str], task: int, *, source: str, max_items: int, field: str = "dataset"
) -> list[tasks_pb2.EvalRecord]:
    """Parse JSONL lines (keys as in EvalDataset's comment) into records of `task`'s kind.

    Errors are INVALID_ARGUMENT with a message like 'dataset line 7: missing key "label"' (`source`, then the
    1-based line, blank lines counted) and a violation on `field`. Reading stops at the first record past
    `max_items`, so an oversized file is refused without parsing all of it.
    """
    parse = _PARSERS[_record_kind(task)]
    records: list[tasks_pb2.EvalRecord] = []
    for number, line in enumerate(text_lines, start=1):
        if _blank(line):
            continue
        if len(records) == max_items:
            raise _dataset_error(source, field, f"has more than {max_items} records (the limit)")
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise _LineError(f"not valid JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise _LineError("not valid JSON (nested too deeply)") from None
            if not isinstance(obj, dict):
                raise _LineError("not a JSON object")
            records.append(parse(obj))
        except _LineError as err:
            raise _dataset_error(source, field, f"line {number}: {err}") from None
    if not records:
        raise _dataset_error(source, field, "has no records")
    return records


# ------------------------------------------------------------------------------------------------ inline records


def _check_classify(record: tasks_pb2.ClassifyExample, at: str) -> Iterator[FieldViolation]:
    if _blank(record.text):
        yield FieldViolation(f"{at}.text", "must not be empty")
    if not record.labels:
        yield FieldViolation(f"{at}.labels", "must contain at least one label")
    for j, label in enumerate(record.labels):
        if _blank(label):
            yield FieldViolation(f"{at}.labels[{j}]", "must not be empty")


def _check_summarize(record: tasks_pb2.SummarizeExample, at: str) -> Iterator[FieldViolation]:
    if _blank(record.document):
        yield FieldViolation(f"{at}.document", "must not be empty")
    if _blank(record.summary):
        yield FieldViolation(f"{at}.summary", "must not be empty")


def _check_answer(record: tasks_pb2.AnswerExample, at: str) -> Iterator[FieldViolation]:
    if _blank(record.question):
        yield FieldViolation(f"{at}.question", "must not be empty")
    for j, alternative in enumerate(record.alternative_answers):
        if _blank(alternative):
            yield FieldViolation(f"{at}.alternative_answers[{j}]", "must not be empty")
    has_answer = not _blank(record.answer)
    if record.unanswerable and (has_answer or record.alternative_answers):
        yield FieldViolation(f"{at}.unanswerable", "is set but answers are given: an item is one or the other")
    elif not record.unanswerable and not has_answer:
        yield FieldViolation(f"{at}.answer", "must not be empty unless unanswerable is set")


# Keyed by the record kind; each takes that kind of record (read from the EvalRecord by name, hence Any).
_CHECKS: dict[str, Callable[[Any, str], Iterator[FieldViolation]]] = {
    "classify": _check_classify,
    "summarize": _check_summarize,
    "answer": _check_answer,
}


def validate_records(records: Sequence[tasks_pb2.EvalRecord], task: int, *, field: str) -> None:
    """Check inline records against `task`: one INVALID_ARGUMENT listing every bad field, e.g.
    "dataset.inline.records[3].classify.text" for field="dataset.inline.records"."""
    kind = _record_kind(task)
    if not records:
        raise InvalidArgument.field(field, "must contain at least one record")
    task_name = tasks_pb2.TaskType.Name(task)
    violations: list[FieldViolation] = []
    for i, record in enumerate(records):
        at = f"{field}[{i}]"
        which = record.WhichOneof("record")
        if which is None:
            violations.append(FieldViolation(at, f"is empty: set {kind}"))
        elif which != kind:
            violations.append(FieldViolation(f"{at}.{which}", f"{task_name} needs {kind} records, not {which}"))
        else:
            violations.extend(_CHECKS[kind](getattr(record, kind), f"{at}.{kind}"))
    InvalidArgument.raise_for(violations)


# ---------------------------------------------------------------------------------------------------------- files


def resolve_path(root: Path | None, path: str, *, field: str) -> Path:
    """The file `path` names, with symlinks resolved, provided it lies inside `root` (the data root; None = reading
    files is off). A relative path is taken relative to the root.

    Containment is checked before existence, so a client cannot probe which files exist outside the root.
    """
    roots = [] if root is None or str(root) == "" else [root]
    return resolve_within(path, roots, field=field, kind="file", setting="GENLOOM_TASKS_DATA_ROOT")


def _decoded_lines(lines: Iterable[bytes], *, source: str, field: str) -> Iterator[str]:
    for number, raw in enumerate(lines, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark, as some editors on Windows write
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _dataset_error(source, field, f"line {number}: not valid UTF-8 (byte {err.start + 1})") from None


def load_dataset(
    dataset: tasks_pb2.EvalDataset, task: int, *, data_root: Path | None, max_items: int, field: str
) -> list[tasks_pb2.EvalRecord]:
    """The dataset's records, checked against `task` (blocking: reads files; see load_dataset_async).

    `field` is the dataset's place in the request ("dataset", "examples", ...): it prefixes messages and names
    the violations ("dataset.path", "dataset.inline.records[3].classify.text").
    """
    _record_kind(task)
    source = dataset.WhichOneof("source")
    if source == "inline":
        records = list(dataset.inline.records)
        if len(records) > max_items:
            raise InvalidArgument.field(
                f"{field}.inline.records", f"has {len(records)} records; the limit is {max_items}"
            )
        validate_records(records, task, field=f"{field}.inline.records")
        return records
    if source == "path":
        path_field = f"{field}.path"
        path = resolve_path(data_root, dataset.path, field=path_field)
        try:
            file = path.open("rb")
        except FileNotFoundError:  # removed since resolve_path looked
            raise NotFound(f"{path_field}: {quote(dataset.path)} does not exist") from None
        except OSError as err:
            raise InvalidArgument.field(path_field, f"{quote(dataset.path)} cannot be read: {err.strerror}") from None
        with file:
            lines = _decoded_lines(file, source=field, field=path_field)
            return parse_jsonl(lines, task, source=field, max_items=max_items, field=path_field)
    raise InvalidArgument.field(field, "required: set inline records or a path")


async def load_dataset_async(
    dataset: tasks_pb2.EvalDataset, task: int, *, data_root: Path | None, max_items: int, field: str
) -> list[tasks_pb2.EvalRecord]:
    """load_dataset in a worker thread, so reading a large file does not stall the event loop."""
    return await asyncio.to_thread(load_dataset, dataset, task, data_root=data_root, max_items=max_items, field=field)


# ------------------------------------------------------------------------------------------------------- golds


def gold_labels(record: tasks_pb2.EvalRecord) -> list[str]:
    """A Classify record's gold labels, each once, in the record's order."""
    if record.WhichOneof("record") != "classify":
        raise ValueError("gold_labels needs a classify record")
    return _unique(record.classify.labels)


def gold_answers(record: tasks_pb2.EvalRecord) -> list[str]:
    """An Answer record's acceptable answers, the main one first; empty for an unanswerable item."""
    if record.WhichOneof("record") != "answer":
        raise ValueError("gold_answers needs an answer record")
    item = record.answer
    return _unique(a for a in (item.answer, *item.alternative_answers) if not _blank(a))

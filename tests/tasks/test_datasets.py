"""Evaluate datasets: JSONL files and inline records -> EvalRecords, and every way a dataset can be refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from genloom.services.server.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied
from genloom.services.tasks.datasets import (
    gold_answers,
    gold_labels,
    load_dataset,
    load_dataset_async,
    parse_jsonl,
    resolve_path,
    validate_records,
)
from genloom.v1 import tasks_pb2

CLASSIFY = tasks_pb2.TASK_TYPE_CLASSIFY
SUMMARIZE = tasks_pb2.TASK_TYPE_SUMMARIZE
ANSWER = tasks_pb2.TASK_TYPE_ANSWER


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load(root: Path | None, path: str, task: int, *, max_items: int = 100) -> list[tasks_pb2.EvalRecord]:
    dataset = tasks_pb2.EvalDataset(path=path)
    return load_dataset(dataset, task, data_root=root, max_items=max_items, field="dataset")


def inline(*records: tasks_pb2.EvalRecord) -> tasks_pb2.EvalDataset:
    dataset = tasks_pb2.EvalDataset()
    dataset.inline.SetInParent()
    dataset.inline.records.extend(records)
    return dataset


def classify(text: str, *labels: str) -> tasks_pb2.EvalRecord:
    return tasks_pb2.EvalRecord(classify=tasks_pb2.ClassifyExample(text=text, labels=labels))


# ------------------------------------------------------------------------------------------------- good files


def test_classify_file_with_single_and_multi_labels(tmp_path: Path) -> None:
    write(
        tmp_path / "sentiment.jsonl",
        [
            json.dumps({"text": "Great film!", "label": "positive", "id": 1}),  # unknown keys are ignored
            "",
            json.dumps({"text": "Dull, but well shot.", "labels": ["negative", "mixed", "negative"]}),
        ],
    )
    records = load(tmp_path, "sentiment.jsonl", CLASSIFY)
    assert records == [classify("Great film!", "positive"), classify("Dull, but well shot.", "negative", "mixed")]
    assert gold_labels(records[1]) == ["negative", "mixed"]


def test_summarize_file(tmp_path: Path) -> None:
    write(
        tmp_path / "news" / "cnn.jsonl",
        [
            json.dumps({"document": "A long article.", "summary": "Short."}),
            json.dumps({"document": "B", "summary": "b"}),
        ],
    )
    records = load(tmp_path, "news/cnn.jsonl", SUMMARIZE)
    assert [(r.summarize.document, r.summarize.summary) for r in records] == [("A long article.", "Short."), ("B", "b")]


def test_answer_file_with_alternatives_closed_book_and_unanswerable_items(tmp_path: Path) -> None:
    write(
        tmp_path / "qa.jsonl",
        [
            json.dumps(
                {"question": "Capital?", "context": "Paris is...", "answer": "Paris", "answers": ["Paris", "paris"]}
            ),
            json.dumps({"question": "Who?", "answers": ["Ada", "Ada Lovelace"]}),
            json.dumps({"question": "When?", "context": "No dates here.", "unanswerable": True, "answers": []}),
            json.dumps({"question": "Where?", "context": None, "answer": "Rome", "unanswerable": False}),
        ],
    )
    records = load(tmp_path, "qa.jsonl", ANSWER)
    first, second, third, fourth = (r.answer for r in records)
    assert (first.answer, list(first.alternative_answers), first.context) == ("Paris", ["paris"], "Paris is...")
    assert (second.answer, list(second.alternative_answers), second.context) == ("Ada", ["Ada Lovelace"], "")
    assert third.unanswerable and third.answer == "" and not third.alternative_answers
    assert (fourth.answer, fourth.context, fourth.unanswerable) == ("Rome", "", False)
    assert gold_answers(records[0]) == ["Paris", "paris"]
    assert gold_answers(records[2]) == []


def test_byte_order_mark_and_windows_line_ends_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "win.jsonl").write_bytes(
        b'\xef\xbb\xbf{"text": "a", "label": "x"}\r\n\r\n{"text": "b", "label": "y"}\r\n'
    )
    assert load(tmp_path, "win.jsonl", CLASSIFY) == [classify("a", "x"), classify("b", "y")]


async def test_load_dataset_async_reads_the_file(tmp_path: Path) -> None:
    write(tmp_path / "d.jsonl", [json.dumps({"document": "d", "summary": "s"})])
    records = await load_dataset_async(
        tasks_pb2.EvalDataset(path="d.jsonl"), SUMMARIZE, data_root=tmp_path, max_items=10, field="dataset"
    )
    assert records == [tasks_pb2.EvalRecord(summarize=tasks_pb2.SummarizeExample(document="d", summary="s"))]


# ------------------------------------------------------------------------------------------------- bad lines

CLASSIFY_OK = json.dumps({"text": "fine", "label": "x"})


@pytest.mark.parametrize(
    ("task", "bad_line", "problem"),
    [
        (CLASSIFY, {"text": "b"}, 'missing key "label" (or "labels")'),
        (CLASSIFY, {"label": "x"}, 'missing key "text"'),
        (CLASSIFY, {"text": "b", "label": 3}, '"label" must be a string'),
        (CLASSIFY, {"text": "b", "label": None}, '"label" must be a string'),
        (CLASSIFY, {"text": "b", "label": ""}, '"label" is empty'),
        (CLASSIFY, {"text": "", "label": "x"}, '"text" is empty'),
        (CLASSIFY, {"text": " \t", "label": "x"}, '"text" is empty'),
        (CLASSIFY, {"text": "b", "labels": "x"}, '"labels" must be a list of non-empty strings'),
        (CLASSIFY, {"text": "b", "labels": ["x", ""]}, '"labels" must be a list of non-empty strings'),
        (CLASSIFY, {"text": "b", "labels": ["x", 2]}, '"labels" must be a list of non-empty strings'),
        (CLASSIFY, {"text": "b", "labels": []}, '"labels" is empty'),
        (CLASSIFY, {"text": "b", "label": "x", "labels": ["x"]}, 'has both "label" and "labels": use one'),
        (CLASSIFY, ["text", "label"], "not a JSON object"),
        (SUMMARIZE, {"document": "d"}, 'missing key "summary"'),
        (SUMMARIZE, {"document": ["d"], "summary": "s"}, '"document" must be a string'),
        (ANSWER, {"context": "c", "answer": "a"}, 'missing key "question"'),
        (ANSWER, {"question": "q"}, 'no answer: give "answer", "answers" or "unanswerable": true'),
        (ANSWER, {"question": "q", "answer": "", "answers": []}, 'no answer: give "answer", "answers" or'),
        (ANSWER, {"question": "q", "answer": 42}, '"answer" must be a string'),
        (ANSWER, {"question": "q", "context": 1, "answer": "a"}, '"context" must be a string'),
        (ANSWER, {"question": "q", "answers": "a"}, '"answers" must be a list of non-empty strings'),
        (ANSWER, {"question": "q", "unanswerable": "yes"}, '"unanswerable" must be true or false'),
        (ANSWER, {"question": "q", "unanswerable": 1}, '"unanswerable" must be true or false'),
        (ANSWER, {"question": "q", "answer": "a", "unanswerable": True}, '"unanswerable" is true but answers are'),
    ],
)
def test_bad_line_is_refused_with_its_line_number(tmp_path: Path, task: int, bad_line: object, problem: str) -> None:
    good = {
        CLASSIFY: CLASSIFY_OK,
        SUMMARIZE: json.dumps({"document": "d", "summary": "s"}),
        ANSWER: json.dumps({"question": "q", "answer": "a"}),
    }[task]
    # Line 3 is blank and still counts: the bad record is on line 5.
    write(tmp_path / "bad.jsonl", [good, good, "", good, json.dumps(bad_line), good])
    with pytest.raises(InvalidArgument) as caught:
        load(tmp_path, "bad.jsonl", task)
    assert caught.value.message.startswith(f"dataset line 5: {problem}")
    [violation] = caught.value.violations
    assert violation.field == "dataset.path"
    assert violation.description.startswith(f"line 5: {problem}")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"text": "a", ', "not valid JSON (Expecting property name enclosed in double quotes at column 15)"),
        ("{'text': 'a', 'label': 'x'}", "not valid JSON"),
        ("[" * 100_000, "not valid JSON (nested too deeply)"),
        ('"just a string"', "not a JSON object"),
        ("null", "not a JSON object"),
    ],
)
def test_line_that_is_not_a_json_object(line: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_jsonl([CLASSIFY_OK, line], CLASSIFY, source="examples", max_items=10, field="examples.path")
    assert caught.value.message.startswith(f"examples line 2: {problem}")
    assert caught.value.violations[0].field == "examples.path"


def test_invalid_utf8_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "latin1.jsonl").write_bytes(
        CLASSIFY_OK.encode() + b"\n\n" + '{"text": "café", "label": "x"}'.encode("latin-1") + b"\n"
    )
    with pytest.raises(InvalidArgument) as caught:
        load(tmp_path, "latin1.jsonl", CLASSIFY)
    assert caught.value.message == "dataset line 3: not valid UTF-8 (byte 14)"
    assert caught.value.violations == (FieldViolation("dataset.path", "line 3: not valid UTF-8 (byte 14)"),)


def test_more_records_than_the_limit_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "three.jsonl", [CLASSIFY_OK] * 3 + ["", ""])
    assert len(load(tmp_path, "three.jsonl", CLASSIFY, max_items=3)) == 3  # trailing blank lines are no records
    with pytest.raises(InvalidArgument) as caught:
        load(tmp_path, "three.jsonl", CLASSIFY, max_items=2)
    assert caught.value.message == "dataset has more than 2 records (the limit)"
    assert caught.value.violations == (FieldViolation("dataset.path", "has more than 2 records (the limit)"),)


def test_the_limit_is_checked_before_parsing_lines_past_it() -> None:
    with pytest.raises(InvalidArgument, match="more than 1 records"):
        parse_jsonl([CLASSIFY_OK, "not json"], CLASSIFY, source="dataset", max_items=1)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_file_without_records_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / "empty.jsonl").write_text(content)
    with pytest.raises(InvalidArgument) as caught:
        load(tmp_path, "empty.jsonl", CLASSIFY)
    assert caught.value.message == "dataset has no records"


def test_task_must_be_set() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_jsonl([CLASSIFY_OK], tasks_pb2.TASK_TYPE_UNSPECIFIED, source="dataset", max_items=10)
    assert caught.value.violations[0].field == "task"


# ---------------------------------------------------------------------------------------------------- paths


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data root with one dataset, next to a file outside it."""
    write(tmp_path / "root" / "data.jsonl", [CLASSIFY_OK])
    write(tmp_path / "secret.jsonl", [CLASSIFY_OK])
    return tmp_path / "root"


@pytest.mark.parametrize("root_setting", [None, ""])
def test_reading_files_is_disabled_without_a_data_root(root: Path, root_setting: Path | None) -> None:
    with pytest.raises(PermissionDenied) as caught:
        load(root_setting, "data.jsonl", CLASSIFY)
    assert "GENLOOM_TASKS_DATA_ROOT" in caught.value.message


def test_paths_inside_the_root_relative_or_absolute(root: Path) -> None:
    assert resolve_path(root, "data.jsonl", field="dataset.path") == (root / "data.jsonl").resolve()
    assert resolve_path(root, "./sub/../data.jsonl", field="dataset.path") == (root / "data.jsonl").resolve()
    assert resolve_path(root, str(root / "data.jsonl"), field="dataset.path") == (root / "data.jsonl").resolve()


@pytest.mark.parametrize("path", ["../secret.jsonl", "../missing.jsonl", "/etc/passwd", "sub/../../secret.jsonl"])
def test_paths_outside_the_root_are_denied_whether_or_not_they_exist(root: Path, path: str) -> None:
    with pytest.raises(PermissionDenied) as caught:
        load(root, path, CLASSIFY)
    assert caught.value.message == (
        f"dataset.path: {path!r} is outside the directories this server allows (GENLOOM_TASKS_DATA_ROOT)"
    )
    assert str(root) not in caught.value.message  # the server's layout is not shown to clients


def test_symlinks_are_followed_before_the_containment_check(root: Path) -> None:
    os.symlink(root.parent / "secret.jsonl", root / "escape.jsonl")
    os.symlink(root.parent, root / "up")
    os.symlink(root / "data.jsonl", root / "alias.jsonl")
    for path in ("escape.jsonl", "up/secret.jsonl"):
        with pytest.raises(PermissionDenied):
            load(root, path, CLASSIFY)
    assert load(root, "alias.jsonl", CLASSIFY) == [classify("fine", "x")]


def test_symlinked_root_is_resolved_too(root: Path) -> None:
    os.symlink(root, root.parent / "root-link")
    assert load(root.parent / "root-link", "data.jsonl", CLASSIFY) == [classify("fine", "x")]


def test_missing_file_is_not_found(root: Path) -> None:
    with pytest.raises(NotFound) as caught:
        load(root, "nope.jsonl", CLASSIFY)
    assert caught.value.message == "dataset.path: 'nope.jsonl' does not exist"


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        (".", "'.' is a directory, not a file"),
        ("", "must not be empty"),
        ("a\0b.jsonl", "must not contain a NUL character"),
        ("x" * 300 + ".jsonl", f"'{'x' * 64}'... (306 characters) cannot be opened: File name too long"),
    ],
)
def test_unusable_paths_are_invalid(root: Path, path: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        load(root, path, CLASSIFY)
    assert caught.value.violations[0].field == "dataset.path"
    assert caught.value.violations[0].description.startswith(problem)
    assert str(root) not in caught.value.message


# --------------------------------------------------------------------------------------------- inline records


def test_inline_records_are_returned_as_given() -> None:
    records = [classify("a", "x"), classify("b", "y", "z")]
    assert load_dataset(inline(*records), CLASSIFY, data_root=None, max_items=2, field="dataset") == records


def test_inline_classify_violations_name_each_field() -> None:
    dataset = inline(
        classify("", "x"),
        tasks_pb2.EvalRecord(summarize=tasks_pb2.SummarizeExample(document="d", summary="s")),
        classify("c", "x", ""),
        classify("d"),
        tasks_pb2.EvalRecord(),
        classify("fine", "x"),
    )
    with pytest.raises(InvalidArgument) as caught:
        load_dataset(dataset, CLASSIFY, data_root=None, max_items=100, field="dataset")
    assert list(caught.value.violations) == [
        FieldViolation("dataset.inline.records[0].classify.text", "must not be empty"),
        FieldViolation(
            "dataset.inline.records[1].summarize", "TASK_TYPE_CLASSIFY needs classify records, not summarize"
        ),
        FieldViolation("dataset.inline.records[2].classify.labels[1]", "must not be empty"),
        FieldViolation("dataset.inline.records[3].classify.labels", "must contain at least one label"),
        FieldViolation("dataset.inline.records[4]", "is empty: set classify"),
    ]
    assert caught.value.message.startswith("dataset.inline.records[0].classify.text: must not be empty; ")


def test_inline_summarize_and_answer_violations() -> None:
    summaries = [tasks_pb2.EvalRecord(summarize=tasks_pb2.SummarizeExample(document="d", summary=" "))]
    with pytest.raises(InvalidArgument) as caught:
        validate_records(summaries, SUMMARIZE, field="examples.inline.records")
    assert list(caught.value.violations) == [
        FieldViolation("examples.inline.records[0].summarize.summary", "must not be empty")
    ]

    def answer(**fields: object) -> tasks_pb2.EvalRecord:
        return tasks_pb2.EvalRecord(answer=tasks_pb2.AnswerExample(**fields))

    answers = [
        answer(question="q", answer="a", alternative_answers=["b"]),
        answer(question="q", unanswerable=True),
        answer(question="", answer="a"),
        answer(question="q"),
        answer(question="q", answer="a", unanswerable=True),
        answer(question="q", answer="a", alternative_answers=[""]),
    ]
    with pytest.raises(InvalidArgument) as caught:
        validate_records(answers, ANSWER, field="dataset.inline.records")
    assert list(caught.value.violations) == [
        FieldViolation("dataset.inline.records[2].answer.question", "must not be empty"),
        FieldViolation("dataset.inline.records[3].answer.answer", "must not be empty unless unanswerable is set"),
        FieldViolation(
            "dataset.inline.records[4].answer.unanswerable", "is set but answers are given: an item is one or the other"
        ),
        FieldViolation("dataset.inline.records[5].answer.alternative_answers[0]", "must not be empty"),
    ]
    validate_records(answers[:2], ANSWER, field="dataset.inline.records")  # the good ones pass


def test_inline_records_limit_and_emptiness() -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_dataset(inline(*[classify("a", "x")] * 3), CLASSIFY, data_root=None, max_items=2, field="dataset")
    assert caught.value.violations == (FieldViolation("dataset.inline.records", "has 3 records; the limit is 2"),)

    with pytest.raises(InvalidArgument) as caught:
        load_dataset(inline(), CLASSIFY, data_root=None, max_items=2, field="examples")
    assert caught.value.violations == (FieldViolation("examples.inline.records", "must contain at least one record"),)


def test_dataset_source_is_required() -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_dataset(tasks_pb2.EvalDataset(), CLASSIFY, data_root=None, max_items=2, field="dataset")
    assert caught.value.violations == (FieldViolation("dataset", "required: set inline records or a path"),)


def test_gold_helpers_reject_records_of_another_task() -> None:
    with pytest.raises(ValueError):
        gold_labels(tasks_pb2.EvalRecord(answer=tasks_pb2.AnswerExample(question="q", answer="a")))
    with pytest.raises(ValueError):
        gold_answers(classify("a", "x"))

"""Training data as a job sends it: records written as JSONL, local files read, or a path for the server.

Used by `FineTuneSpec` (`_finetune_spec`); `genloom.types.finetune` re-exports the public names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union, cast

from genloom.types._task_inputs import AnswerExample, ClassifyExample, SummarizeExample
from genloom.types.common import ChatMessage
from genloom.v1 import finetune_pb2

TrainingRecord = Union[Mapping[str, Any], ClassifyExample, SummarizeExample, AnswerExample, Sequence[Any]]  # noqa: UP007
"""One line of training data: a JSON object (mapping); a task example (ClassifyExample, SummarizeExample,
AnswerExample: written as a task record); or a conversation, a list of ChatMessage or {"role", "content"} (written
as {"messages": [...]})."""
TrainingFile = Union[str, os.PathLike[str], bytes, Sequence[TrainingRecord]]  # noqa: UP007
"""Training or validation data: a local JSONL file's path (read here and sent inline; with send_path=True the
path is sent for the server to read instead), the JSONL bytes themselves, or a list of records."""


def _record_to_json(record: Any) -> Any:
    if isinstance(record, Mapping):
        return dict(record)
    if isinstance(record, ClassifyExample):
        labels = list(record.labels)
        return (
            {"text": record.text, "label": labels[0]} if len(labels) == 1 else {"text": record.text, "labels": labels}
        )
    if isinstance(record, SummarizeExample):
        return {"document": record.document, "summary": record.summary}
    if isinstance(record, AnswerExample):
        out: dict[str, Any] = {"question": record.question}
        if record.context:
            out["context"] = record.context
        if record.unanswerable:
            out["unanswerable"] = True
        else:
            out["answer"] = record.answer
        return out
    if isinstance(record, Sequence) and not isinstance(record, str | bytes):
        messages = []
        for message in record:
            if isinstance(message, ChatMessage):
                messages.append({"role": message.role, "content": message.content})
            elif isinstance(message, Mapping):
                messages.append(dict(message))
            else:
                raise TypeError(f"a chat message is a ChatMessage or a mapping, not {type(message).__name__}")
        return {"messages": messages}
    raise TypeError(
        "a training record is a mapping, a task example or a list of chat messages, not " + type(record).__name__
    )


def records_to_jsonl(records: Iterable[TrainingRecord]) -> bytes:
    """JSONL bytes, one record per line (see `TrainingRecord` for the accepted forms)."""
    lines = []
    for index, record in enumerate(records):
        try:
            lines.append(json.dumps(_record_to_json(record), ensure_ascii=False))
        except (TypeError, ValueError) as err:
            raise type(err)(f"record {index}: {err}") from None
    if not lines:
        raise ValueError("the list of training records is empty")
    return ("\n".join(lines) + "\n").encode("utf-8")


# How job records name data that was sent inline (upload:<job-or-sweep-id>/<name>.jsonl).
UPLOAD_PREFIX = "upload:"


def training_data_to_pb(data: TrainingFile, *, send_path: bool, what: str) -> finetune_pb2.TrainingDataSource:
    """A TrainingDataSource: bytes and records inline; a path read here and sent inline, or sent as a path."""
    if isinstance(data, bytes | bytearray | memoryview):
        if send_path:
            raise ValueError(f"{what}: send_path=True needs a path, not bytes")
        return finetune_pb2.TrainingDataSource(jsonl=bytes(data))
    if isinstance(data, str | os.PathLike):
        path = os.fspath(data)
        if send_path:
            if path.startswith(UPLOAD_PREFIX):
                # A job record's name for data that was sent inline: servers keep it private to that job.
                raise ValueError(
                    f"{what}: {path[:80]!r} is data uploaded with another job, which only that job may read; "
                    "pass the data itself again (a local file, bytes or records)"
                )
            return finetune_pb2.TrainingDataSource(path=path)
        try:
            return finetune_pb2.TrainingDataSource(jsonl=Path(path).read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{what}: no local file {path!r} (for a file on the server, pass send_path=True)"
            ) from None
    if send_path:
        raise ValueError(f"{what}: send_path=True needs a path, not records")
    if not isinstance(data, Sequence):
        raise TypeError(f"{what}: expected a path, bytes or a list of records, not {type(data).__name__}")
    return finetune_pb2.TrainingDataSource(jsonl=records_to_jsonl(cast(Sequence[TrainingRecord], data)))


def _training_data_from_pb(pb: finetune_pb2.TrainingDataSource) -> str | bytes | None:
    kind = pb.WhichOneof("source")
    if kind == "path":
        return pb.path
    if kind == "jsonl":
        return pb.jsonl
    return None

"""Fine-tuning data: JSONL training and validation files -> checked, tokenized examples with loss masks.

Each DataFormat (finetune.proto) is turned into token ids by the code that serves the tuned model, so that training
sees exactly the ids serving will send:

- CHAT renders through the model's chat template as the tokenizer and inference services do (render_chat, then
  encode without special tokens); the assistant turns are isolated by rendering prefixes of the conversation.
- PROMPT_COMPLETION tokenizes the prompt as InferenceService.Generate does a `text` prompt (special tokens added).
- TASK_RECORDS builds the zero-shot prompt with the task service's own builders (tasks/prompts.py) and tokenizes
  its TokenizerInput through the tokenizer service's own encoding (LoadedTokenizer.encode_inputs), with the flags
  the task service sends; the target is written as the task service's reply parsers (classify.map_labels,
  answer.is_unanswerable) read it.

Problems are reported per line (LineProblem -> finetune_pb2.LineError) so a user can fix a file in one pass. This
module must stay importable without torch: the gRPC service validates files with it, not only the workers.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from genloom.services.server.conversation import conversation_messages
from genloom.services.server.errors import InvalidArgument
from genloom.services.tasks.answer import is_unanswerable
from genloom.services.tasks.classify import map_labels
from genloom.services.tasks.prompts import (
    UNANSWERABLE,
    PromptSpec,
    answer_prompt,
    classify_prompt,
    reply_prefix,
    summarize_prompt,
)
from genloom.services.tokenizer.store import LoadedTokenizer
from genloom.v1 import finetune_pb2, tasks_pb2

#: Label of tokens that carry no loss (the value PyTorch's cross-entropy ignores by default).
IGNORE_INDEX = -100
TRAINING = "training"
VALIDATION = "validation"

UNSPECIFIED: int = finetune_pb2.DATA_FORMAT_UNSPECIFIED
CHAT: int = finetune_pb2.DATA_FORMAT_CHAT
PROMPT_COMPLETION: int = finetune_pb2.DATA_FORMAT_PROMPT_COMPLETION
TASK_RECORDS: int = finetune_pb2.DATA_FORMAT_TASK_RECORDS

NO_CHAT_TEMPLATE = "the base model has no chat template; use prompt/completion"
_ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = ("role", "content")
#: Where the task service stops a reply of a model without a chat template (the stop sequences classify.py,
#: answer.py and summarize.py pass to Generate): a target containing one would be cut short when served.
_PLAIN_STOPS: dict[int, str] = {
    tasks_pb2.TASK_TYPE_CLASSIFY: "\n",
    tasks_pb2.TASK_TYPE_ANSWER: "\n",
    tasks_pb2.TASK_TYPE_SUMMARIZE: "\n\n",
}


@dataclass(frozen=True)
class LineProblem:
    """What is wrong with one line of a data file."""

    #: "training" or "validation".
    file: str
    #: 1-based line number (blank lines counted).
    line: int
    #: e.g. "missing key 'completion'", "1,532 tokens > max_seq_length 1,024".
    message: str

    def to_pb(self) -> finetune_pb2.LineError:
        return finetune_pb2.LineError(file=self.file, line=self.line, message=self.message)

    def __str__(self) -> str:
        return f"{self.file} line {self.line}: {self.message}"


@dataclass(frozen=True)
class TrainingExample:
    """One tokenized example. `labels` is `input_ids` with IGNORE_INDEX wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    #: 1-based line of the file it came from.
    line: int

    @property
    def trained_tokens(self) -> int:
        """Tokens that carry loss."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class DataReport:
    """The outcome of reading one file."""

    #: The finetune_pb2.DataFormat used (detected when DATA_FORMAT_UNSPECIFIED was given; still UNSPECIFIED when
    #: the file had no record to detect it from).
    data_format: int
    examples: list[TrainingExample]
    #: The first `max_errors` problems, in line order.
    errors: list[LineProblem]
    #: All problems, including those beyond `errors`.
    error_count: int
    #: Examples cut to max_seq_length (truncate=True only).
    truncated: int
    #: Non-blank lines read.
    lines: int
    #: TASK_RECORDS: the options the prompts were built with, labels filled in from the data when none were
    #: given. Pass them when reading the validation file and store them with the job: the task RPC must be
    #: called with the same options (labels in the same order) to get the prompt the model was trained on.
    task_options: tasks_pb2.TaskPromptOptions | None = None

    @property
    def ok(self) -> bool:
        return self.error_count == 0


def detect_format(first_record: dict[str, Any]) -> int:
    """The DataFormat a record's keys announce: "messages" -> CHAT, "prompt" and "completion" ->
    PROMPT_COMPLETION, anything else DATA_FORMAT_UNSPECIFIED (task records must be named explicitly)."""
    if not isinstance(first_record, dict):
        return UNSPECIFIED
    if "messages" in first_record:
        return CHAT
    if "prompt" in first_record and "completion" in first_record:
        return PROMPT_COMPLETION
    return UNSPECIFIED


def split_validation(
    examples: list[TrainingExample], fraction: float, seed: int
) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(train, validation): max(1, round(fraction * n)) examples chosen by a `seed`-ed shuffle are held out when
    fraction > 0; both parts keep file order, so the same data, fraction and seed always give the same split."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction {fraction:g} is outside [0, 1)")
    if fraction == 0.0 or not examples:
        return list(examples), []
    held = max(1, round(fraction * len(examples)))
    if held >= len(examples):
        raise ValueError(
            f"holding out {held} of {len(examples)} examples for validation leaves none to train on; "
            "add data or lower the validation split"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:held])
    train = [e for i, e in enumerate(examples) if i not in chosen]
    validation = [e for i, e in enumerate(examples) if i in chosen]
    return train, validation


def read_examples(
    source: str | Path | bytes,
    *,
    file: str,
    tokenizer: LoadedTokenizer,
    data_format: int,
    task: int = 0,
    task_options: tasks_pb2.TaskPromptOptions | None = None,
    max_seq_length: int,
    truncate: bool = False,
    max_lines: int = 1_000_000,
    max_errors: int = 50,
) -> DataReport:
    """Read, check and tokenize a JSONL file: `source` is its path (str or Path) or its bytes.

    `file` ("training" or "validation") labels the problems. Bad lines are reported and skipped, so the caller
    decides what fails (any error, or too few examples: an empty file gives no examples and no errors). Lines past
    `max_lines` non-blank ones are not read (one problem says so). Raises ValueError for arguments no data can
    fix (an unknown format, TASK_RECORDS without a task); OSError when the file cannot be read.
    """
    if data_format not in finetune_pb2.DataFormat.values():
        raise ValueError(f"unknown data format {data_format}")
    if max_seq_length < 1:
        raise ValueError("max_seq_length must be at least 1")
    options = tasks_pb2.TaskPromptOptions()
    if task_options is not None:
        options.CopyFrom(task_options)
    report = DataReport(data_format, [], [], 0, 0, 0)
    if data_format == TASK_RECORDS:
        if task not in _PLAIN_STOPS:
            raise ValueError(
                "DATA_FORMAT_TASK_RECORDS needs a task: TASK_TYPE_CLASSIFY, TASK_TYPE_SUMMARIZE or TASK_TYPE_ANSWER"
            )
        report.task_options = options
    encoder: _Encoder | None = None

    def problem(line: int, message: str) -> None:
        report.error_count += 1
        if len(report.errors) < max_errors:
            report.errors.append(LineProblem(file, line, message))

    reader = _LineReader(max_lines)
    with _open(source) as stream:
        for number, record, bad in reader.lines(stream):
            if record is None:
                problem(number, bad)
                continue
            if encoder is None:
                if report.data_format == UNSPECIFIED:
                    report.data_format = detect_format(record)
                    if report.data_format == UNSPECIFIED:
                        keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
                        problem(
                            number,
                            f"can't tell the data format from this record's keys ({keys}): expected \"messages\" "
                            '(chat) or "prompt" and "completion"; set data_format',
                        )
                        break
                if report.data_format == TASK_RECORDS:
                    options, label_problem = _task_options(source, task, options)
                    report.task_options = options
                    if label_problem is not None:
                        problem(number, label_problem)
                encoder = _Encoder(tokenizer, report.data_format, task, options)
            try:
                segments = encoder.encode(record)
            except _Bad as err:
                problem(number, str(err))
                continue
            example, message = _example(segments, number, max_seq_length, truncate)
            if example is None:
                problem(number, message)
                continue
            if message:
                report.truncated += 1
            report.examples.append(example)
    report.lines = reader.count
    return report


# ------------------------------------------------------------------------------------------------- reading lines


class _Bad(Exception):
    """What is wrong with one record (read_examples adds the file and line)."""


def _open(source: str | Path | bytes) -> BinaryIO:
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source))
    return Path(source).open("rb")


class _LineReader:
    """Non-blank lines as JSON objects, or why a line is not one."""

    def __init__(self, max_lines: int) -> None:
        self.max_lines = max_lines
        self.count = 0

    def lines(self, stream: BinaryIO) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
        """(line number, the object or None, the problem when None)."""
        for number, raw in enumerate(stream, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark, as some Windows editors write
            if not raw.strip():
                continue
            self.count += 1
            if self.count > self.max_lines:
                yield number, None, f"the file has more than {self.max_lines:,} lines (the limit); the rest is not read"
                return
            try:
                text = raw.decode("utf-8").rstrip("\r\n")  # so JSON errors point into the line
            except UnicodeDecodeError as err:
                yield number, None, f"not valid UTF-8 (byte {err.start + 1} of the line); save the file as UTF-8"
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield number, None, f"invalid JSON: {err.msg} at column {err.colno}"
                continue
            except RecursionError:
                yield number, None, "invalid JSON: nested too deeply"
                continue
            if not isinstance(obj, dict):
                yield number, None, f"not a JSON object (a JSON {_json_kind(obj)})"
                continue
            yield number, obj, ""


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


# ---------------------------------------------------------------------------------------------------- fields


def _string(obj: dict[str, Any], key: str, *, where: str = "", required: bool = True) -> str:
    if key not in obj or (not required and obj[key] is None):
        if required:
            raise _Bad(f"{where}missing key '{key}'")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(f"{where}'{key}' must be a string")
    return value


def _nonblank(obj: dict[str, Any], key: str) -> str:
    value = _string(obj, key)
    if not value.strip():
        raise _Bad(f"'{key}' is empty")
    return value


def _string_list(obj: dict[str, Any], key: str) -> list[str]:
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _Bad(f"'{key}' must be a list of non-empty strings")
    return list(dict.fromkeys(value))


# ---------------------------------------------------------------------------------------------------- examples

# (token ids, whether they carry loss)
_Segment = tuple[list[int], bool]


def _example(
    segments: Sequence[_Segment], line: int, max_seq_length: int, truncate: bool
) -> tuple[TrainingExample | None, str]:
    """(the example, "" or "truncated"), or (None, the problem)."""
    ids: list[int] = []
    labels: list[int] = []
    for seg_ids, trained in segments:
        ids += seg_ids
        labels += seg_ids if trained else [IGNORE_INDEX] * len(seg_ids)
    # Tokens after the last trained one carry no loss and, attention being causal, change nothing: drop them.
    while labels and labels[-1] == IGNORE_INDEX:
        labels.pop()
        ids.pop()
    if not labels:
        return None, "nothing to learn: the example has no completion tokens"
    if len(ids) <= max_seq_length:
        return TrainingExample(ids, labels, line), ""
    too_long = f"{len(ids):,} tokens > max_seq_length {max_seq_length:,}"
    if not truncate:
        return None, too_long
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, f"{too_long}, and truncating to it cuts off every completion token: nothing to learn"
    return TrainingExample(ids, labels, line), "truncated"


class _Encoder:
    """Records of one format -> token segments, through the serving code paths."""

    def __init__(self, tok: LoadedTokenizer, data_format: int, task: int, options: tasks_pb2.TaskPromptOptions):
        self.tok = tok
        self.format = data_format
        self.task = task
        self.options = options
        self.chat = bool(tok.chat_template)
        self.specials = {s.token for s in tok.special_tokens}
        eos = getattr(tok.hf, "eos_token_id", None)
        self.eos: int | None = int(eos) if eos is not None else None
        self.names = [label.name for label in options.labels]
        ends_with_eos = data_format == PROMPT_COMPLETION or (data_format == TASK_RECORDS and not self.chat)
        if ends_with_eos and self.eos is None:
            raise ValueError(f"the tokenizer of {tok.name!r} has no EOS token to end completions with")

    def encode(self, record: dict[str, Any]) -> list[_Segment]:
        if self.format == CHAT:
            return self._chat(record)
        if self.format == PROMPT_COMPLETION:
            return self._prompt_completion(record)
        return self._task_record(record)

    # -- helpers --------------------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return list(self.tok.encode([text], False)[0].ids) if text else []

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return str(self.tok.render_chat(messages, add_generation_prompt))
        except InvalidArgument as err:
            raise _Bad(err.message) from None

    def _turn_end(self, reply: str) -> tuple[str, str]:
        """An assistant turn's text after its prompt -> (the part trained on, the rest). The rest is whitespace the
        template writes after an end-of-turn special token ("<|im_end|>" + "\\n"): generation stops at the token,
        so the model never produces what follows it."""
        body = reply.rstrip()
        if body != reply and any(body.endswith(s) for s in self.specials if s):
            return body, reply[len(body) :]
        return reply, ""

    # -- CHAT -----------------------------------------------------------------------------------------------------

    def _chat(self, record: dict[str, Any]) -> list[_Segment]:
        if not self.chat:
            raise _Bad(NO_CHAT_TEMPLATE)
        messages = _messages(record)
        text = self._render(messages, False)
        segments: list[_Segment] = []
        done = 0  # characters of `text` already in segments
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], True)
            through = self._render(messages[: i + 1], False)
            if not (through.startswith(before) and text.startswith(through) and len(before) >= done):
                raise _Bad(
                    f"the chat template does not render messages[:{i}] as a prefix of the conversation (it is not "
                    f"prefix-stable), so assistant message {i} can't be told apart from its context"
                )
            trained, rest = self._turn_end(through[len(before) :])
            segments += [(self._ids(text[done : len(before)]), False), (self._ids(trained), True)]
            segments.append((self._ids(rest), False))
            done = len(through)
        return segments

    # -- PROMPT_COMPLETION ----------------------------------------------------------------------------------------

    def _prompt_completion(self, record: dict[str, Any]) -> list[_Segment]:
        prompt = _string(record, "prompt")
        completion = _string(record, "completion")
        if not prompt:
            raise _Bad("'prompt' is empty")  # Generate refuses an empty text prompt
        if not completion:
            raise _Bad("'completion' is empty")
        assert self.eos is not None
        # As InferenceService.Generate tokenizes a `text` prompt (add_special_tokens defaults to true); the
        # completion on its own, so the prompt's ids are exactly those Generate will see.
        prompt_ids = list(self.tok.encode([prompt], True)[0].ids)
        return [(prompt_ids, False), ([*self._ids(completion), self.eos], True)]

    # -- TASK_RECORDS ---------------------------------------------------------------------------------------------

    def _task_record(self, record: dict[str, Any]) -> list[_Segment]:
        spec, target, what = self._task_target(record)
        prompt_ids = self.served_prompt_ids(spec)
        if self.chat:
            messages = conversation_messages(spec.tokenizer_input(True).conversation, "prompt")
            before = self._render(messages, True)
            through = self._render([*messages, {"role": "assistant", "content": target}], False)
            if not through.startswith(before):
                raise _Bad("the chat template does not render the prompt as a prefix of the prompt and its reply")
            trained, _ = self._turn_end(through[len(before) :])
            return [(prompt_ids, False), (self._ids(trained), True)]
        stop = _PLAIN_STOPS[self.task]
        if stop in target:
            raise _Bad(
                f"the {what} contains {json.dumps(stop)}, where the task service stops the reply of a model "
                "without a chat template: it would be cut short when served"
            )
        assert self.eos is not None
        return [(prompt_ids, False), ([*self._ids(reply_prefix(False) + target), self.eos], True)]

    def served_prompt_ids(self, spec: PromptSpec) -> list[int]:
        """The ids the task service sends to inference for `spec`: its TokenizerInput encoded as the tokenizer
        service encodes it for the task service (Upstream.tokenize: no special tokens added, and a conversation
        rendered with the generation prompt)."""
        inputs = [spec.tokenizer_input(self.chat)]
        try:
            (encoding,) = self.tok.encode_inputs(inputs, False, True)
        except InvalidArgument as err:
            raise _Bad(err.message) from None
        return list(encoding.ids)

    def _task_target(self, record: dict[str, Any]) -> tuple[PromptSpec, str, str]:
        """The zero-shot prompt, the reply to train on, and what that reply is called in messages."""
        o = self.options
        if self.task == tasks_pb2.TASK_TYPE_CLASSIFY:
            text = _nonblank(record, "text")
            labels = _record_labels(record)
            if len(labels) > 1 and not o.multi_label:
                raise _Bad(f"{len(labels)} labels, but task_options.multi_label is off: give one 'label'")
            for label in labels:
                if label not in self.names:
                    raise _Bad(f"label {label!r} is not in task_options.labels")
            target = ", ".join(labels)  # as classify_prompt writes an example's labels
            read_back = map_labels(target, self.names, o.multi_label)
            if read_back != labels:
                raise _Bad(
                    f"the reply {target!r} would be read back as {read_back}: label names that contain ',', ';', "
                    "'and' or a line break, or that start with one another, can't be told apart"
                )
            spec = classify_prompt(text, o.labels, (), multi_label=o.multi_label, instruction=o.instruction)
            return spec, target, "label"
        if self.task == tasks_pb2.TASK_TYPE_SUMMARIZE:
            document = _nonblank(record, "document")
            summary = _nonblank(record, "summary").strip()
            spec = summarize_prompt(
                document,
                (),
                target=o.target_length if o.HasField("target_length") else None,
                fmt=o.format or tasks_pb2.SUMMARY_FORMAT_PROSE,
                instruction=o.instruction,
            )
            return spec, summary, "summary"
        question = _nonblank(record, "question")
        context = _string(record, "context", required=False)
        answer, unanswerable = _record_answer(record)
        if unanswerable and not o.allow_unanswerable:
            raise _Bad(
                "'unanswerable' records need task_options.allow_unanswerable: without it the prompt does not offer "
                f"the {UNANSWERABLE} reply and the task service does not read it"
            )
        if not unanswerable and o.allow_unanswerable and is_unanswerable(answer):
            raise _Bad(f"the answer {answer!r} would be read as the {UNANSWERABLE} marker")
        spec = answer_prompt(question, context, (), allow_unanswerable=o.allow_unanswerable, instruction=o.instruction)
        return spec, UNANSWERABLE if unanswerable else answer, "answer"


def _messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A CHAT record's messages, checked: roles, string contents, a system message only first, an assistant."""
    if "messages" not in record:
        raise _Bad("missing key 'messages'")
    raw = record["messages"]
    if not isinstance(raw, list):
        raise _Bad('\'messages\' must be a list of {"role", "content"} objects')
    if not raw:
        raise _Bad("'messages' is empty")
    messages: list[dict[str, str]] = []
    for j, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _Bad(f"messages[{j}] must be an object with 'role' and 'content'")
        unknown = [k for k in message if k not in _MESSAGE_KEYS]
        if unknown:
            raise _Bad(f"messages[{j}] has unknown key '{unknown[0]}' (a message has 'role' and 'content')")
        role = message.get("role")
        if "role" not in message:
            raise _Bad(f"messages[{j}]: missing key 'role'")
        if role not in _ROLES:
            raise _Bad(f"messages[{j}].role must be 'system', 'user' or 'assistant', not {json.dumps(role)}")
        content = _string(message, "content", where=f"messages[{j}]: ")
        if role == "system" and j > 0:
            raise _Bad(f"messages[{j}]: a system message may only come first")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise _Bad("no assistant message: nothing to learn")
    return messages


def _record_labels(record: dict[str, Any]) -> list[str]:
    if "label" in record and "labels" in record:
        raise _Bad("has both 'label' and 'labels': use one")
    if "labels" in record:
        labels = _string_list(record, "labels")
        if not labels:
            raise _Bad("'labels' is empty")
        return labels
    if "label" in record:
        return [_nonblank(record, "label")]
    raise _Bad("missing key 'label' (or 'labels')")


def _record_answer(record: dict[str, Any]) -> tuple[str, bool]:
    """(the answer to train on, whether the record is unanswerable); "answers" (as Evaluate reads SQuAD-style
    exports) gives the answer when "answer" is absent."""
    answer = _string(record, "answer", required=False).strip()
    if not answer and record.get("answers") is not None:
        answer = next(iter(_string_list(record, "answers")), "").strip()
    unanswerable = record.get("unanswerable", False)
    if unanswerable is None:
        unanswerable = False
    if not isinstance(unanswerable, bool):
        raise _Bad("'unanswerable' must be true or false")
    if unanswerable and answer:
        raise _Bad("'unanswerable' is true but an answer is given: a record is one or the other")
    if not unanswerable and not answer:
        raise _Bad("missing key 'answer' (or 'unanswerable': true)")
    return answer, unanswerable


def _task_options(
    source: str | Path | bytes, task: int, options: tasks_pb2.TaskPromptOptions
) -> tuple[tasks_pb2.TaskPromptOptions, str | None]:
    """Options for TASK_RECORDS, with classify labels taken from the data when none are given (the distinct
    labels in order of first appearance, as Evaluate does), and a problem with them if any."""
    if task != tasks_pb2.TASK_TYPE_CLASSIFY or options.labels:
        return options, None
    names: dict[str, None] = {}
    with _open(source) as stream:
        for _, record, _ in _LineReader(2**62).lines(stream):
            value = record.get("labels", record.get("label")) if record is not None else None
            for name in value if isinstance(value, list) else [value]:
                if isinstance(name, str) and name.strip():
                    names.setdefault(name)
    out = tasks_pb2.TaskPromptOptions()
    out.CopyFrom(options)
    out.labels.extend(tasks_pb2.ClassLabel(name=n) for n in names)
    minimum = 1 if options.multi_label else 2
    if len(names) < minimum:
        kind = "multi-label" if options.multi_label else "single-label"
        return out, (
            f"the data has {len(names)} distinct label(s) and {kind} classification needs at least {minimum}: "
            "add records or set task_options.labels"
        )
    return out, None

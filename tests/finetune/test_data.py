"""Fine-tuning data: JSONL -> checked, tokenized examples, with the default model's real tokenizer.

The property that matters most: the prompt part of each example is exactly what serving sends to the model (the
tokenizer service for chat and text, the task service for task records), so a tuned model is served with the
prompt it was trained on. Those ids are taken from the real services here, over gRPC.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from genloom.services.finetune.data import (
    IGNORE_INDEX,
    NO_CHAT_TEMPLATE,
    DataReport,
    LineProblem,
    TrainingExample,
    detect_format,
    read_examples,
    split_validation,
)
from genloom.services.models.registry import ModelSpec
from genloom.services.tasks.classify import _fit, map_labels
from genloom.services.tasks.prompts import answer_prompt, summarize_prompt
from genloom.services.tasks.servicer import TaskServicer
from genloom.services.tasks.settings import TasksSettings
from genloom.services.tokenizer.store import LoadedTokenizer, load_tokenizer
from genloom.v1 import common_pb2, finetune_pb2, tasks_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from tests.conftest import DEFAULT_MODEL, ServerThread

CHAT = finetune_pb2.DATA_FORMAT_CHAT
PROMPT_COMPLETION = finetune_pb2.DATA_FORMAT_PROMPT_COMPLETION
TASK_RECORDS = finetune_pb2.DATA_FORMAT_TASK_RECORDS
UNSPECIFIED = finetune_pb2.DATA_FORMAT_UNSPECIFIED
END = "<|im_end|>"  # the default model's end-of-turn and EOS token
LABELS = [
    tasks_pb2.ClassLabel(name="positive", description="the reviewer liked it"),
    tasks_pb2.ClassLabel(name="negative"),
    tasks_pb2.ClassLabel(name="mixed"),
]


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> LoadedTokenizer:
    return load_tokenizer(ModelSpec(DEFAULT_MODEL, default_model_dir))


@pytest.fixture(scope="module")
def plain_tok(small_model_dir: Path) -> LoadedTokenizer:
    """The default model's tokenizer without a chat template (the tokenizer server's "small" model)."""
    loaded = load_tokenizer(ModelSpec("small", small_model_dir))
    assert not loaded.chat_template
    return loaded


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tokenizer_stub(tokenizer_server: ServerThread) -> AsyncIterator[tokenizer_pb2_grpc.TokenizerServiceStub]:
    async with grpc.aio.insecure_channel(tokenizer_server.target) as channel:
        yield tokenizer_pb2_grpc.TokenizerServiceStub(channel)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def task_service(tokenizer_server: ServerThread) -> AsyncIterator[TaskServicer]:
    """The task service's own prompt path, measuring prompts with the real tokenizer service over gRPC (no
    inference call is made: the tests stop at the ids it would send)."""
    servicer = TaskServicer(
        TasksSettings(tokenizer_target=tokenizer_server.target, inference_target=tokenizer_server.target)
    )
    await servicer.start()
    yield servicer
    await servicer.close()


def jsonl(*records: Any) -> bytes:
    """JSONL bytes; a str record is written as is (a bad or blank line)."""
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records)


def read(source: Any, tokenizer: LoadedTokenizer, data_format: int = UNSPECIFIED, **kw: Any) -> DataReport:
    kw.setdefault("max_seq_length", 2048)
    return read_examples(source, file="training", tokenizer=tokenizer, data_format=data_format, **kw)


def spans(example: TrainingExample) -> list[list[int]]:
    """The runs of trained token ids."""
    out: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if previous == IGNORE_INDEX:
                out.append([])
            out[-1].append(token)
        previous = label
    return out


def prompt_ids(example: TrainingExample) -> list[int]:
    """The ids before the first trained token."""
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return list(example.input_ids[:first])


def text(tokenizer: LoadedTokenizer, ids: Sequence[int]) -> str:
    return str(tokenizer.hf.decode(list(ids)))


def problems(report: DataReport) -> list[tuple[int, str]]:
    return [(p.line, p.message) for p in report.errors]


# ------------------------------------------------------------------------------------------------------- CHAT

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


async def test_chat_trains_on_assistant_turns_with_the_prompt_the_tokenizer_service_renders(
    tok: LoadedTokenizer, tokenizer_stub: tokenizer_pb2_grpc.TokenizerServiceStub
) -> None:
    report = read(jsonl({"messages": CONVERSATION}), tok, CHAT)
    assert report.errors == [] and report.data_format == CHAT and report.lines == 1
    (example,) = report.examples
    assert example.line == 1 and len(example.labels) == len(example.input_ids)
    assert [text(tok, s) for s in spans(example)] == ["Paris." + END, "Rome." + END]
    assert example.trained_tokens == sum(len(s) for s in spans(example))
    # Before each assistant turn the context is what the tokenizer service gives a chat request of the
    # conversation so far (rendered with the generation prompt), i.e. what inference would be sent.
    roles = {"system": common_pb2.ROLE_SYSTEM, "user": common_pb2.ROLE_USER, "assistant": common_pb2.ROLE_ASSISTANT}
    for turn, end in ((2, len(prompt_ids(example))), (4, None)):
        conversation = common_pb2.Conversation(
            messages=[common_pb2.ChatMessage(role=roles[m["role"]], content=m["content"]) for m in CONVERSATION[:turn]]
        )
        response = await tokenizer_stub.Tokenize(
            tokenizer_pb2.TokenizeRequest(inputs=[tokenizer_pb2.TokenizerInput(conversation=conversation)])
        )
        served = list(response.results[0].ids)
        assert example.input_ids[: len(served)] == served
        assert example.labels[len(served) - 1] == IGNORE_INDEX and example.labels[len(served)] != IGNORE_INDEX
        if end is not None:
            assert len(served) == end


def test_chat_problems_are_reported_on_their_lines(tok: LoadedTokenizer) -> None:
    user = {"role": "user", "content": "Hi"}
    assistant = {"role": "assistant", "content": "Hello"}
    report = read(
        jsonl(
            {"messages": [user, assistant]},
            {"messages": [user, {"role": "bot", "content": "Hello"}]},
            {"messages": [user, {"role": "system", "content": "Be brief."}, assistant]},
            {"messages": [user]},
            {"messages": [user, {"role": "assistant", "content": 7}]},
            {"messages": [user, {"role": "assistant", "content": "x", "weight": 0}]},
            {"messages": "Hi"},
            {"message": [user, assistant]},
            {"messages": []},
            {"messages": [user, {"content": "x"}]},
        ),
        tok,
        CHAT,
    )
    assert [e.line for e in report.examples] == [1]
    assert problems(report) == [
        (2, "messages[1].role must be 'system', 'user' or 'assistant', not \"bot\""),
        (3, "messages[1]: a system message may only come first"),
        (4, "no assistant message: nothing to learn"),
        (5, "messages[1]: 'content' must be a string"),
        (6, "messages[1] has unknown key 'weight' (a message has 'role' and 'content')"),
        (7, '\'messages\' must be a list of {"role", "content"} objects'),
        (8, "missing key 'messages'"),
        (9, "'messages' is empty"),
        (10, "messages[1]: missing key 'role'"),
    ]
    assert report.error_count == 9


def test_chat_without_a_chat_template_fails_every_line(plain_tok: LoadedTokenizer) -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    report = read(jsonl(chat, "", chat), plain_tok)
    assert report.data_format == CHAT and report.examples == []
    assert problems(report) == [(1, NO_CHAT_TEMPLATE), (3, NO_CHAT_TEMPLATE)]


def test_a_template_that_is_not_prefix_stable_is_refused(default_model_dir: Path) -> None:
    odd = load_tokenizer(ModelSpec(DEFAULT_MODEL, default_model_dir))
    # Writes the number of messages first, so no conversation's rendering starts with its prefix's.
    odd.hf.chat_template = (
        "{{ messages | length }}\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    report = read(jsonl(chat), odd, CHAT)
    assert report.examples == [] and report.error_count == 1
    assert "not prefix-stable" in report.errors[0].message


# ------------------------------------------------------------------------------------------ PROMPT_COMPLETION


@pytest.mark.parametrize("model", ["", "small"], ids=["chat-model", "no-chat-template"])
async def test_prompt_completion_prompt_is_a_generate_text_prompt(
    model: str,
    tok: LoadedTokenizer,
    plain_tok: LoadedTokenizer,
    tokenizer_stub: tokenizer_pb2_grpc.TokenizerServiceStub,
) -> None:
    tokenizer = plain_tok if model else tok
    records = [
        {"prompt": "Translate to French: cheese =>", "completion": " fromage"},
        {"prompt": "2+2=", "completion": "4"},
    ]
    report = read(jsonl(*records), tokenizer, PROMPT_COMPLETION)
    assert report.errors == [] and [e.line for e in report.examples] == [1, 2]
    for record, example in zip(records, report.examples, strict=True):
        # Generate tokenizes a text prompt as the tokenizer service does with its default add_special_tokens.
        response = await tokenizer_stub.Tokenize(
            tokenizer_pb2.TokenizeRequest(model=model, inputs=[tokenizer_pb2.TokenizerInput(text=record["prompt"])])
        )
        assert prompt_ids(example) == list(response.results[0].ids)
        (trained,) = spans(example)
        assert text(tokenizer, trained) == record["completion"] + END
        assert trained[-1] == tokenizer.hf.eos_token_id
        assert example.input_ids == prompt_ids(example) + trained


def test_bad_lines_get_their_line_numbers(tok: LoadedTokenizer) -> None:
    good = {"prompt": "Q: sky colour?\nA:", "completion": " blue"}
    report = read(
        jsonl(
            good,
            "",
            '{"prompt": "x", "completion": ',
            "[1, 2]",
            {"prompt": "Q: grass colour?\nA:"},
            {"prompt": "Q:", "completion": 5},
            {"prompt": "", "completion": " x"},
            {"prompt": "Q:", "completion": ""},
            "   ",
            good,
        ),
        tok,
        PROMPT_COMPLETION,
    )
    assert [e.line for e in report.examples] == [1, 10]
    assert problems(report) == [
        (3, "invalid JSON: Expecting value at column 31"),
        (4, "not a JSON object (a JSON array)"),
        (5, "missing key 'completion'"),
        (6, "'completion' must be a string"),
        (7, "'prompt' is empty"),
        (8, "'completion' is empty"),
    ]
    assert report.lines == 8 and report.error_count == 6
    assert [p.to_pb() for p in report.errors[:1]] == [
        finetune_pb2.LineError(file="training", line=3, message="invalid JSON: Expecting value at column 31")
    ]


def test_too_long_examples_fail_or_are_truncated(tok: LoadedTokenizer) -> None:
    prompt = "Tell me about rivers. " * 300
    completion = " Rivers flow downhill into seas."
    total = len(tok.encode([prompt], True)[0].ids) + len(tok.encode([completion], False)[0].ids) + 1
    assert 1024 < total < 10_000
    long_line = jsonl({"prompt": "Hi.", "completion": " Rivers" * 1100}, {"prompt": "Hi.", "completion": " Hello."})
    n = len(tok.encode(["Hi."], True)[0].ids) + len(tok.encode([" Rivers" * 1100], False)[0].ids) + 1

    refused = read(long_line, tok, PROMPT_COMPLETION, max_seq_length=1024)
    assert problems(refused) == [(1, f"{n:,} tokens > max_seq_length 1,024")]
    assert "," in refused.errors[0].message.split()[0] and refused.truncated == 0
    assert [e.line for e in refused.examples] == [2]

    cut = read(long_line, tok, PROMPT_COMPLETION, max_seq_length=1024, truncate=True)
    assert cut.errors == [] and cut.truncated == 1
    first = cut.examples[0]
    assert len(first.input_ids) == len(first.labels) == 1024
    assert first.input_ids == refused_ids(tok, "Hi.", " Rivers" * 1100)[:1024]

    # A prompt longer than the limit leaves nothing to learn, truncation or not.
    nothing = read(
        jsonl({"prompt": prompt, "completion": completion}), tok, PROMPT_COMPLETION, max_seq_length=1024, truncate=True
    )
    assert nothing.examples == [] and nothing.truncated == 0
    assert nothing.errors[0].message.startswith(f"{total:,} tokens > max_seq_length 1,024, and truncating")


def refused_ids(tok: LoadedTokenizer, prompt: str, completion: str) -> list[int]:
    return (
        list(tok.encode([prompt], True)[0].ids) + list(tok.encode([completion], False)[0].ids) + [tok.hf.eos_token_id]
    )


# ---------------------------------------------------------------------------------------------- TASK_RECORDS


def classify_request(text_: str, multi_label: bool) -> tasks_pb2.ClassifyRequest:
    return tasks_pb2.ClassifyRequest(
        texts=[text_],
        labels=LABELS,
        multi_label=multi_label,
        method=tasks_pb2.CLASSIFY_METHOD_GENERATE,
        strategy=tasks_pb2.PROMPT_STRATEGY_ZERO_SHOT,
        instruction="Classify the review.",
    )


@pytest.mark.parametrize("model", ["", "small"], ids=["chat-model", "no-chat-template"])
@pytest.mark.parametrize("multi_label", [False, True], ids=["single-label", "multi-label"])
async def test_classify_prompt_is_what_the_task_service_sends_for_a_zero_shot_generate(
    model: str,
    multi_label: bool,
    tok: LoadedTokenizer,
    plain_tok: LoadedTokenizer,
    task_service: TaskServicer,
) -> None:
    tokenizer = plain_tok if model else tok
    chat = not model
    review = "The plot dragged, but the acting was superb."
    gold = ["mixed", "positive"] if multi_label else ["mixed"]
    record = {"text": review, "labels": gold} if multi_label else {"text": review, "label": gold[0]}
    options = tasks_pb2.TaskPromptOptions(labels=LABELS, multi_label=multi_label, instruction="Classify the review.")
    report = read(jsonl(record), tokenizer, TASK_RECORDS, task=tasks_pb2.TASK_TYPE_CLASSIFY, task_options=options)
    assert report.errors == []
    (example,) = report.examples

    # The task service's own path for Classify GENERATE: its options, its context, its prompt fitting (which
    # tokenizes through the tokenizer service); these ids are what it sends to InferenceService.Generate.
    request = classify_request(review, multi_label)
    classify_options = task_service.core.classify_options(request)
    ctx = await task_service.core.context(
        common_pb2.ModelRef(model=model), request.strategy, len(request.examples), request.max_examples
    )
    assert ctx.chat is chat
    fitted = await _fit(
        ctx, "classify", classify_options.prompt, review, 16, classify_options, "texts[0]", tasks_pb2.ContextReport()
    )
    assert prompt_ids(example) == fitted.ids

    (trained,) = spans(example)
    target = ", ".join(gold)
    assert text(tokenizer, trained) == (target if chat else " " + target) + END
    reply = str(tokenizer.hf.decode(trained, skip_special_tokens=True)).strip()  # as Generate returns it
    assert map_labels(reply, [lb.name for lb in LABELS], multi_label) == gold


async def test_summarize_and_answer_records(tok: LoadedTokenizer, task_service: TaskServicer) -> None:
    ctx = await task_service.core.context(common_pb2.ModelRef(), tasks_pb2.PROMPT_STRATEGY_ZERO_SHOT, 0, 0)
    length = tasks_pb2.SummaryLength(unit=tasks_pb2.SUMMARY_LENGTH_UNIT_WORDS, value=10)
    summarize_options = tasks_pb2.TaskPromptOptions(target_length=length, format=tasks_pb2.SUMMARY_FORMAT_BULLETS)
    document = "The council met on Monday. It approved the new park and delayed the road budget."
    report = read(
        jsonl({"document": document, "summary": " - Park approved\n- Road budget delayed\n"}),
        tok,
        TASK_RECORDS,
        task=tasks_pb2.TASK_TYPE_SUMMARIZE,
        task_options=summarize_options,
    )
    assert report.errors == []
    (example,) = report.examples
    (served,) = await ctx.tokenize(
        [summarize_prompt(document, (), target=length, fmt=tasks_pb2.SUMMARY_FORMAT_BULLETS)]
    )
    assert prompt_ids(example) == list(served.ids)
    assert [text(tok, s) for s in spans(example)] == ["- Park approved\n- Road budget delayed" + END]

    answer_options = tasks_pb2.TaskPromptOptions(allow_unanswerable=True)
    context = "Ada Lovelace wrote the first published program in 1843."
    report = read(
        jsonl(
            {"question": "When was the first program published?", "context": context, "answer": "1843"},
            {"question": "Who built the engine?", "context": context, "unanswerable": True},
            {"question": "What is 2+2?", "answer": "4"},
            {"question": "Why?", "context": context},
            {"question": "Why?", "answer": "Because", "unanswerable": True},
        ),
        tok,
        TASK_RECORDS,
        task=tasks_pb2.TASK_TYPE_ANSWER,
        task_options=answer_options,
    )
    assert problems(report) == [
        (4, "missing key 'answer' (or 'unanswerable': true)"),
        (5, "'unanswerable' is true but an answer is given: a record is one or the other"),
    ]
    specs = [
        answer_prompt("When was the first program published?", context, (), allow_unanswerable=True),
        answer_prompt("Who built the engine?", context, (), allow_unanswerable=True),
        answer_prompt("What is 2+2?", "", (), allow_unanswerable=True),
    ]
    served_all = await ctx.tokenize(specs)
    for example, served, target in zip(report.examples, served_all, ["1843", "UNANSWERABLE", "4"], strict=True):
        assert prompt_ids(example) == list(served.ids)
        assert [text(tok, s) for s in spans(example)] == [target + END]

    # Without allow_unanswerable the prompt never offers the marker, so such records cannot be trained on.
    refused = read(
        jsonl({"question": "Who?", "context": context, "unanswerable": True}),
        tok,
        TASK_RECORDS,
        task=tasks_pb2.TASK_TYPE_ANSWER,
    )
    assert refused.examples == [] and "allow_unanswerable" in refused.errors[0].message


def test_classify_record_problems_and_labels_from_the_data(tok: LoadedTokenizer, plain_tok: LoadedTokenizer) -> None:
    options = tasks_pb2.TaskPromptOptions(labels=LABELS)
    report = read(
        jsonl(
            {"text": "Great.", "label": "positive"},
            {"text": "Meh.", "label": "neutral"},
            {"text": "Good and bad.", "labels": ["positive", "negative"]},
            {"text": "Fine.", "label": "positive", "labels": ["positive"]},
            {"text": "  ", "label": "positive"},
            {"label": "positive"},
            {"text": "Bad."},
        ),
        tok,
        TASK_RECORDS,
        task=tasks_pb2.TASK_TYPE_CLASSIFY,
        task_options=options,
    )
    assert [e.line for e in report.examples] == [1]
    assert problems(report) == [
        (2, "label 'neutral' is not in task_options.labels"),
        (3, "2 labels, but task_options.multi_label is off: give one 'label'"),
        (4, "has both 'label' and 'labels': use one"),
        (5, "'text' is empty"),
        (6, "missing key 'text'"),
        (7, "missing key 'label' (or 'labels')"),
    ]
    assert report.task_options is not None and list(report.task_options.labels) == LABELS

    # No labels given: the distinct labels of the data, in order of first appearance (as Evaluate does).
    derived = read(
        jsonl(
            {"text": "Bad.", "label": "neg"}, "oops", {"text": "Good.", "label": "pos"}, {"text": "Ok.", "label": "neg"}
        ),
        tok,
        TASK_RECORDS,
        task=tasks_pb2.TASK_TYPE_CLASSIFY,
    )
    assert derived.task_options is not None
    assert [lb.name for lb in derived.task_options.labels] == ["neg", "pos"]
    assert [e.line for e in derived.examples] == [1, 3, 4] and [p.line for p in derived.errors] == [2]
    one = read(jsonl({"text": "Bad.", "label": "neg"}), tok, TASK_RECORDS, task=tasks_pb2.TASK_TYPE_CLASSIFY)
    assert "needs at least 2" in one.errors[0].message

    # Names the task service could not read back from a multi-label reply are refused.
    clash = tasks_pb2.TaskPromptOptions(
        labels=[tasks_pb2.ClassLabel(name="black, white"), tasks_pb2.ClassLabel(name="black")], multi_label=True
    )
    bad = read(
        jsonl({"text": "A zebra.", "labels": ["black, white"]}),
        tok,
        TASK_RECORDS,
        task=tasks_pb2.TASK_TYPE_CLASSIFY,
        task_options=clash,
    )
    assert bad.examples == [] and "can't be told apart" in bad.errors[0].message

    # Without a chat template the reply ends at a line break, so a target with one would be cut short.
    answer = {"question": "List two colours.", "answer": "red\nblue"}
    plain = read(jsonl(answer), plain_tok, TASK_RECORDS, task=tasks_pb2.TASK_TYPE_ANSWER)
    assert plain.examples == [] and "cut short" in plain.errors[0].message
    assert read(jsonl(answer), tok, TASK_RECORDS, task=tasks_pb2.TASK_TYPE_ANSWER).errors == []


def test_task_records_need_a_task(tok: LoadedTokenizer) -> None:
    with pytest.raises(ValueError, match="needs a task"):
        read(jsonl({"text": "x", "label": "y"}), tok, TASK_RECORDS)


# ------------------------------------------------------------------------------------------- reading the file


def test_format_detection(tok: LoadedTokenizer, tmp_path: Path) -> None:
    assert detect_format({"messages": []}) == CHAT
    assert detect_format({"prompt": "a", "completion": "b", "id": 3}) == PROMPT_COMPLETION
    assert detect_format({"prompt": "a"}) == UNSPECIFIED
    assert detect_format({"text": "a", "label": "b"}) == UNSPECIFIED

    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert read(jsonl("not json", chat), tok).data_format == CHAT
    assert read(jsonl({"prompt": "a", "completion": "b"}), tok).data_format == PROMPT_COMPLETION

    undetectable = read(jsonl({"text": "Great.", "label": "positive"}, {"text": "Bad.", "label": "negative"}), tok)
    assert undetectable.data_format == UNSPECIFIED and undetectable.examples == []
    assert [p.line for p in undetectable.errors] == [1]
    assert "set data_format" in undetectable.errors[0].message

    empty = read(b"\n  \n", tok)
    assert (empty.examples, empty.errors, empty.error_count, empty.lines) == ([], [], 0, 0)
    assert empty.data_format == UNSPECIFIED

    # A path (str or Path) reads the same as the bytes.
    data = jsonl({"prompt": "a", "completion": "b"}, "", {"prompt": "c", "completion": "d"})
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + data)  # with a byte order mark, as Windows editors write
    from_bytes = read(data, tok)
    assert read(path, tok) == from_bytes and read(str(path), tok) == from_bytes
    assert [e.line for e in from_bytes.examples] == [1, 3]


def test_non_utf8_and_limits(tok: LoadedTokenizer) -> None:
    good = {"prompt": "a", "completion": "b"}
    latin1 = jsonl(good) + '{"prompt": "café", "completion": "b"}\n'.encode("latin-1") + jsonl(good)
    report = read(latin1, tok, PROMPT_COMPLETION)
    assert problems(report) == [(2, "not valid UTF-8 (byte 16 of the line); save the file as UTF-8")]
    assert [e.line for e in report.examples] == [1, 3]

    bad = jsonl(*(["{"] * 7), good)
    capped = read(bad, tok, PROMPT_COMPLETION, max_errors=3)
    assert [p.line for p in capped.errors] == [1, 2, 3] and capped.error_count == 7 and len(capped.examples) == 1

    many = jsonl(*([good] * 5))
    limited = read(many, tok, PROMPT_COMPLETION, max_lines=3)
    assert len(limited.examples) == 3 and problems(limited) == [
        (4, "the file has more than 3 lines (the limit); the rest is not read")
    ]


def test_line_problem_to_pb() -> None:
    problem = LineProblem("validation", 12, "missing key 'completion'")
    assert problem.to_pb() == finetune_pb2.LineError(file="validation", line=12, message="missing key 'completion'")


# ---------------------------------------------------------------------------------------------------- split


def test_split_validation_is_deterministic() -> None:
    examples = [TrainingExample([i, i + 1], [IGNORE_INDEX, i + 1], i + 1) for i in range(20)]
    train, validation = split_validation(examples, 0.2, seed=7)
    assert len(validation) == 4 and len(train) == 16
    assert sorted(e.line for e in train + validation) == list(range(1, 21))
    assert [e.line for e in train] == sorted(e.line for e in train)  # file order kept
    assert split_validation(examples, 0.2, seed=7) == (train, validation)
    assert split_validation(examples, 0.2, seed=8)[1] != validation
    assert len(split_validation(examples, 0.001, seed=7)[1]) == 1
    assert split_validation(examples, 0.0, seed=7) == (examples, [])
    with pytest.raises(ValueError, match="leaves none"):
        split_validation(examples[:1], 0.5, seed=7)


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, genloom.services.finetune.data; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

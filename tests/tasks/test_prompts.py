"""Golden prompts: the exact text each task sends for zero-, one- and few-shot, plain and through the default
model's chat template. Fine-tuning on task records renders training data with the same builders, so a change
here changes what tuned models were trained on: update these strings deliberately."""

from __future__ import annotations

from pathlib import Path

import pytest

from genloom.services.models.registry import ModelSpec
from genloom.services.server.conversation import ROLE_NAMES
from genloom.services.tasks.answer import is_unanswerable
from genloom.services.tasks.classify import map_labels
from genloom.services.tasks.prompts import (
    PromptSpec,
    answer_prompt,
    classify_prompt,
    label_question_prompt,
    summarize_prompt,
)
from genloom.services.tokenizer.store import load_tokenizer
from genloom.v1 import tasks_pb2

LABELS = [
    tasks_pb2.ClassLabel(name="positive", description="the reviewer liked it"),
    tasks_pb2.ClassLabel(name="negative"),
]
CLASSIFY_EXAMPLES = [
    tasks_pb2.ClassifyExample(text="Loved it.", labels=["positive"]),
    tasks_pb2.ClassifyExample(text="Dreadful.", labels=["negative"]),
]
SYSTEM = (
    "Classify the text into exactly one of the labels.\nLabels:\n- positive: the reviewer liked it\n- negative\n"
    "Reply with the label only."
)


def chat(spec: PromptSpec, model_dir: Path) -> str:
    tokenizer = load_tokenizer(ModelSpec("m", model_dir))
    return tokenizer.render_chat([{"role": ROLE_NAMES[r], "content": c} for r, c in spec.messages()], True)


@pytest.mark.parametrize(
    ("used", "turns"),
    [
        ((), ""),
        ((0,), "<|im_start|>user\nText: Loved it.<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n"),
        (
            (0, 1),
            "<|im_start|>user\nText: Loved it.<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n"
            "<|im_start|>user\nText: Dreadful.<|im_end|>\n<|im_start|>assistant\nnegative<|im_end|>\n",
        ),
    ],
    ids=["zero-shot", "one-shot", "few-shot"],
)
def test_classify_prompt_through_the_chat_template(default_model_dir: Path, used: tuple[int, ...], turns: str) -> None:
    spec = classify_prompt("Great fun.", LABELS, CLASSIFY_EXAMPLES).with_examples(used)
    assert chat(spec, default_model_dir) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n{turns}"
        "<|im_start|>user\nText: Great fun.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_classify_prompt_plain_text() -> None:
    spec = classify_prompt("Great fun.", LABELS, CLASSIFY_EXAMPLES).with_examples((1,))
    assert spec.plain_text() == f"{SYSTEM}\n\nText: Dreadful.\nAnswer: negative\n\nText: Great fun.\nAnswer:"


def test_multi_label_prompts() -> None:
    examples = [tasks_pb2.ClassifyExample(text="Cheap and tasty.", labels=["price", "food"])]
    labels = [tasks_pb2.ClassLabel(name="food"), tasks_pb2.ClassLabel(name="price")]
    generate = classify_prompt("Cold soup.", labels, examples, multi_label=True).with_examples((0,))
    assert generate.messages()[0][1] == (
        "Classify the text: choose every label that applies.\nLabels:\n- food\n- price\n"
        "Reply with the labels only, separated by commas."
    )
    assert [c for _, c in generate.messages()[1:]] == ["Text: Cheap and tasty.", "price, food", "Text: Cold soup."]
    question = label_question_prompt("Cold soup.", "price", labels, examples).with_examples((0,))
    assert [c for _, c in question.messages()] == [
        "Decide whether a label applies to the text; a text can have any number of labels.\nLabels:\n- food\n"
        "- price\nReply Yes or No.",
        "Text: Cheap and tasty.\nLabel: price",
        "Yes",
        "Text: Cold soup.\nLabel: price",
    ]


def test_summarize_prompts() -> None:
    examples = [
        tasks_pb2.SummarizeExample(document="Doc A.", summary="Sum A."),
        tasks_pb2.SummarizeExample(document="Doc B.", summary="Sum B."),
    ]
    words = tasks_pb2.SummaryLength(unit=tasks_pb2.SUMMARY_LENGTH_UNIT_WORDS, value=30)
    zero = summarize_prompt("The text.", examples)
    assert zero.messages() == [
        (1, "Summarize the document. Reply with the summary only."),
        (2, "Document:\nThe text."),
    ]
    few = summarize_prompt("The text.", examples, target=words, fmt=tasks_pb2.SUMMARY_FORMAT_BULLETS)
    assert few.with_examples((0, 1)).plain_text() == (
        "Summarize the document. Use about 30 words. Write a bullet list: one point per line, each line starting "
        'with "- ". Reply with the summary only.\n\n'
        "Document:\nDoc A.\nAnswer: Sum A.\n\nDocument:\nDoc B.\nAnswer: Sum B.\n\nDocument:\nThe text.\nAnswer:"
    )
    sentences = tasks_pb2.SummaryLength(unit=tasks_pb2.SUMMARY_LENGTH_UNIT_SENTENCES, value=1)
    assert summarize_prompt("x", [], target=sentences).system == (
        "Summarize the document. Use about 1 sentence. Reply with the summary only."
    )


def test_answer_prompts() -> None:
    examples = [
        tasks_pb2.AnswerExample(question="Q1?", context="C1.", answer="A1"),
        tasks_pb2.AnswerExample(question="Q2?", unanswerable=True),
    ]
    spec = answer_prompt("Who?", "Ctx.", examples, allow_unanswerable=True).with_examples((0, 1))
    assert spec.messages() == [
        (
            1,
            "Answer the question using only the context. Reply with the answer only, as briefly as possible. If the "
            "context does not contain the answer, reply exactly: UNANSWERABLE",
        ),
        (2, "Context:\nC1.\n\nQuestion: Q1?"),
        (3, "A1"),
        (2, "Question: Q2?"),
        (3, "UNANSWERABLE"),
        (2, "Context:\nCtx.\n\nQuestion: Who?"),
    ]
    closed = answer_prompt("Who?", "", [])
    assert closed.messages() == [
        (1, "Answer the question. Reply with the answer only, as briefly as possible."),
        (2, "Question: Who?"),
    ]


@pytest.mark.parametrize(
    ("text", "multi", "expected"),
    [
        ("positive", False, ["positive"]),
        ("Negative.", False, ["negative"]),
        ("positive sentiment overall", False, ["positive"]),
        ("pos", False, ["positive"]),
        ("neutral", False, []),
        ("", False, []),
        ("negative, positive", True, ["negative", "positive"]),
        ("positive and negative\npositive", True, ["positive", "negative"]),
    ],
)
def test_generated_text_maps_onto_labels(text: str, multi: bool, expected: list[str]) -> None:
    assert map_labels(text, ["positive", "negative"], multi) == expected


def test_unanswerable_marker() -> None:
    assert is_unanswerable("UNANSWERABLE") and is_unanswerable("unanswerable.") and is_unanswerable("**UNANSWERABLE**")
    assert not is_unanswerable("Paris") and not is_unanswerable("")

"""One prompt builder per task. A prompt is a system instruction, worked examples (each one or more
user/assistant turns) and the query turn; it renders through the model's chat template when the model has one,
else as plain text with "Answer:" cues.

These templates are part of the product: fine-tuning on task records (issue 5) renders training data with the
same builders, so a model tuned here is served through the task RPCs with the prompt it was trained on. Golden
tests (tests/tasks/test_prompts.py) pin their exact text; change them deliberately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from genloom.v1 import common_pb2, tasks_pb2, tokenizer_pb2

#: What the model is told to reply when the context does not answer the question (allow_unanswerable).
UNANSWERABLE = "UNANSWERABLE"
#: Content-free inputs for contextual calibration (Zhao et al., 2021, "Calibrate before use").
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")
YES, NO = "Yes", "No"
PLAIN_CUE = "Answer:"


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str


@dataclass(frozen=True)
class PromptSpec:
    """A prompt before rendering. `examples[i]` holds the turns of example i (dropped or kept as a whole)."""

    system: str
    query: str
    examples: tuple[tuple[Turn, ...], ...] = ()
    #: Indices of the examples in the prompt (in order); the builders start with all of them.
    used: tuple[int, ...] = field(default=())

    def with_examples(self, used: Sequence[int]) -> PromptSpec:
        return replace(self, used=tuple(used))

    def with_query(self, query: str) -> PromptSpec:
        return replace(self, query=query)

    def messages(self) -> list[tuple[common_pb2.Role, str]]:
        """(role, content) pairs, system first."""
        out = [(common_pb2.ROLE_SYSTEM, self.system)]
        for i in self.used:
            for turn in self.examples[i]:
                out += [(common_pb2.ROLE_USER, turn.user), (common_pb2.ROLE_ASSISTANT, turn.assistant)]
        out.append((common_pb2.ROLE_USER, self.query))
        return out

    def plain_text(self) -> str:
        """The prompt for models without a chat template."""
        parts = [self.system, ""]
        for i in self.used:
            for turn in self.examples[i]:
                parts += [turn.user, f"{PLAIN_CUE} {turn.assistant}", ""]
        parts += [self.query, PLAIN_CUE]
        return "\n".join(parts)

    def tokenizer_input(self, chat: bool) -> tokenizer_pb2.TokenizerInput:
        if not chat:
            return tokenizer_pb2.TokenizerInput(text=self.plain_text())
        conversation = common_pb2.Conversation(
            messages=[common_pb2.ChatMessage(role=role, content=content) for role, content in self.messages()]
        )
        return tokenizer_pb2.TokenizerInput(conversation=conversation)


def reply_prefix(chat: bool) -> str:
    """What a reply (or a scored candidate) starts with after the prompt: plain prompts end in "Answer:"."""
    return "" if chat else " "


# -- Summarize --------------------------------------------------------------------------------------------------


def summarize_instruction(target: tasks_pb2.SummaryLength | None, fmt: int, instruction: str = "") -> str:
    base = instruction or "Summarize the document."
    sentences = []
    if target is not None and target.unit == tasks_pb2.SUMMARY_LENGTH_UNIT_WORDS:
        sentences.append(f"Use about {target.value} words.")
    elif target is not None and target.unit == tasks_pb2.SUMMARY_LENGTH_UNIT_SENTENCES:
        unit = "bullet" if fmt == tasks_pb2.SUMMARY_FORMAT_BULLETS else "sentence"
        sentences.append(f"Use about {target.value} {unit}{'' if target.value == 1 else 's'}.")
    if fmt == tasks_pb2.SUMMARY_FORMAT_BULLETS:
        sentences.append('Write a bullet list: one point per line, each line starting with "- ".')
    sentences.append("Reply with the summary only.")
    return " ".join([base, *sentences])


def document_turn(document: str) -> str:
    return f"Document:\n{document}"


def summaries_turn(summaries: Sequence[str]) -> str:
    """The query of a reduce step: summaries of consecutive parts, to be combined into one."""
    joined = "\n\n".join(f"Part {i + 1}:\n{s}" for i, s in enumerate(summaries))
    return f"Document (summaries of its consecutive parts):\n{joined}"


def summarize_prompt(
    document: str,
    examples: Sequence[tasks_pb2.SummarizeExample],
    *,
    target: tasks_pb2.SummaryLength | None = None,
    fmt: int = tasks_pb2.SUMMARY_FORMAT_PROSE,
    instruction: str = "",
) -> PromptSpec:
    turns = tuple((Turn(document_turn(e.document), e.summary),) for e in examples)
    return PromptSpec(summarize_instruction(target, fmt, instruction), document_turn(document), turns)


# -- Answer -----------------------------------------------------------------------------------------------------


def answer_instruction(has_context: bool, allow_unanswerable: bool, instruction: str = "") -> str:
    if instruction:
        base = instruction
    elif has_context:
        base = "Answer the question using only the context. Reply with the answer only, as briefly as possible."
    else:
        base = "Answer the question. Reply with the answer only, as briefly as possible."
    if allow_unanswerable:
        source = "the context does not contain the answer" if has_context else "you do not know the answer"
        base += f" If {source}, reply exactly: {UNANSWERABLE}"
    return base


def question_turn(question: str, context: str) -> str:
    return f"Context:\n{context}\n\nQuestion: {question}" if context else f"Question: {question}"


def answer_prompt(
    question: str,
    context: str,
    examples: Sequence[tasks_pb2.AnswerExample],
    *,
    allow_unanswerable: bool = False,
    instruction: str = "",
) -> PromptSpec:
    turns = tuple(
        (Turn(question_turn(e.question, e.context), UNANSWERABLE if e.unanswerable else e.answer),) for e in examples
    )
    return PromptSpec(
        answer_instruction(bool(context), allow_unanswerable, instruction), question_turn(question, context), turns
    )


# -- Classify ---------------------------------------------------------------------------------------------------


def label_lines(labels: Sequence[tasks_pb2.ClassLabel]) -> str:
    return "\n".join(f"- {lb.name}: {lb.description}" if lb.description else f"- {lb.name}" for lb in labels)


def text_turn(text: str) -> str:
    return f"Text: {text}"


def classify_prompt(
    text: str,
    labels: Sequence[tasks_pb2.ClassLabel],
    examples: Sequence[tasks_pb2.ClassifyExample],
    *,
    multi_label: bool = False,
    instruction: str = "",
) -> PromptSpec:
    """Single-label (both methods) and multi-label GENERATE: the reply is the label, or labels joined by ", "."""
    if multi_label:
        base = instruction or "Classify the text: choose every label that applies."
        system = f"{base}\nLabels:\n{label_lines(labels)}\nReply with the labels only, separated by commas."
    else:
        base = instruction or "Classify the text into exactly one of the labels."
        system = f"{base}\nLabels:\n{label_lines(labels)}\nReply with the label only."
    turns = tuple((Turn(text_turn(e.text), ", ".join(e.labels)),) for e in examples)
    return PromptSpec(system, text_turn(text), turns)


def label_question_turn(text: str, label: str) -> str:
    return f"Text: {text}\nLabel: {label}"


def label_question_prompt(
    text: str,
    label: str,
    labels: Sequence[tasks_pb2.ClassLabel],
    examples: Sequence[tasks_pb2.ClassifyExample],
    *,
    instruction: str = "",
) -> PromptSpec:
    """Multi-label SCORE: does `label` apply to the text? Scored as the continuations "Yes" and "No". Each
    example asks the same label about its own text, answered Yes or No from its gold labels."""
    base = instruction or "Decide whether a label applies to the text; a text can have any number of labels."
    system = f"{base}\nLabels:\n{label_lines(labels)}\nReply {YES} or {NO}."
    turns = tuple((Turn(label_question_turn(e.text, label), YES if label in e.labels else NO),) for e in examples)
    return PromptSpec(system, label_question_turn(text, label), turns)

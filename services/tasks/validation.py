"""Request checks shared by the task RPCs and Evaluate: every violation is collected and reported at once, each
naming its field, before any model is called."""

from __future__ import annotations

from collections.abc import Sequence

from genloom.services.inference.sampling import SamplingLimits, check_sampling, check_vocabulary
from genloom.services.server.errors import FieldViolation, quote
from genloom.services.tasks.settings import TasksSettings
from genloom.v1 import common_pb2, inference_pb2, tasks_pb2

MAX_INSTRUCTION = 2000
MAX_LABEL_NAME = 128
MAX_LABEL_DESCRIPTION = 1000
MAX_WORDS = 2000
MAX_SENTENCES = 100


class Checks:
    def __init__(self, settings: TasksSettings) -> None:
        self.settings = settings
        self.violations: list[FieldViolation] = []

    def require(self, ok: bool, field: str, description: str) -> None:
        if not ok:
            self.violations.append(FieldViolation(field, description))

    def inputs(self, values: Sequence[str], field: str, what: str) -> None:
        limit = self.settings.max_task_inputs
        self.require(bool(values), field, f"at least one {what} is required")
        if len(values) > limit:
            # Over the limit the entries are not looked at: a request may carry millions of them.
            self.require(False, field, f"{len(values)} {what}s; the limit is {limit} (GENLOOM_TASKS_MAX_INPUTS)")
            return
        for i, value in enumerate(values):
            self.require(bool(value.strip()), f"{field}[{i}]", f"the {what} is empty")

    def enum(self, value: int, enum: object, field: str) -> None:
        names = enum.DESCRIPTOR.values_by_number  # type: ignore[attr-defined]
        self.require(value in names, field, f"{value} is not a valid {enum.DESCRIPTOR.name}")  # type: ignore[attr-defined]

    def common(
        self,
        *,
        strategy: int,
        examples: int,
        max_examples: int,
        instruction: str,
        truncation: int,
    ) -> None:
        self.enum(strategy, tasks_pb2.PromptStrategy, "strategy")
        self.enum(truncation, common_pb2.TruncationSide, "truncation")
        limit = self.settings.max_examples
        self.require(
            examples <= limit, "examples", f"{examples} examples; the limit is {limit} (GENLOOM_TASKS_MAX_EXAMPLES)"
        )
        self.require(len(instruction) <= MAX_INSTRUCTION, "instruction", f"longer than {MAX_INSTRUCTION} characters")
        self.require(max_examples <= limit, "max_examples", f"{max_examples} is over the limit of {limit} examples")
        if strategy == tasks_pb2.PROMPT_STRATEGY_ONE_SHOT or strategy == tasks_pb2.PROMPT_STRATEGY_FEW_SHOT:
            name = tasks_pb2.PromptStrategy.Name(strategy)
            self.require(examples > 0, "examples", f"{name} needs at least one example")

    def sampling(self, params: inference_pb2.SamplingParams, field: str = "sampling") -> None:
        """The shared sampling check (the one the inference service runs), so a bad value is refused here with its
        task field named. Left to the inference service: the number of stop sequences (the task adds its own) and
        logprobs (tasks set it themselves); the vocabulary checks wait for the model (see `vocabulary`)."""
        limits = SamplingLimits(default_max_new_tokens=None)
        self.violations.extend(check_sampling(params, limits, field))

    def vocabulary(self, params: inference_pb2.SamplingParams, vocab_size: int, field: str = "sampling") -> None:
        """The sampling checks that need the model's vocabulary (top_k, stop_token_ids), once it is known."""
        self.violations.extend(check_vocabulary(params, vocab_size, field))

    def chunking(self, options: tasks_pb2.ChunkingOptions, field: str = "chunking") -> None:
        size = options.chunk_tokens
        self.require(size == 0 or size >= 64, f"{field}.chunk_tokens", f"{size} is below the minimum of 64")
        if size and options.HasField("overlap_tokens"):
            self.require(
                options.overlap_tokens * 2 < size,
                f"{field}.overlap_tokens",
                f"{options.overlap_tokens} must be less than half of chunk_tokens ({size})",
            )

    def target_length(self, target: tasks_pb2.SummaryLength, field: str = "target_length") -> None:
        self.enum(target.unit, tasks_pb2.SummaryLengthUnit, f"{field}.unit")
        if target.unit == tasks_pb2.SUMMARY_LENGTH_UNIT_WORDS:
            self.require(1 <= target.value <= MAX_WORDS, f"{field}.value", f"must be 1 to {MAX_WORDS} words")
        elif target.unit == tasks_pb2.SUMMARY_LENGTH_UNIT_SENTENCES:
            self.require(
                1 <= target.value <= MAX_SENTENCES, f"{field}.value", f"must be 1 to {MAX_SENTENCES} sentences"
            )

    def summarize_examples(self, examples: Sequence[tasks_pb2.SummarizeExample], field: str = "examples") -> None:
        for i, e in enumerate(examples[: self.settings.max_examples]):
            self.require(bool(e.document.strip()), f"{field}[{i}].document", "is empty")
            self.require(bool(e.summary.strip()), f"{field}[{i}].summary", "is empty")

    def answer_examples(self, examples: Sequence[tasks_pb2.AnswerExample], field: str = "examples") -> None:
        for i, e in enumerate(examples[: self.settings.max_examples]):
            self.require(bool(e.question.strip()), f"{field}[{i}].question", "is empty")
            self.require(
                e.unanswerable or bool(e.answer.strip()),
                f"{field}[{i}].answer",
                "is empty (set unanswerable for an example without an answer)",
            )

    def labels(self, labels: Sequence[tasks_pb2.ClassLabel], multi_label: bool, field: str = "labels") -> None:
        minimum = 1 if multi_label else 2
        limit = self.settings.max_labels
        self.require(
            len(labels) >= minimum,
            field,
            ("multi-label classification needs at least 1 label" if multi_label else "at least 2 labels are required")
            + f" (got {len(labels)})",
        )
        if len(labels) > limit:
            self.require(False, field, f"{len(labels)} labels; the limit is {limit} (GENLOOM_TASKS_MAX_LABELS)")
            return
        seen: set[str] = set()
        for i, label in enumerate(labels):
            name = label.name
            self.require(bool(name.strip()), f"{field}[{i}].name", "is empty")
            self.require(name == name.strip(), f"{field}[{i}].name", "has leading or trailing whitespace")
            self.require(len(name) <= MAX_LABEL_NAME, f"{field}[{i}].name", f"longer than {MAX_LABEL_NAME} characters")
            self.require(name not in seen, f"{field}[{i}].name", f"duplicate label {quote(name)}")
            self.require(
                len(label.description) <= MAX_LABEL_DESCRIPTION,
                f"{field}[{i}].description",
                f"longer than {MAX_LABEL_DESCRIPTION} characters",
            )
            seen.add(name)

    def classify_examples(
        self,
        examples: Sequence[tasks_pb2.ClassifyExample],
        names: set[str],
        multi_label: bool,
        field: str = "examples",
    ) -> None:
        for i, e in enumerate(examples[: self.settings.max_examples]):
            self.require(bool(e.text.strip()), f"{field}[{i}].text", "is empty")
            if multi_label:
                self.require(len(e.labels) >= 1, f"{field}[{i}].labels", "needs at least one label")
            else:
                self.require(
                    len(e.labels) == 1, f"{field}[{i}].labels", f"needs exactly one label (got {len(e.labels)})"
                )
            limit = self.settings.max_labels
            if len(e.labels) > limit:
                self.require(False, f"{field}[{i}].labels", f"{len(e.labels)} labels; the limit is {limit}")
                continue
            for j, label in enumerate(e.labels):
                self.require(
                    label in names, f"{field}[{i}].labels[{j}]", f"{quote(label)} is not one of the request's labels"
                )

"""The task service's core: the settings and upstream channels every task shares, the TaskContext built per
request (model facts, prompt strategy, example limit), and each task's checked options. TaskServicer
(services/tasks/servicer.py) turns requests into calls on it; Evaluation (services/tasks/evaluate.py) runs each
dataset item through it, so an evaluated item goes through the same checks and context as an RPC's input."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from genloom.services.server.errors import FieldViolation, InvalidArgument
from genloom.services.tasks.answer import AnswerOptions
from genloom.services.tasks.classify import DEFAULT_THRESHOLD, ClassifyOptions
from genloom.services.tasks.context import TaskContext, resolve_strategy
from genloom.services.tasks.settings import TasksSettings
from genloom.services.tasks.summarize import SummarizeOptions
from genloom.services.tasks.upstream import Upstream
from genloom.services.tasks.validation import Checks
from genloom.v1 import common_pb2, inference_pb2, tasks_pb2

#: The requests of the task RPCs that run on one model with one prompt strategy.
TaskRequest = (
    tasks_pb2.SummarizeRequest | tasks_pb2.SummarizeStreamRequest | tasks_pb2.AnswerRequest | tasks_pb2.ClassifyRequest
)


class TaskCore:
    """What task code needs from the service around it: settings, upstream, contexts and checked options."""

    def __init__(self, settings: TasksSettings, upstream: Upstream) -> None:
        self.settings = settings
        self.upstream = upstream

    async def context(self, model: common_pb2.ModelRef, strategy: int, examples: int, max_examples: int) -> TaskContext:
        facts = await self.upstream.model_facts(model.model)
        return TaskContext(
            upstream=self.upstream,
            settings=self.settings,
            model=model,
            facts=facts,
            strategy=resolve_strategy(strategy, examples, max_examples, "examples"),
            semaphore=asyncio.Semaphore(self.settings.max_concurrency),
        )

    async def request_context(self, request: TaskRequest) -> TaskContext:
        """The context of a task RPC: its model's facts and strategy, with the sampling checks that need the
        model's vocabulary done."""
        ctx = await self.context(request.model, request.strategy, len(request.examples), request.max_examples)
        self.check_vocabulary(request.sampling, ctx)
        return ctx

    def check_vocabulary(self, params: inference_pb2.SamplingParams, ctx: TaskContext, field: str = "sampling") -> None:
        """The sampling checks that need the model's vocabulary (top_k, stop_token_ids), once it is known; the rest
        ran before the model was asked for."""
        checks = Checks(self.settings)
        checks.vocabulary(params, ctx.facts.vocab_size, field)
        InvalidArgument.raise_for(checks.violations)

    def summarize_options(
        self,
        request: tasks_pb2.SummarizeRequest | tasks_pb2.SummarizeStreamRequest,
        documents: Sequence[str],
        field: str,
    ) -> SummarizeOptions:
        checks = Checks(self.settings)
        if isinstance(request, tasks_pb2.SummarizeStreamRequest):
            checks.require(bool(request.document.strip()), "document", "the document is empty")
        else:
            checks.inputs(documents, field, "document")
        checks.common(
            strategy=request.strategy,
            examples=len(request.examples),
            max_examples=request.max_examples,
            instruction=request.instruction,
            truncation=request.truncation,
        )
        checks.enum(request.format, tasks_pb2.SummaryFormat, "format")
        checks.target_length(request.target_length)
        checks.summarize_examples(request.examples)
        checks.chunking(request.chunking)
        checks.sampling(request.sampling)
        InvalidArgument.raise_for(checks.violations)
        return SummarizeOptions(
            examples=list(request.examples),
            target=request.target_length if request.HasField("target_length") else None,
            fmt=request.format or tasks_pb2.SUMMARY_FORMAT_PROSE,
            instruction=request.instruction,
            sampling=request.sampling,
            chunking=request.chunking,
            truncation=request.truncation,
        )

    def answer_options(self, request: tasks_pb2.AnswerRequest) -> AnswerOptions:
        checks = Checks(self.settings)
        checks.inputs([item.question for item in request.items], "items", "question")
        checks.common(
            strategy=request.strategy,
            examples=len(request.examples),
            max_examples=request.max_examples,
            instruction=request.instruction,
            truncation=request.truncation,
        )
        checks.answer_examples(request.examples)
        checks.chunking(request.chunking)
        checks.sampling(request.sampling)
        InvalidArgument.raise_for(_rename(checks.violations, "items[", ".question"))
        return AnswerOptions(
            examples=list(request.examples),
            allow_unanswerable=request.allow_unanswerable,
            instruction=request.instruction,
            sampling=request.sampling,
            chunking=request.chunking,
            truncation=request.truncation,
        )

    def classify_options(self, request: tasks_pb2.ClassifyRequest, *, check_texts: bool = True) -> ClassifyOptions:
        checks = Checks(self.settings)
        if check_texts:
            checks.inputs(list(request.texts), "texts", "text")
        checks.common(
            strategy=request.strategy,
            examples=len(request.examples),
            max_examples=request.max_examples,
            instruction=request.instruction,
            truncation=request.truncation,
        )
        checks.labels(request.labels, request.multi_label)
        checks.classify_examples(request.examples, {lb.name for lb in request.labels}, request.multi_label)
        checks.enum(request.method, tasks_pb2.ClassifyMethod, "method")
        method = request.method or tasks_pb2.CLASSIFY_METHOD_SCORE
        checks.require(
            not (request.calibrate and method == tasks_pb2.CLASSIFY_METHOD_GENERATE),
            "calibrate",
            "calibration needs the SCORE method (GENERATE gives no probabilities to calibrate)",
        )
        threshold = request.threshold if request.HasField("threshold") else DEFAULT_THRESHOLD
        checks.require(0.0 <= threshold <= 1.0, "threshold", f"{threshold:g} is outside 0.0 to 1.0")
        checks.sampling(request.sampling)
        InvalidArgument.raise_for(checks.violations)
        return ClassifyOptions(
            labels=list(request.labels),
            multi_label=request.multi_label,
            method=method,
            calibrate=request.calibrate,
            examples=list(request.examples),
            instruction=request.instruction,
            sampling=request.sampling,
            truncation=request.truncation,
            threshold=threshold,
            normalize_by_length=request.normalize_by_length,
        )


def _rename(violations: Sequence[FieldViolation], prefix: str, suffix: str) -> list[FieldViolation]:
    """Checks.inputs names items "items[i]"; an Answer item's text is its question."""
    out = []
    for v in violations:
        if v.field.startswith(prefix) and v.field.endswith("]"):
            v = type(v)(v.field + suffix, v.description)
        out.append(v)
    return out

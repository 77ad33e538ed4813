"""TaskService: validates task requests, builds a TaskContext per request and runs each input's task
concurrently through the tokenizer and inference services (see services/tasks/upstream.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import grpc

from genloom.services.server.errors import InvalidArgument
from genloom.services.tasks.answer import AnswerOptions, answer
from genloom.services.tasks.classify import DEFAULT_THRESHOLD, ClassifyOptions, ScoreBatch, classify
from genloom.services.tasks.context import TaskContext, resolve_strategy
from genloom.services.tasks.settings import TasksSettings
from genloom.services.tasks.summarize import SummarizeOptions, summarize
from genloom.services.tasks.upstream import Upstream, deadline_var
from genloom.services.tasks.validation import Checks
from genloom.v1 import common_pb2, inference_pb2, tasks_pb2, tasks_pb2_grpc

T = TypeVar("T")


class TaskServicer(tasks_pb2_grpc.TaskServiceServicer):
    name = tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name

    def __init__(self, settings: TasksSettings | None = None) -> None:
        self.settings = settings or TasksSettings()
        self.upstream = Upstream(self.settings)

    # -- Service protocol ---------------------------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(self, server)

    def bind_local_target(self, target: str, api_key: str, root_cert: bytes | None) -> None:
        self.upstream.bind_local(target, api_key, root_cert)

    async def start(self) -> None:
        await self.upstream.start()

    async def close(self) -> None:
        await self.upstream.close()

    # -- RPCs -----------------------------------------------------------------------------------------------------

    async def Summarize(
        self, request: tasks_pb2.SummarizeRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.SummarizeResponse:
        _set_deadline(context)
        options = self._summarize_options(request, list(request.documents), "documents")
        ctx = await self._context(request.model, request.strategy, len(request.examples), request.max_examples)
        self._check_vocabulary(request.sampling, ctx)

        async def one(i: int, document: str) -> tasks_pb2.SummaryResult:
            result = None
            async for event in summarize(ctx, document, options, f"documents[{i}]"):
                result = event
            assert isinstance(result, tasks_pb2.SummaryResult)
            return result

        results = await _gather([one(i, d) for i, d in enumerate(request.documents)])
        response = tasks_pb2.SummarizeResponse(model=ctx.model_ref(), results=results)
        response.usage.CopyFrom(_total_usage(r.usage for r in results))
        return response

    async def SummarizeStream(
        self, request: tasks_pb2.SummarizeStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tasks_pb2.SummarizeStreamResponse]:
        _set_deadline(context)
        options = self._summarize_options(request, [request.document], "document")
        ctx = await self._context(request.model, request.strategy, len(request.examples), request.max_examples)
        self._check_vocabulary(request.sampling, ctx)
        async for event in summarize(ctx, request.document, options, "document", stream=True):
            if isinstance(event, str):
                yield tasks_pb2.SummarizeStreamResponse(delta=tasks_pb2.SummaryDelta(text=event))
            elif isinstance(event, tasks_pb2.SummarizeProgress):
                yield tasks_pb2.SummarizeStreamResponse(progress=event)
            else:
                finish = tasks_pb2.SummarizeStreamFinish(
                    model=ctx.model_ref(), finish_reason=event.finish_reason, context=event.context, usage=event.usage
                )
                yield tasks_pb2.SummarizeStreamResponse(finish=finish)

    async def Answer(
        self, request: tasks_pb2.AnswerRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.AnswerResponse:
        _set_deadline(context)
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
        InvalidArgument.raise_for(_rename(checks.violations, "items[", ".question", "items"))
        options = AnswerOptions(
            examples=list(request.examples),
            allow_unanswerable=request.allow_unanswerable,
            instruction=request.instruction,
            sampling=request.sampling,
            chunking=request.chunking,
            truncation=request.truncation,
        )
        ctx = await self._context(request.model, request.strategy, len(request.examples), request.max_examples)
        self._check_vocabulary(request.sampling, ctx)
        results = await _gather([answer(ctx, item, options, f"items[{i}]") for i, item in enumerate(request.items)])
        response = tasks_pb2.AnswerResponse(model=ctx.model_ref(), results=results)
        response.usage.CopyFrom(_total_usage(r.usage for r in results))
        return response

    async def Classify(
        self, request: tasks_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.ClassifyResponse:
        _set_deadline(context)
        options = self.classify_options(request)
        ctx = await self._context(request.model, request.strategy, len(request.examples), request.max_examples)
        self._check_vocabulary(request.sampling, ctx)
        batch = None
        if options.method == tasks_pb2.CLASSIFY_METHOD_SCORE and not options.multi_label:
            batch = ScoreBatch(ctx, len(request.texts))
        results = await _gather([classify(ctx, t, options, f"texts[{i}]", batch) for i, t in enumerate(request.texts)])
        response = tasks_pb2.ClassifyResponse(model=ctx.model_ref(), results=results)
        response.usage.CopyFrom(_total_usage(r.usage for r in results))
        return response

    async def Evaluate(
        self, request: tasks_pb2.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tasks_pb2.EvaluateResponse]:
        from genloom.services.tasks.evaluate import Evaluation

        _set_deadline(context)
        evaluation = Evaluation(self, request)
        await evaluation.prepare()
        async for message in evaluation.run():
            yield message

    # -- building blocks (also used by Evaluate) ---------------------------------------------------------------------

    async def _context(
        self, model: common_pb2.ModelRef, strategy: int, examples: int, max_examples: int
    ) -> TaskContext:
        facts = await self.upstream.model_facts(model.model)
        return TaskContext(
            upstream=self.upstream,
            settings=self.settings,
            model=model,
            facts=facts,
            strategy=resolve_strategy(strategy, examples, max_examples, "examples"),
            semaphore=asyncio.Semaphore(self.settings.max_concurrency),
        )

    def _check_vocabulary(
        self, params: inference_pb2.SamplingParams, ctx: TaskContext, field: str = "sampling"
    ) -> None:
        """The sampling checks that need the model's vocabulary (top_k, stop_token_ids), once it is known; the rest
        ran before the model was asked for."""
        checks = Checks(self.settings)
        checks.vocabulary(params, ctx.facts.vocab_size, field)
        InvalidArgument.raise_for(checks.violations)

    def _summarize_options(self, request: Any, documents: Sequence[str], field: str) -> SummarizeOptions:
        checks = Checks(self.settings)
        if field == "document":
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


def _set_deadline(context: grpc.aio.ServicerContext) -> None:
    remaining = context.time_remaining()
    deadline_var.set(None if remaining is None else time.monotonic() + remaining)


async def _gather(coroutines: Sequence[Awaitable[T]]) -> list[T]:
    """Run concurrently; the first failure cancels the rest and is raised as is (not as an ExceptionGroup)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _total_usage(usages: Any) -> common_pb2.Usage:
    total = common_pb2.Usage()
    for u in usages:
        total.prompt_tokens += u.prompt_tokens
        total.completion_tokens += u.completion_tokens
        total.total_tokens += u.total_tokens
    return total


def _rename(violations: Any, prefix: str, suffix: str, field: str) -> Any:
    """Checks.inputs names items "items[i]"; an Answer item's text is its question."""
    out = []
    for v in violations:
        if v.field.startswith(prefix) and v.field.endswith("]"):
            v = type(v)(v.field + suffix, v.description)
        out.append(v)
    return out

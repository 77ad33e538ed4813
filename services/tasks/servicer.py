"""TaskService: validates task requests, builds a TaskContext per request and runs each input's task
concurrently through the tokenizer and inference services (see services/tasks/upstream.py). The checks and the
context come from TaskCore (services/tasks/core.py), which Evaluate's items go through as well."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import TypeVar

import grpc

from genloom.services.tasks.answer import answer
from genloom.services.tasks.classify import ScoreBatch, classify
from genloom.services.tasks.core import TaskCore
from genloom.services.tasks.evaluate import Evaluation
from genloom.services.tasks.settings import TasksSettings
from genloom.services.tasks.summarize import summarize
from genloom.services.tasks.upstream import Upstream, deadline_var
from genloom.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc

T = TypeVar("T")


class TaskServicer(tasks_pb2_grpc.TaskServiceServicer):
    name = tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name

    def __init__(self, settings: TasksSettings | None = None) -> None:
        self.settings = settings or TasksSettings()
        self.upstream = Upstream(self.settings)
        self.core = TaskCore(self.settings, self.upstream)

    # -- Service protocol ---------------------------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        # The generated registration function carries no annotations.
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
        options = self.core.summarize_options(request, list(request.documents), "documents")
        ctx = await self.core.request_context(request)

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
        options = self.core.summarize_options(request, [request.document], "document")
        ctx = await self.core.request_context(request)
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
        options = self.core.answer_options(request)
        ctx = await self.core.request_context(request)
        results = await _gather([answer(ctx, item, options, f"items[{i}]") for i, item in enumerate(request.items)])
        response = tasks_pb2.AnswerResponse(model=ctx.model_ref(), results=results)
        response.usage.CopyFrom(_total_usage(r.usage for r in results))
        return response

    async def Classify(
        self, request: tasks_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.ClassifyResponse:
        _set_deadline(context)
        options = self.core.classify_options(request)
        ctx = await self.core.request_context(request)
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
        _set_deadline(context)
        evaluation = Evaluation(self.core, request)
        await evaluation.prepare()
        async for message in evaluation.run():
            yield message


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


def _total_usage(usages: Iterable[common_pb2.Usage]) -> common_pb2.Usage:
    total = common_pb2.Usage()
    for u in usages:
        total.prompt_tokens += u.prompt_tokens
        total.completion_tokens += u.completion_tokens
        total.total_tokens += u.total_tokens
    return total

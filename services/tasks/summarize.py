"""Summarize one document: a single prompt when it fits; otherwise map over chunks concurrently and reduce the
chunk summaries (recursively, in groups that fit) into the final summary; or truncate when chunking is off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from genloom.services.server.errors import InvalidArgument
from genloom.services.tasks.context import (
    CHUNK_MARGIN,
    Fitted,
    Measured,
    Tally,
    TaskContext,
    generate_request,
    sampling_for,
)
from genloom.services.tasks.prompts import PromptSpec, summaries_turn, summarize_prompt
from genloom.v1 import common_pb2, inference_pb2, tasks_pb2

MAX_REDUCE_ROUNDS = 8
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class SummarizeOptions:
    examples: Sequence[tasks_pb2.SummarizeExample]
    target: tasks_pb2.SummaryLength | None
    fmt: int
    instruction: str
    sampling: inference_pb2.SamplingParams
    chunking: tasks_pb2.ChunkingOptions
    truncation: common_pb2.TruncationSide

    @property
    def max_new_tokens(self) -> int:
        if self.sampling.max_new_tokens:
            return self.sampling.max_new_tokens
        # The task's budget, raised to the caller's min_new_tokens (inference refuses min > max).
        return max(default_max_new_tokens(self.target), self.sampling.min_new_tokens)

    def prompt(self, document: str) -> PromptSpec:
        return summarize_prompt(document, self.examples, target=self.target, fmt=self.fmt, instruction=self.instruction)


def default_max_new_tokens(target: tasks_pb2.SummaryLength | None) -> int:
    """Room for a summary of the target length (about 1.5 tokens a word, 40 a sentence), plus slack."""
    if target is None or target.unit == tasks_pb2.SUMMARY_LENGTH_UNIT_UNSPECIFIED:
        return DEFAULT_MAX_NEW_TOKENS
    if target.unit == tasks_pb2.SUMMARY_LENGTH_UNIT_WORDS:
        return int(target.value * 1.5) + 32
    return target.value * 40 + 32


# Events of a summary: progress of map/reduce, deltas of the final text (streaming only), then the result.
Event = tasks_pb2.SummarizeProgress | str | tasks_pb2.SummaryResult


def _plain_stops(ctx: TaskContext) -> list[str]:
    # Without a chat template nothing marks the end of the reply: a blank line is the next example's start.
    return [] if ctx.chat else ["\n\n"]


async def summarize(
    ctx: TaskContext, document: str, options: SummarizeOptions, field: str, *, stream: bool = False
) -> AsyncIterator[Event]:
    """Yields progress (chunked documents only), text deltas of the final summary when `stream`, and last the
    SummaryResult."""
    reserve = options.max_new_tokens
    tally = Tally()
    report = tasks_pb2.ContextReport(
        context_window=ctx.window, max_new_tokens=reserve, examples_given=len(options.examples)
    )
    measured = await ctx.measure(options.prompt(document), document)
    report.input_tokens = measured.input_tokens
    fitted = await ctx.fit("summarize", measured, reserve)
    if fitted is not None:
        report.chunks = 1
    elif options.chunking.disabled:  # truncate per the request, or INVALID_ARGUMENT when it names no side
        fitted, _, removed = await ctx.truncate(options.prompt, measured, reserve, options.truncation, field)
        report.chunks = 1
        report.truncated = True
        report.truncation_side = options.truncation
        report.removed_tokens = removed
    else:
        async for event in _map_reduce(ctx, measured, options, report, tally, field):
            if isinstance(event, Fitted):
                fitted = event
            else:
                yield event
        assert fitted is not None
        yield tasks_pb2.SummarizeProgress(stage=tasks_pb2.SUMMARIZE_STAGE_FINAL, done=0, total=1)
    report.examples_used = fitted.examples_used
    report.prompt_tokens = len(fitted.ids)
    sampling = sampling_for(options.sampling, reserve, _plain_stops(ctx))
    result = tasks_pb2.SummaryResult(context=report)
    if stream:
        request = inference_pb2.GenerateStreamRequest(
            model=ctx.model,
            prompt=generate_request(ctx, fitted.ids, sampling).prompt,
            sampling=sampling,
        )
        pieces: list[str] = []
        strip = _StreamStrip()
        finish = None
        async with ctx.semaphore:
            async for message in ctx.upstream.generate_stream(request):
                if message.HasField("delta") and message.delta.text:
                    piece = strip.feed(message.delta.text)
                    if piece:
                        pieces.append(piece)
                        yield piece
                elif message.HasField("finish"):
                    finish = message.finish
        assert finish is not None, "the inference stream ended without a finish message"
        ctx.note_model(finish.model)
        text = "".join(pieces)
        finish_reason = finish.finish_reason
        completion = finish.usage.completion_tokens
    else:
        response = await ctx.generate(generate_request(ctx, fitted.ids, sampling))
        text, finish_reason, completion = response.text, response.finish_reason, response.usage.completion_tokens
    tally.add(len(fitted.ids), completion)
    result.summary = text.strip()
    result.finish_reason = finish_reason
    report.max_prompt_tokens = tally.max_prompt
    report.model_calls = tally.calls
    result.context.CopyFrom(report)
    result.usage.CopyFrom(tally.usage())
    yield result


async def _map_reduce(
    ctx: TaskContext,
    measured: Measured,
    options: SummarizeOptions,
    report: tasks_pb2.ContextReport,
    tally: Tally,
    field: str,
) -> AsyncIterator[tasks_pb2.SummarizeProgress | Fitted]:
    """Map: summarize each chunk. Reduce: while the summaries do not fit one prompt, summarize groups of them.
    Yields progress, and last the final prompt (a Fitted)."""
    reserve = options.max_new_tokens
    document = measured.input_text
    chosen, chunks, size = await ctx.plan_chunks("summarize", measured, reserve, options.chunking, field)
    report.chunks = len(chunks)
    report.chunk_tokens = size
    sampling = sampling_for(options.sampling, reserve, _plain_stops(ctx))

    async def summarize_part(spec: PromptSpec) -> tuple[str, int]:
        fitted = await ctx.fit_chunk(spec, chosen, reserve)
        response = await ctx.generate(generate_request(ctx, fitted.ids, sampling))
        tally.add(len(fitted.ids), response.usage.completion_tokens)
        return response.text.strip(), response.usage.completion_tokens

    specs = [options.prompt(c.text(document)) for c in chunks]
    parts: list[tuple[str, int]] = []
    async for progress, done in _run_all(specs, summarize_part, tasks_pb2.SUMMARIZE_STAGE_MAP, 0):
        yield progress
        parts = done
    for round_number in range(1, MAX_REDUCE_ROUNDS + 2):
        final_spec = options.prompt("").with_query(summaries_turn([text for text, _ in parts]))
        (base,) = await ctx.tokenize([final_spec])
        if base.count + reserve <= ctx.window:
            costs = await ctx.example_costs("summarize", final_spec)
            examples = ctx.choose_examples(costs, ctx.window - reserve - base.count)
            report.reduce_rounds = round_number - 1
            yield await ctx.verify(final_spec, list(base.ids), examples, reserve)
            return
        if round_number > MAX_REDUCE_ROUNDS:
            break
        groups = _group(parts, ctx.window - reserve - (base.count - sum(n for _, n in parts)) - CHUNK_MARGIN)
        if len(groups) >= len(parts):
            break
        specs = [options.prompt("").with_query(summaries_turn([t for t, _ in g])) for g in groups]

        async def reduce_group(spec: PromptSpec) -> tuple[str, int]:
            (ids,) = await ctx.tokenize([spec])
            if ids.count + reserve > ctx.window:
                raise InvalidArgument.field(field, "chunk summaries could not be combined within the context window")
            response = await ctx.generate(generate_request(ctx, list(ids.ids), sampling))
            tally.add(ids.count, response.usage.completion_tokens)
            return response.text.strip(), response.usage.completion_tokens

        async for progress, done in _run_all(specs, reduce_group, tasks_pb2.SUMMARIZE_STAGE_REDUCE, round_number):
            yield progress
            parts = done
    raise InvalidArgument.field(
        field,
        f"the chunk summaries do not shrink enough to fit one {ctx.window}-token prompt; lower max_new_tokens or "
        "the target length",
    )


def _group(parts: Sequence[tuple[str, int]], room: int) -> list[list[tuple[str, int]]]:
    """Consecutive summaries packed into groups of about `room` tokens (each summary costs its tokens plus a
    few for its "Part n:" header)."""
    groups: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    used = 0
    for part in parts:
        cost = part[1] + 8
        if current and used + cost > room:
            groups.append(current)
            current, used = [], 0
        current.append(part)
        used += cost
    if current:
        groups.append(current)
    return groups


async def _run_all(
    specs: Sequence[PromptSpec],
    run: Callable[[PromptSpec], Awaitable[tuple[str, int]]],
    stage: tasks_pb2.SummarizeStage,
    round_number: int,
) -> AsyncIterator[tuple[tasks_pb2.SummarizeProgress, list[tuple[str, int]]]]:
    """Run `run(spec)` for every spec concurrently; yield (progress, results so far in order) after each."""
    total = len(specs)
    yield tasks_pb2.SummarizeProgress(stage=stage, done=0, total=total, reduce_round=round_number), []
    results: list[tuple[str, int] | None] = [None] * total

    async def one(i: int) -> int:
        results[i] = await run(specs[i])
        return i

    tasks = [asyncio.create_task(one(i)) for i in range(total)]
    try:
        for done, next_done in enumerate(asyncio.as_completed(tasks), start=1):
            await next_done
            progress = tasks_pb2.SummarizeProgress(stage=stage, done=done, total=total, reduce_round=round_number)
            yield progress, ([r for r in results if r is not None] if done == total else [])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _StreamStrip:
    """Streams text with leading and trailing whitespace removed, so the deltas join to exactly the summary the
    unary call returns (trailing whitespace is held back until more text follows)."""

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def feed(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body) :]
        return body

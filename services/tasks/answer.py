"""Answer one question: closed-book, from a context that fits, or from each chunk of a long context with the
best-scored answer kept (mean token log-probability; "unanswerable" replies rank below every answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from genloom.services.tasks.chunking import Chunk
from genloom.services.tasks.context import Fitted, Tally, TaskContext, generate_request, sampling_for
from genloom.services.tasks.prompts import UNANSWERABLE, PromptSpec, answer_prompt
from genloom.v1 import common_pb2, inference_pb2, tasks_pb2

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class AnswerOptions:
    examples: Sequence[tasks_pb2.AnswerExample]
    allow_unanswerable: bool
    instruction: str
    sampling: inference_pb2.SamplingParams
    chunking: tasks_pb2.ChunkingOptions
    truncation: common_pb2.TruncationSide

    @property
    def max_new_tokens(self) -> int:
        # Without a max the task's budget, raised to the caller's min_new_tokens (inference refuses min > max).
        return self.sampling.max_new_tokens or max(DEFAULT_MAX_NEW_TOKENS, self.sampling.min_new_tokens)

    def prompt(self, question: str, context: str) -> PromptSpec:
        # Examples that show "unanswerable" appear only when the model is allowed to say so.
        examples = [e for e in self.examples if self.allow_unanswerable or not e.unanswerable]
        return answer_prompt(
            question, context, examples, allow_unanswerable=self.allow_unanswerable, instruction=self.instruction
        )


@dataclass
class _Candidate:
    text: str
    unanswerable: bool
    score: float
    finish_reason: inference_pb2.FinishReason
    fitted: Fitted
    chunk: Chunk | None

    def rank(self) -> tuple[bool, float]:
        return (not self.unanswerable, self.score)


async def answer(
    ctx: TaskContext, item: tasks_pb2.AnswerItem, options: AnswerOptions, field: str
) -> tasks_pb2.AnswerResult:
    reserve = options.max_new_tokens
    tally = Tally()
    report = tasks_pb2.ContextReport(
        context_window=ctx.window, max_new_tokens=reserve, examples_given=len(options.examples)
    )
    sampling = sampling_for(options.sampling, reserve, [] if ctx.chat else ["\n"], logprobs=True)
    key = ("answer", bool(item.context))
    context = item.context
    spec = options.prompt(item.question, context)
    measured = await ctx.measure(spec, context or item.question)
    report.input_tokens = measured.input_tokens
    fitted = await ctx.fit(key, measured, reserve)
    candidates: list[_Candidate] = []
    if fitted is not None or options.chunking.disabled or not context:
        chunk = None
        if fitted is None:
            if not context:  # a closed-book question too long for the window: only truncation can help
                fitted, _, removed = await ctx.truncate(
                    lambda q: options.prompt(q, ""), measured, reserve, options.truncation, f"{field}.question"
                )
            else:
                fitted, context, removed = await ctx.truncate(
                    lambda c: options.prompt(item.question, c),
                    measured,
                    reserve,
                    options.truncation,
                    f"{field}.context",
                )
            report.truncated = True
            report.truncation_side = options.truncation
            report.removed_tokens = removed
        if item.context:
            report.chunks = 1
            start = 0 if options.truncation != 1 or not report.truncated else len(item.context) - len(context)
            chunk = Chunk(0, start, start + len(context), 0)
        candidates.append(await _ask(ctx, fitted, sampling, options, tally, chunk))
    else:
        chosen, chunks, size = await ctx.plan_chunks(key, measured, reserve, options.chunking, f"{field}.context")
        report.chunks = len(chunks)
        report.chunk_tokens = size

        async def ask_chunk(chunk: Chunk) -> _Candidate:
            part = await ctx.fit_chunk(options.prompt(item.question, chunk.text(context)), chosen, reserve)
            return await _ask(ctx, part, sampling, options, tally, chunk)

        candidates = list(await asyncio.gather(*(ask_chunk(c) for c in chunks)))
    best = max(candidates, key=_Candidate.rank)  # max keeps the first of equals: the earliest chunk
    report.prompt_tokens = len(best.fitted.ids)
    report.examples_used = best.fitted.examples_used
    report.max_prompt_tokens = tally.max_prompt
    report.model_calls = tally.calls
    result = tasks_pb2.AnswerResult(
        answer="" if best.unanswerable else best.text,
        unanswerable=best.unanswerable,
        score=best.score,
        finish_reason=best.finish_reason,
        context=report,
        usage=tally.usage(),
    )
    if best.chunk is not None and not best.unanswerable:
        c = best.chunk
        result.support.CopyFrom(
            tasks_pb2.SupportingChunk(chunk_index=c.index, text=item.context[c.start : c.end], start=c.start, end=c.end)
        )
    return result


async def _ask(
    ctx: TaskContext,
    fitted: Fitted,
    sampling: inference_pb2.SamplingParams,
    options: AnswerOptions,
    tally: Tally,
    chunk: Chunk | None,
) -> _Candidate:
    response = await ctx.generate(generate_request(ctx, fitted.ids, sampling))
    tally.add(len(fitted.ids), response.usage.completion_tokens)
    logprobs = [lp.logprob for lp in response.logprobs]
    score = sum(logprobs) / len(logprobs) if logprobs else 0.0
    text = response.text.strip()
    unanswerable = options.allow_unanswerable and is_unanswerable(text)
    return _Candidate(text, unanswerable, min(score, 0.0), response.finish_reason, fitted, chunk)


def is_unanswerable(text: str) -> bool:
    """The reply is the unanswerable marker (allowing case, trailing punctuation and a short tail)."""
    head = text.strip().strip(".!\"'`*").upper()
    return head.startswith(UNANSWERABLE) or head.startswith("UNANSWER")

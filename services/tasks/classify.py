"""Classify one text. SCORE (default): the labels are scored as continuations of one prompt through
InferenceService.Score and turned into probabilities, optionally calibrated against content-free inputs;
multi-label asks Yes/No per label. GENERATE: the model writes the label(s), mapped back onto the label set."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from genloom.services.tasks.context import Fitted, Tally, TaskContext, generate_request, sampling_for, softmax
from genloom.services.tasks.prompts import (
    CONTENT_FREE_INPUTS,
    NO,
    YES,
    PromptSpec,
    classify_prompt,
    label_question_prompt,
    reply_prefix,
    text_turn,
)
from genloom.v1 import common_pb2, inference_pb2, tasks_pb2, tokenizer_pb2

DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class ClassifyOptions:
    labels: Sequence[tasks_pb2.ClassLabel]
    multi_label: bool
    method: int  # ClassifyMethod, resolved (never UNSPECIFIED)
    calibrate: bool
    examples: Sequence[tasks_pb2.ClassifyExample]
    instruction: str
    sampling: inference_pb2.SamplingParams
    truncation: common_pb2.TruncationSide
    threshold: float
    normalize_by_length: bool

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    def prompt(self, text: str) -> PromptSpec:
        return classify_prompt(
            text, self.labels, self.examples, multi_label=self.multi_label, instruction=self.instruction
        )

    def question(self, text: str, *, label: str) -> PromptSpec:
        return label_question_prompt(text, label, self.labels, self.examples, instruction=self.instruction)


@dataclass
class _Scored:
    """One prompt's label (or Yes/No) log-probabilities."""

    fitted: Fitted
    logprobs: list[float]


async def classify(
    ctx: TaskContext, text: str, options: ClassifyOptions, field: str, batch: ScoreBatch | None = None
) -> tasks_pb2.ClassifyResult:
    """One text's classification. `batch`: the request's ScoreBatch, so that single-label SCORE prompts of all
    its texts are scored together (None: this text's prompt is scored on its own)."""
    tally = Tally()
    report = tasks_pb2.ContextReport(context_window=ctx.window, examples_given=len(options.examples))
    if options.method == tasks_pb2.CLASSIFY_METHOD_GENERATE:
        return await _generate(ctx, text, options, field, report, tally)
    if options.multi_label:
        return await _score_multi(ctx, text, options, field, report, tally)
    return await _score_single(ctx, text, options, field, report, tally, batch)


class ScoreBatch:
    """The single-label SCORE prompts of one Classify request, sent once every text has its prompt, in as few
    Score calls as the inference limits allow: the engine then runs one batched prefill instead of one small
    forward per text (benchmarks/classify.py)."""

    #: InferenceService's default Score limits (GENLOOM_SCORE_MAX_ITEMS / _SCORE_MAX_CANDIDATES).
    MAX_ITEMS = 64
    MAX_CANDIDATES = 256

    def __init__(self, ctx: TaskContext, expected: int) -> None:
        self._ctx = ctx
        self._expected = expected
        self._pending: list[tuple[Fitted, asyncio.Future[tuple[list[float], int]]]] = []

    async def score(self, fitted: Fitted, candidates: Sequence[str], mean: bool) -> tuple[list[float], int]:
        """The candidates' log-probabilities after `fitted`'s prompt, and its prompt tokens."""
        future: asyncio.Future[tuple[list[float], int]] = asyncio.get_running_loop().create_future()
        self._pending.append((fitted, future))
        if len(self._pending) == self._expected:
            await self._flush(candidates, mean)
        return await future

    async def _flush(self, candidates: Sequence[str], mean: bool) -> None:
        pending, self._pending = self._pending, []
        size = max(1, min(self.MAX_ITEMS, self.MAX_CANDIDATES // len(candidates)))
        groups = [pending[i : i + size] for i in range(0, len(pending), size)]
        try:
            responses = await asyncio.gather(
                *(
                    self._ctx.score(
                        inference_pb2.ScoreRequest(
                            model=self._ctx.model, items=[_score_item(f, candidates) for f, _ in group]
                        )
                    )
                    for group in groups
                )
            )
        except BaseException as err:
            for _, future in pending:
                if not future.done():
                    future.set_exception(err)
                    future.exception()  # retrieved: each waiter re-raises it
            raise
        for group, response in zip(groups, responses, strict=True):
            for (_, future), result in zip(group, response.results, strict=True):
                values = _candidate_values(result, mean)
                future.set_result((values, result.prompt_tokens))


async def _label_tokens(ctx: TaskContext, candidates: Sequence[str]) -> int:
    """Tokens of the longest candidate continuation (reserved next to the prompt)."""

    async def count() -> int:
        counts = await ctx.upstream.count(
            ctx.tokenizer_model, [tokenizer_pb2.TokenizerInput(text=c) for c in candidates]
        )
        return max(counts)

    return await ctx.once(("candidate-tokens", tuple(candidates)), count)


async def _fit(
    ctx: TaskContext,
    key: object,
    spec_for: Callable[[str], PromptSpec],
    text: str,
    reserve: int,
    options: ClassifyOptions,
    field: str,
    report: tasks_pb2.ContextReport,
) -> Fitted:
    """The text's prompt with the examples that fit; the text truncated per the request when it does not fit
    alone (classification never chunks: one decision needs the whole text in one prompt)."""
    measured = await ctx.measure(spec_for(text), text)
    report.input_tokens = measured.input_tokens
    fitted = await ctx.fit(key, measured, reserve)
    if fitted is None:
        fitted, _, removed = await ctx.truncate(spec_for, measured, reserve, options.truncation, field)
        report.truncated = True
        report.truncation_side = options.truncation
        report.removed_tokens = removed
    report.chunks = 1
    return fitted


def _candidate_values(result: inference_pb2.ScoreItemResult, mean: bool) -> list[float]:
    """Each candidate's summed (or, with `mean`, per-token mean) log-probability."""
    return [c.mean_logprob if mean else c.sum_logprob for c in result.candidates]


def _score_item(fitted: Fitted, candidates: Sequence[str]) -> inference_pb2.ScoreItem:
    return inference_pb2.ScoreItem(
        prompt=inference_pb2.Prompt(token_ids=tokenizer_pb2.TokenIds(ids=fitted.ids)), candidates=candidates
    )


async def _score(
    ctx: TaskContext, fitted: Sequence[Fitted], candidates: Sequence[str], mean: bool, tally: Tally | None
) -> list[_Scored]:
    response = await ctx.score(
        inference_pb2.ScoreRequest(model=ctx.model, items=[_score_item(f, candidates) for f in fitted])
    )
    out = []
    for f, result in zip(fitted, response.results, strict=True):
        if tally is not None:
            tally.add(result.prompt_tokens)
        values = _candidate_values(result, mean)
        out.append(_Scored(f, values))
    return out


async def _content_free(
    ctx: TaskContext, spec: PromptSpec, candidates: Sequence[str], mean: bool, tally: Tally, key: object
) -> list[float]:
    """The mean candidate probabilities over the content-free inputs, for the prompt with the same examples
    (computed once per request and example set; its calls are counted on the text that asked first)."""

    async def compute() -> list[float]:
        specs = [spec.with_query(text_turn(cf)) for cf in CONTENT_FREE_INPUTS]
        results = await ctx.tokenize(specs)
        fitted = [Fitted(s, list(r.ids)) for s, r in zip(specs, results, strict=True)]
        scored = await _score(ctx, fitted, candidates, mean, tally)
        probs = [softmax(s.logprobs) for s in scored]
        return [sum(p[j] for p in probs) / len(probs) for j in range(len(candidates))]

    return await ctx.once(("content-free", key, spec.used), compute)


def _calibrate(probs: Sequence[float], prior: Sequence[float]) -> list[float]:
    weights = [p / max(q, 1e-12) for p, q in zip(probs, prior, strict=True)]
    total = sum(weights)
    return [w / total for w in weights]


async def _score_single(
    ctx: TaskContext,
    text: str,
    options: ClassifyOptions,
    field: str,
    report: tasks_pb2.ContextReport,
    tally: Tally,
    batch: ScoreBatch | None,
) -> tasks_pb2.ClassifyResult:
    prefix = reply_prefix(ctx.chat)
    candidates = [prefix + name for name in options.names]
    reserve = await _label_tokens(ctx, candidates)
    fitted = await _fit(ctx, "classify", options.prompt, text, reserve, options, field, report)
    if batch is None:
        (scored,) = await _score(ctx, [fitted], candidates, options.normalize_by_length, tally)
    else:
        values, prompt_tokens = await batch.score(fitted, candidates, options.normalize_by_length)
        tally.add(prompt_tokens)
        scored = _Scored(fitted, values)
    probs = softmax(scored.logprobs)
    prior = [0.0] * len(probs)
    calibrated = probs
    if options.calibrate:
        prior = await _content_free(ctx, fitted.spec, candidates, options.normalize_by_length, tally, "single")
        calibrated = _calibrate(probs, prior)
    result = tasks_pb2.ClassifyResult()
    for name, p, raw, lp, q in zip(options.names, calibrated, probs, scored.logprobs, prior, strict=True):
        result.probabilities.add(
            label=name, probability=p, logprob=lp, uncalibrated_probability=raw, content_free_probability=q
        )
    top = max(range(len(calibrated)), key=lambda j: calibrated[j])
    result.label = options.names[top]
    result.labels.append(result.label)
    return _finish(result, report, fitted, tally, reserve=0)


async def _score_multi(
    ctx: TaskContext,
    text: str,
    options: ClassifyOptions,
    field: str,
    report: tasks_pb2.ContextReport,
    tally: Tally,
) -> tasks_pb2.ClassifyResult:
    prefix = reply_prefix(ctx.chat)
    candidates = [prefix + YES, prefix + NO]
    reserve = await _label_tokens(ctx, candidates)
    reports = [tasks_pb2.ContextReport() for _ in options.names]
    fitted = list(
        await asyncio.gather(
            *(
                _fit(ctx, ("multi", name), partial(options.question, label=name), text, reserve, options, field, r)
                for name, r in zip(options.names, reports, strict=True)
            )
        )
    )
    report.input_tokens = reports[0].input_tokens
    for label_report in reports:
        if label_report.truncated:
            report.truncated = True
            report.truncation_side = label_report.truncation_side
            report.removed_tokens = max(report.removed_tokens, label_report.removed_tokens)
    scored = await _score(ctx, fitted, candidates, False, tally)
    result = tasks_pb2.ClassifyResult()
    probabilities = []
    for name, s in zip(options.names, scored, strict=True):
        yes_no = softmax(s.logprobs)
        p = raw = yes_no[0]
        prior = 0.0
        if options.calibrate:
            cf = await _content_free(ctx, s.fitted.spec, candidates, False, tally, ("multi", name))
            prior = cf[0]
            p = _calibrate(yes_no, cf)[0]
        probabilities.append(p)
        result.probabilities.add(
            label=name,
            probability=p,
            logprob=s.logprobs[0],
            uncalibrated_probability=raw,
            content_free_probability=prior,
        )
    order = sorted(range(len(probabilities)), key=lambda j: -probabilities[j])
    result.label = options.names[order[0]]
    result.labels.extend(options.names[j] for j in order if probabilities[j] >= options.threshold)
    longest = max(fitted, key=lambda f: len(f.ids))
    return _finish(result, report, longest, tally, reserve=0, examples_used=min(f.examples_used for f in fitted))


async def _generate(
    ctx: TaskContext,
    text: str,
    options: ClassifyOptions,
    field: str,
    report: tasks_pb2.ContextReport,
    tally: Tally,
) -> tasks_pb2.ClassifyResult:
    names = options.names
    if options.sampling.max_new_tokens:
        reserve = options.sampling.max_new_tokens
    else:
        longest = await _label_tokens(ctx, [reply_prefix(ctx.chat) + n for n in names])
        reserve = longest * len(names) + 2 * len(names) + 4 if options.multi_label else longest + 4
        # The caller's min_new_tokens is a floor the task's own budget must not undercut (inference would refuse).
        reserve = max(reserve, options.sampling.min_new_tokens)
    fitted = await _fit(ctx, "classify", options.prompt, text, reserve, options, field, report)
    sampling = sampling_for(options.sampling, reserve, [] if ctx.chat else ["\n"])
    response = await ctx.generate(generate_request(ctx, fitted.ids, sampling))
    tally.add(len(fitted.ids), response.usage.completion_tokens)
    generated = response.text.strip()
    matched = map_labels(generated, names, options.multi_label)
    result = tasks_pb2.ClassifyResult(generated_text=generated)
    for name in names:
        result.probabilities.add(
            label=name,
            probability=1.0 if name in matched else 0.0,
            uncalibrated_probability=1.0 if name in matched else 0.0,
        )
    if matched:
        result.label = matched[0]
        result.labels.extend(matched)
    return _finish(result, report, fitted, tally, reserve=reserve)


def _finish(
    result: tasks_pb2.ClassifyResult,
    report: tasks_pb2.ContextReport,
    fitted: Fitted,
    tally: Tally,
    reserve: int,
    examples_used: int | None = None,
) -> tasks_pb2.ClassifyResult:
    """Completes the report from the prompt that decided (`examples_used`: when not that prompt's count) and
    attaches it and the usage to the result."""
    report.prompt_tokens = len(fitted.ids)
    report.examples_used = fitted.examples_used if examples_used is None else examples_used
    report.max_new_tokens = reserve
    report.max_prompt_tokens = tally.max_prompt
    report.model_calls = tally.calls
    result.context.CopyFrom(report)
    result.usage.CopyFrom(tally.usage())
    return result


_SEPARATORS = re.compile(r"[,;\n]|\band\b")
_EDGE = " \t\r\n.:!?\"'`*()[]-"


def map_labels(text: str, names: Sequence[str], multi_label: bool) -> list[str]:
    """Labels named by generated text: exact, then case-insensitive, then prefix match (the reply starts with a
    label name, or is the start of exactly one). Multi-label: each comma/semicolon/line-separated piece."""
    pieces = [p for p in (_SEPARATORS.split(text) if multi_label else [text.splitlines()[0] if text else ""])]
    found: list[str] = []
    for piece in pieces:
        label = _match_one(piece.strip(_EDGE), names)
        if label is not None and label not in found:
            found.append(label)
    return found if multi_label else found[:1]


def _match_one(piece: str, names: Sequence[str]) -> str | None:
    if not piece:
        return None
    if piece in names:
        return piece
    lowered = piece.lower()
    for name in names:
        if name.lower() == lowered:
            return name
    starts = [n for n in names if lowered.startswith(n.lower())]
    if starts:
        return max(starts, key=len)
    prefixed = [n for n in names if n.lower().startswith(lowered)]
    return prefixed[0] if len(prefixed) == 1 else None

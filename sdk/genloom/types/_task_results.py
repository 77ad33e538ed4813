"""Results of the task methods: summaries (whole and streamed), answers, classifications, and the context-window
report each carries. Built from the responses by the task resource; `genloom.types.tasks` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from genloom.types.inference import _FINISH, _SIDE, Usage
from genloom.v1 import inference_pb2, tasks_pb2

_STAGES = {
    tasks_pb2.SUMMARIZE_STAGE_MAP: "map",
    tasks_pb2.SUMMARIZE_STAGE_REDUCE: "reduce",
    tasks_pb2.SUMMARIZE_STAGE_FINAL: "final",
}


@dataclass(frozen=True)
class ContextReport:
    """What the server's context-window policy did for one input. Token counts are the tokenizer's."""

    context_window: int
    """The model's context window."""
    prompt_tokens: int
    """Tokens of the prompt whose output is the result (the only one, the final reduce, or the winning chunk's)."""
    max_prompt_tokens: int
    """Tokens of the largest prompt sent for this input."""
    max_new_tokens: int
    """Tokens reserved for generation per call (0 for classify with the score method)."""
    input_tokens: int
    """Tokens of the input itself (document, context or text) before chunking or truncation."""
    examples_given: int
    """Examples the request gave."""
    examples_used: int
    """Examples in the prompt after the strategy, max_examples and fitting."""
    chunks: int
    """Chunks the input was split into: 1 when it fit whole, 0 without an input context (closed-book)."""
    chunk_tokens: int
    """Chunk size used; 0 when not chunked."""
    reduce_rounds: int
    """Summarize: reduce passes after the map pass."""
    truncated: bool
    """Whether the input was truncated."""
    truncation_side: str | None
    """"left" or "right" when truncated."""
    removed_tokens: int
    """Input tokens removed by truncation."""
    model_calls: int
    """Inference calls made for this input (generations and scorings, including calibration)."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.ContextReport) -> ContextReport:
        return cls(
            context_window=pb.context_window,
            prompt_tokens=pb.prompt_tokens,
            max_prompt_tokens=pb.max_prompt_tokens,
            max_new_tokens=pb.max_new_tokens,
            input_tokens=pb.input_tokens,
            examples_given=pb.examples_given,
            examples_used=pb.examples_used,
            chunks=pb.chunks,
            chunk_tokens=pb.chunk_tokens,
            reduce_rounds=pb.reduce_rounds,
            truncated=pb.truncated,
            truncation_side=_SIDE.get(pb.truncation_side),
            removed_tokens=pb.removed_tokens,
            model_calls=pb.model_calls,
        )


def _finish(value: inference_pb2.FinishReason) -> str:
    return _FINISH.get(value, "unspecified")


@dataclass(frozen=True)
class SummaryResult:
    """One document's summary."""

    summary: str
    """The summary (bullets: "- " lines separated by newlines)."""
    finish_reason: str
    """Why the final generation ended ("length": the summary may be cut short)."""
    context: ContextReport
    """What the context-window policy did."""
    usage: Usage
    """Tokens used for this document over all its calls."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.SummaryResult) -> SummaryResult:
        return cls(pb.summary, _finish(pb.finish_reason), ContextReport.from_pb(pb.context), Usage.from_pb(pb.usage))


@dataclass(frozen=True)
class Summaries:
    """Result of `tasks.summarize()`: one result per document, also for a single document."""

    model: str
    """The model that answered (name resolved)."""
    adapter: str
    """The adapter used ("" for none)."""
    results: list[SummaryResult]
    """One per document, in order."""
    usage: Usage
    """Sum of the results' usage."""

    @property
    def summaries(self) -> list[str]:
        """The summary texts, in document order."""
        return [r.summary for r in self.results]

    @classmethod
    def from_pb(cls, pb: tasks_pb2.SummarizeResponse) -> Summaries:
        return cls(
            pb.model.model, pb.model.adapter, [SummaryResult.from_pb(r) for r in pb.results], Usage.from_pb(pb.usage)
        )


@dataclass(frozen=True)
class SummarizeProgress:
    """Progress of the map/reduce passes over a long document (only sent when it was chunked)."""

    stage: str
    """"map" (summarizing chunks), "reduce" (combining chunk summaries) or "final"."""
    done: int
    """Summaries finished in this stage."""
    total: int
    """Summaries this stage needs."""
    reduce_round: int
    """1-based reduce pass during "reduce"; else 0."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.SummarizeProgress) -> SummarizeProgress:
        return cls(_STAGES.get(pb.stage, "unspecified"), pb.done, pb.total, pb.reduce_round)


@dataclass(frozen=True)
class SummaryDelta:
    """A piece of the final summary's text."""

    text: str
    """Text to append."""


@dataclass(frozen=True)
class SummarizeFinish:
    """The end of a streamed summary."""

    model: str
    """The model that answered (name resolved)."""
    adapter: str
    """The adapter used ("" for none)."""
    finish_reason: str
    """Why the final generation ended."""
    context: ContextReport
    """What the context-window policy did."""
    usage: Usage
    """Tokens used over all calls."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.SummarizeStreamFinish) -> SummarizeFinish:
        return cls(
            pb.model.model,
            pb.model.adapter,
            _finish(pb.finish_reason),
            ContextReport.from_pb(pb.context),
            Usage.from_pb(pb.usage),
        )


SummarizeEvent = Union[SummarizeProgress, SummaryDelta, SummarizeFinish]  # noqa: UP007
"""What a summary stream yields: progress (chunked documents only), then deltas, then the finish."""


def summarize_event_from_pb(pb: tasks_pb2.SummarizeStreamResponse) -> SummarizeEvent | None:
    kind = pb.WhichOneof("event")
    if kind == "progress":
        return SummarizeProgress.from_pb(pb.progress)
    if kind == "delta":
        return SummaryDelta(pb.delta.text)
    if kind == "finish":
        return SummarizeFinish.from_pb(pb.finish)
    return None  # an event kind newer than this SDK


@dataclass(frozen=True)
class SupportingChunk:
    """The part of the context that produced an answer."""

    chunk_index: int
    """0-based chunk index (0 when the context was not chunked)."""
    text: str
    """The chunk's text."""
    start: int
    """Start in the context, in code points (Python string indices)."""
    end: int
    """End in the context (exclusive): `context[start:end] == text`."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.SupportingChunk) -> SupportingChunk:
        return cls(pb.chunk_index, pb.text, pb.start, pb.end)


@dataclass(frozen=True)
class AnswerResult:
    """One question's answer."""

    answer: str
    """The answer; "" when unanswerable."""
    unanswerable: bool
    """The model found no support for an answer (only with allow_unanswerable)."""
    support: SupportingChunk | None
    """The chunk that produced the answer; None for closed-book questions and unanswerable results."""
    score: float
    """Mean token log-probability of the answer (at most 0); what picks the best chunk's answer."""
    finish_reason: str
    """Why the chosen answer's generation ended."""
    context: ContextReport
    """What the context-window policy did."""
    usage: Usage
    """Tokens used for this question over all its calls."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.AnswerResult) -> AnswerResult:
        return cls(
            answer=pb.answer,
            unanswerable=pb.unanswerable,
            support=SupportingChunk.from_pb(pb.support) if pb.HasField("support") else None,
            score=pb.score,
            finish_reason=_finish(pb.finish_reason),
            context=ContextReport.from_pb(pb.context),
            usage=Usage.from_pb(pb.usage),
        )


@dataclass(frozen=True)
class Answers:
    """Result of `tasks.answer()`: one result per question, also for a single question."""

    model: str
    """The model that answered (name resolved)."""
    adapter: str
    """The adapter used ("" for none)."""
    results: list[AnswerResult]
    """One per question, in order."""
    usage: Usage
    """Sum of the results' usage."""

    @property
    def answers(self) -> list[str]:
        """The answer texts, in question order ("" where unanswerable)."""
        return [r.answer for r in self.results]

    @classmethod
    def from_pb(cls, pb: tasks_pb2.AnswerResponse) -> Answers:
        return cls(
            pb.model.model, pb.model.adapter, [AnswerResult.from_pb(r) for r in pb.results], Usage.from_pb(pb.usage)
        )


@dataclass(frozen=True)
class LabelProbability:
    """One label's probability for one text."""

    label: str
    """The label's name."""
    probability: float
    """Calibrated when calibrate was set. Single-label: a text's probabilities sum to 1; multi-label: each in
    [0, 1] on its own; generate method: 1 or 0."""
    logprob: float
    """Score method: the label's summed (or length-normalized) log-probability; multi-label: that of " Yes";
    0 for the generate method."""
    uncalibrated_probability: float
    """With calibrate: the probability before calibration; else equal to `probability`."""
    content_free_probability: float
    """With calibrate: the calibration prior from content-free inputs; else 0."""

    @classmethod
    def from_pb(cls, pb: tasks_pb2.LabelProbability) -> LabelProbability:
        return cls(pb.label, pb.probability, pb.logprob, pb.uncalibrated_probability, pb.content_free_probability)


@dataclass(frozen=True)
class ClassifyResult:
    """One text's classification."""

    label: str
    """The most probable label ("" when the generate method matched none)."""
    labels: list[str]
    """The labels assigned: single-label [label]; multi-label those at or over the threshold, most probable first."""
    probabilities: list[LabelProbability]
    """A probability for every label, in the request's label order."""
    generated_text: str
    """Generate method: the model's raw output; else ""."""
    context: ContextReport
    """What the context-window policy did."""
    usage: Usage
    """Tokens used for this text (including calibration calls)."""

    def probability(self, label: str) -> float:
        """The probability of `label` (KeyError if it is not one of the request's labels)."""
        for p in self.probabilities:
            if p.label == label:
                return p.probability
        raise KeyError(label)

    def as_dict(self) -> dict[str, float]:
        """{label: probability} in label order."""
        return {p.label: p.probability for p in self.probabilities}

    @classmethod
    def from_pb(cls, pb: tasks_pb2.ClassifyResult) -> ClassifyResult:
        return cls(
            label=pb.label,
            labels=list(pb.labels),
            probabilities=[LabelProbability.from_pb(p) for p in pb.probabilities],
            generated_text=pb.generated_text,
            context=ContextReport.from_pb(pb.context),
            usage=Usage.from_pb(pb.usage),
        )


@dataclass(frozen=True)
class Classifications:
    """Result of `tasks.classify()`: one result per text, also for a single text."""

    model: str
    """The model that answered (name resolved)."""
    adapter: str
    """The adapter used ("" for none)."""
    results: list[ClassifyResult]
    """One per text, in order."""
    usage: Usage
    """Sum of the results' usage."""

    @property
    def labels(self) -> list[str]:
        """The most probable label of each text, in order."""
        return [r.label for r in self.results]

    @classmethod
    def from_pb(cls, pb: tasks_pb2.ClassifyResponse) -> Classifications:
        return cls(
            pb.model.model, pb.model.adapter, [ClassifyResult.from_pb(r) for r in pb.results], Usage.from_pb(pb.usage)
        )

"""`client.tasks`: summarize (whole or streamed), answer, classify, and evaluate prompting configurations.

Every task method takes one input or a batch and returns the batch-shaped result (`Summaries`, `Answers`,
`Classifications`) either way, like openai-python's `embeddings.create`: `result.results[0]`, or the shortcuts
`result.summaries`, `result.answers`, `result.labels`. Sampling keyword arguments are those of
`inference.generate()`, with the task defaults of tasks.proto for the ones left None (temperature 0).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc

from genloom._exceptions import GenLoomError, error_from_rpc
from genloom._transport import _DEFAULT, AsyncTransport, SyncTransport
from genloom.resources.inference import Truncation, _sampling_params, _side
from genloom.types.tasks import (
    CLASSIFY_METHODS,
    EXAMPLE_SELECTIONS,
    STRATEGIES,
    SUMMARY_FORMATS,
    TASKS,
    AnswerExample,
    AnswerExampleLike,
    AnswerItem,
    AnswerItemLike,
    Answers,
    ChunkingOptions,
    Classifications,
    ClassifyExample,
    ClassifyExampleLike,
    ClassifyMethodName,
    ClassLabel,
    ClassLabelLike,
    EvalConfiguration,
    EvalConfigurationResult,
    EvalDatasetLike,
    EvalEvent,
    EvalExampleSource,
    EvalProgress,
    EvalSummary,
    StrategyName,
    Summaries,
    SummarizeEvent,
    SummarizeExample,
    SummarizeExampleLike,
    SummarizeFinish,
    SummarizeProgress,
    SummaryDelta,
    SummaryFormatName,
    SummaryResult,
    TaskName,
    enum_value,
    eval_dataset_to_pb,
    eval_event_from_pb,
    summarize_event_from_pb,
)
from genloom.v1 import common_pb2, inference_pb2, tasks_pb2, tasks_pb2_grpc

LabelsLike = Sequence[ClassLabelLike] | Mapping[str, str]
"""Label names, ClassLabels, (name, description) pairs, or one mapping {name: description}."""
QuestionsLike = str | AnswerItem | Mapping[str, Any] | Sequence[AnswerItemLike]
"""One question (a str, an AnswerItem or a mapping), or a list of questions ((question, context) pairs too)."""

SAMPLING_OPTIONS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "seed",
    "min_new_tokens",
    "ignore_eos",
    "skip_special_tokens",
)
"""The `inference.generate()` keyword arguments the task methods take (logprobs: the task service sets them)."""


def _model(options: dict[str, Any]) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(model=options.pop("model") or "", adapter=options.pop("adapter") or "")


def _sampling(options: dict[str, Any]) -> inference_pb2.SamplingParams:
    """Pop the sampling arguments; anything left over in `options` is a caller's mistake."""
    sampling = _sampling_params(options)
    if options:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(options))}")
    return sampling


def _configuration_sampling(sampling: Mapping[str, Any]) -> inference_pb2.SamplingParams:
    unknown = set(sampling) - set(SAMPLING_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected sampling options: {', '.join(sorted(unknown))}")
    return _sampling_params(dict(sampling))


def _target_length(words: int | None, sentences: int | None) -> tasks_pb2.SummaryLength | None:
    if words is not None and sentences is not None:
        raise ValueError("give target_words or target_sentences, not both")
    if words is not None:
        return tasks_pb2.SummaryLength(unit=tasks_pb2.SUMMARY_LENGTH_UNIT_WORDS, value=words)
    if sentences is not None:
        return tasks_pb2.SummaryLength(unit=tasks_pb2.SUMMARY_LENGTH_UNIT_SENTENCES, value=sentences)
    return None


def _chunking(chunking: ChunkingOptions | None) -> tasks_pb2.ChunkingOptions | None:
    return chunking.to_pb() if chunking is not None else None


def _strategy(strategy: StrategyName | None) -> tasks_pb2.PromptStrategy:
    return enum_value(STRATEGIES, strategy, "strategy")


def _labels(labels: LabelsLike) -> list[tasks_pb2.ClassLabel]:
    if isinstance(labels, str):
        raise TypeError(f"labels must be a list of labels, not a str (did you mean {labels.split(',')!r}?)")
    if isinstance(labels, Mapping):
        return [ClassLabel(name, description).to_pb() for name, description in labels.items()]
    return [ClassLabel.coerce(label).to_pb() for label in labels]


def _batch(inputs: str | Sequence[str], what: str) -> list[str]:
    if isinstance(inputs, str):
        return [inputs]
    items = list(inputs)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{what}[{i}] must be a str, not {type(item).__name__}")
    return items


def _answer_items(questions: QuestionsLike, context: str | None) -> list[AnswerItem]:
    items: list[Any] = [questions] if isinstance(questions, str | AnswerItem | Mapping) else list(questions)
    return [AnswerItem(q, context or "") if isinstance(q, str) else AnswerItem.coerce(q) for q in items]


def _summarize_fields(options: dict[str, Any]) -> dict[str, Any]:
    """The fields SummarizeRequest and SummarizeStreamRequest share (they have the same numbers)."""
    fields = dict(
        model=_model(options),
        strategy=_strategy(options.pop("strategy")),
        examples=[SummarizeExample.coerce(e).to_pb() for e in options.pop("examples")],
        max_examples=options.pop("max_examples"),
        target_length=_target_length(options.pop("target_words"), options.pop("target_sentences")),
        format=enum_value(SUMMARY_FORMATS, options.pop("format"), "format"),
        instruction=options.pop("instruction") or "",
        chunking=_chunking(options.pop("chunking")),
        truncation=_side(options.pop("truncation")),
    )
    fields["sampling"] = _sampling(options)
    return fields


def _summarize_request(documents: str | Sequence[str], options: dict[str, Any]) -> tasks_pb2.SummarizeRequest:
    return tasks_pb2.SummarizeRequest(documents=_batch(documents, "documents"), **_summarize_fields(options))


def _summarize_stream_request(document: str, options: dict[str, Any]) -> tasks_pb2.SummarizeStreamRequest:
    if not isinstance(document, str):
        raise TypeError(f"summarize_stream() takes one document (a str), not {type(document).__name__}")
    return tasks_pb2.SummarizeStreamRequest(document=document, **_summarize_fields(options))


def _answer_request(questions: Any, options: dict[str, Any]) -> tasks_pb2.AnswerRequest:
    items = _answer_items(questions, options.pop("context"))
    request = tasks_pb2.AnswerRequest(
        model=_model(options),
        items=[item.to_pb() for item in items],
        strategy=_strategy(options.pop("strategy")),
        examples=[AnswerExample.coerce(e).to_pb() for e in options.pop("examples")],
        max_examples=options.pop("max_examples"),
        instruction=options.pop("instruction") or "",
        allow_unanswerable=options.pop("allow_unanswerable"),
        chunking=_chunking(options.pop("chunking")),
        truncation=_side(options.pop("truncation")),
    )
    request.sampling.CopyFrom(_sampling(options))
    return request


def _classify_request(texts: str | Sequence[str], options: dict[str, Any]) -> tasks_pb2.ClassifyRequest:
    request = tasks_pb2.ClassifyRequest(
        model=_model(options),
        texts=_batch(texts, "texts"),
        labels=_labels(options.pop("labels")),
        multi_label=options.pop("multi_label"),
        method=enum_value(CLASSIFY_METHODS, options.pop("method"), "method"),
        calibrate=options.pop("calibrate"),
        strategy=_strategy(options.pop("strategy")),
        examples=[ClassifyExample.coerce(e).to_pb() for e in options.pop("examples")],
        max_examples=options.pop("max_examples"),
        instruction=options.pop("instruction") or "",
        truncation=_side(options.pop("truncation")),
        normalize_by_length=options.pop("normalize_by_length"),
    )
    threshold = options.pop("threshold")
    if threshold is not None:
        request.threshold = threshold
    request.sampling.CopyFrom(_sampling(options))
    return request


def _example_source_to_pb(task: TaskName, source: EvalExampleSource) -> tasks_pb2.EvalExampleSource:
    pb = tasks_pb2.EvalExampleSource(
        selection=enum_value(EXAMPLE_SELECTIONS, source.selection, "selection"), seed=source.seed
    )
    if source.split is not None:
        pb.split.CopyFrom(eval_dataset_to_pb(task, source.split))
    return pb


def _configuration_to_pb(task: TaskName, configuration: EvalConfiguration) -> tasks_pb2.EvalConfiguration:
    c = configuration
    pb = tasks_pb2.EvalConfiguration(
        name=c.name,
        strategy=_strategy(c.strategy),
        model=common_pb2.ModelRef(model=c.model, adapter=c.adapter),
        method=enum_value(CLASSIFY_METHODS, c.method, "method"),
        calibrate=c.calibrate,
    )
    if c.shots is not None:
        pb.shots = c.shots
    if c.example_source is not None:
        pb.example_source.CopyFrom(_example_source_to_pb(task, c.example_source))
    if c.sampling is not None:
        pb.sampling.CopyFrom(_configuration_sampling(c.sampling))
    return pb


def _evaluate_request(task: TaskName, dataset: EvalDatasetLike, options: dict[str, Any]) -> tasks_pb2.EvaluateRequest:
    task_type = enum_value(TASKS, task, "task")
    configurations = options.pop("configurations")
    if configurations is None:
        configurations = [EvalConfiguration()]
    prompt_options = tasks_pb2.TaskPromptOptions(
        labels=_labels(options.pop("labels")),
        multi_label=options.pop("multi_label"),
        target_length=_target_length(options.pop("target_words"), options.pop("target_sentences")),
        format=enum_value(SUMMARY_FORMATS, options.pop("format"), "format"),
        allow_unanswerable=options.pop("allow_unanswerable"),
        instruction=options.pop("instruction") or "",
    )
    request = tasks_pb2.EvaluateRequest(
        task=task_type,
        dataset=eval_dataset_to_pb(task, dataset),
        holdout_examples=options.pop("holdout_examples"),
        configurations=[_configuration_to_pb(task, EvalConfiguration.coerce(c)) for c in configurations],
        options=prompt_options,
        chunking=_chunking(options.pop("chunking")),
        truncation=_side(options.pop("truncation")),
        limit=options.pop("limit"),
        concurrency=options.pop("concurrency"),
        return_predictions=options.pop("return_predictions"),
    )
    examples = options.pop("examples")
    if examples is not None:
        request.examples.CopyFrom(eval_dataset_to_pb(task, examples))
    request.sampling.CopyFrom(_sampling(options))
    return request


def _options(arguments: dict[str, Any], *positional: str) -> dict[str, Any]:
    """A method's keyword arguments from its locals(): without self, timeout and the positional ones."""
    return {k: v for k, v in arguments.items() if k not in ("self", "timeout", *positional)}


class _SummarizeStreamState:
    """What the sync and async summary streams share: the call, progress, the text so far and the finish."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.progress: SummarizeProgress | None = None
        """The latest map/reduce progress (only for documents that had to be chunked)."""
        self.finish: SummarizeFinish | None = None
        """The end of the summary, once the stream is exhausted."""
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """Summary text received so far."""
        return "".join(self._parts)

    @property
    def final(self) -> SummaryResult | None:
        """The whole summary as `summarize()` would return it, once the stream is exhausted; else None."""
        if self.finish is None:
            return None
        return SummaryResult(self.text, self.finish.finish_reason, self.finish.context, self.finish.usage)

    def _accept(self, message: tasks_pb2.SummarizeStreamResponse) -> SummarizeEvent | None:
        event = summarize_event_from_pb(message)
        if isinstance(event, SummaryDelta):
            self._parts.append(event.text)
        elif isinstance(event, SummarizeProgress):
            self.progress = event
        elif isinstance(event, SummarizeFinish):
            self.finish = event
        return event

    def close(self) -> None:
        """Cancel the call if it is still running (this stops the summary's generations on the server)."""
        self._call.cancel()


class SummarizeStream(_SummarizeStreamState):
    """Iterate over `SummarizeProgress` (chunked documents only), `SummaryDelta` and, last, `SummarizeFinish`;
    `text` holds the summary so far and `final` the whole result once done. `close()` (or leaving a `with`
    block, or abandoning the iteration) cancels the call."""

    def __iter__(self) -> Iterator[SummarizeEvent]:
        try:
            for message in self._call:
                event = self._accept(message)
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            self.close()

    def __enter__(self) -> SummarizeStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncSummarizeStream(_SummarizeStreamState):
    """`SummarizeStream` for asyncio: `async for event in stream`."""

    async def __aiter__(self) -> AsyncIterator[SummarizeEvent]:
        try:
            async for message in self._call:
                event = self._accept(message)
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            self.close()

    async def __aenter__(self) -> AsyncSummarizeStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _EvaluationState:
    """What the sync and async evaluation streams share: the call, the latest progress, results and summary."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.progress: EvalProgress | None = None
        """The latest progress."""
        self.results: list[EvalConfigurationResult] = []
        """The configurations finished so far, in order."""
        self.summary: EvalSummary | None = None
        """The summary, once the stream is exhausted."""

    def _accept(self, message: tasks_pb2.EvaluateResponse) -> EvalEvent | None:
        event = eval_event_from_pb(message)
        if isinstance(event, EvalProgress):
            self.progress = event
        elif isinstance(event, EvalConfigurationResult):
            self.results.append(event)
        elif isinstance(event, EvalSummary):
            self.summary = event
        return event

    def _require_summary(self) -> EvalSummary:
        if self.summary is None:
            raise GenLoomError("the Evaluate stream ended without a summary")
        return self.summary

    def close(self) -> None:
        """Cancel the evaluation if it is still running."""
        self._call.cancel()


class Evaluation(_EvaluationState):
    """An evaluation in progress. Iterate over `EvalProgress`, `EvalPrediction` (with return_predictions),
    `EvalConfigurationResult` per configuration and, last, `EvalSummary`; or call `wait()` for the summary.
    `close()` (or leaving a `with` block, or abandoning the iteration) cancels the evaluation."""

    def __iter__(self) -> Iterator[EvalEvent]:
        try:
            for message in self._call:
                event = self._accept(message)
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            self.close()

    def wait(self) -> EvalSummary:
        """Run the evaluation to its end (or consume the rest of it) and return the summary."""
        if self.summary is None:
            for _ in self:
                pass
        return self._require_summary()

    def __enter__(self) -> Evaluation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncEvaluation(_EvaluationState):
    """`Evaluation` for asyncio: `async for event in evaluation`, or `await evaluation.wait()`."""

    async def __aiter__(self) -> AsyncIterator[EvalEvent]:
        try:
            async for message in self._call:
                event = self._accept(message)
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            self.close()

    async def wait(self) -> EvalSummary:
        """See `Evaluation.wait`."""
        if self.summary is None:
            async for _ in self:
                pass
        return self._require_summary()

    async def __aenter__(self) -> AsyncEvaluation:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Tasks:
    """The task service, synchronously."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport
        self._stub = tasks_pb2_grpc.TaskServiceStub(transport.channel)

    def _stream(self, method: Any, request: Any, timeout: float | object | None) -> Any:
        return self._t.stream(method, request, timeout=timeout)

    def summarize(
        self,
        documents: str | Sequence[str],
        *,
        model: str = "",
        adapter: str = "",
        strategy: StrategyName | None = None,
        examples: Sequence[SummarizeExampleLike] = (),
        max_examples: int = 0,
        target_words: int | None = None,
        target_sentences: int | None = None,
        format: SummaryFormatName = "prose",
        instruction: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        chunking: ChunkingOptions | None = None,
        truncation: Truncation = None,
        timeout: float | None = _DEFAULT,
    ) -> Summaries:
        """Summarize one document or a batch (processed concurrently on the server).

        Args:
            documents: a document, or a list of them. Either way the result has one entry per document.
            model: model name ("" = the server's default). adapter: a loaded LoRA adapter's name.
            strategy: "zero-shot", "one-shot" or "few-shot"; None infers it from `examples` (none, one, more).
            examples: worked examples shared by all documents: SummarizeExample, (document, summary) pairs or
                {"document", "summary"} mappings; used in order, as many as fit next to the document.
            max_examples: most examples with "few-shot" (0: as many as fit).
            target_words, target_sentences: about how long the summary should be (one of them; a target, not a
                limit). format: "prose" or "bullets" ("- " lines).
            instruction: replaces the built-in instruction ("Summarize the document.").
            max_new_tokens, temperature, ...: as in `inference.generate()`; unset ones take the task defaults
                (temperature 0, max_new_tokens from the target length, else 256).
            chunking: how a document that does not fit is split (default: map/reduce over token-bounded chunks).
            truncation: with chunking disabled, "left"/"right" cuts an over-long document instead of failing.
            timeout: seconds (default: the client's).
        """
        request = _summarize_request(documents, _options(locals(), "documents"))
        return Summaries.from_pb(self._t.unary(self._stub.Summarize, request, timeout=timeout))

    def summarize_stream(
        self,
        document: str,
        *,
        model: str = "",
        adapter: str = "",
        strategy: StrategyName | None = None,
        examples: Sequence[SummarizeExampleLike] = (),
        max_examples: int = 0,
        target_words: int | None = None,
        target_sentences: int | None = None,
        format: SummaryFormatName = "prose",
        instruction: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        chunking: ChunkingOptions | None = None,
        truncation: Truncation = None,
        timeout: float | None = _DEFAULT,
    ) -> SummarizeStream:
        """Like `summarize()` (same keyword arguments) for one document, streamed: `SummarizeProgress` events
        while chunks are mapped and reduced, then `SummaryDelta`s of the final summary, then `SummarizeFinish`.
        Use it as a context manager; closing it cancels the call. Not retried."""
        request = _summarize_stream_request(document, _options(locals(), "document"))
        return SummarizeStream(self._stream(self._stub.SummarizeStream, request, timeout))

    def answer(
        self,
        questions: QuestionsLike,
        *,
        context: str | None = None,
        model: str = "",
        adapter: str = "",
        strategy: StrategyName | None = None,
        examples: Sequence[AnswerExampleLike] = (),
        max_examples: int = 0,
        instruction: str | None = None,
        allow_unanswerable: bool = False,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        chunking: ChunkingOptions | None = None,
        truncation: Truncation = None,
        timeout: float | None = _DEFAULT,
    ) -> Answers:
        """Answer one question or a batch, closed-book or from a context passage.

        Args:
            questions: a question (str), an AnswerItem(question, context), a {"question", "context"?} mapping,
                or a list of any of these ((question, context) pairs too). The result has one entry per question.
            context: the passage for every question given as a plain str (AnswerItems keep their own context).
                A context that does not fit is chunked and the best-scored chunk's answer kept.
            strategy, examples, max_examples: as in `summarize()`; examples are AnswerExample, (question,
                answer) pairs, (question, context, answer) triples or mappings with the dataset keys.
            allow_unanswerable: let the model say the context does not answer the question (then `unanswerable`
                is set and the answer is "") instead of making one up.
            instruction, sampling arguments, chunking, truncation, timeout: as in `summarize()` (task default
                max_new_tokens 64).
        """
        request = _answer_request(questions, _options(locals(), "questions"))
        return Answers.from_pb(self._t.unary(self._stub.Answer, request, timeout=timeout))

    def classify(
        self,
        texts: str | Sequence[str],
        *,
        labels: LabelsLike,
        multi_label: bool = False,
        method: ClassifyMethodName = "score",
        calibrate: bool = False,
        threshold: float | None = None,
        normalize_by_length: bool = False,
        model: str = "",
        adapter: str = "",
        strategy: StrategyName | None = None,
        examples: Sequence[ClassifyExampleLike] = (),
        max_examples: int = 0,
        instruction: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        truncation: Truncation = None,
        timeout: float | None = _DEFAULT,
    ) -> Classifications:
        """Assign labels to one text or a batch, with a probability for every label.

        Args:
            texts: a text or a list of them. The result has one entry per text.
            labels: at least 2 (1 with multi_label): names, ClassLabel(name, description), (name, description)
                pairs, or one {name: description} mapping. Shown to the model in this order.
            multi_label: any number of labels per text, each decided on its own (`threshold`, default 0.5).
            method: "score" (rank the labels by log-likelihood, one prefill) or "generate" (map generated text
                onto a label; probabilities are 1 or 0).
            calibrate: contextual calibration against content-free inputs (score method only).
            normalize_by_length: score, single-label: rank by mean instead of summed token log-probability.
            strategy, examples, max_examples: as in `summarize()`; examples are ClassifyExample, (text, label)
                or (text, [labels]) pairs, or {"text", "label"}/{"text", "labels"} mappings.
            sampling arguments: generate method only.
            truncation: "left"/"right" cuts a text whose prompt does not fit instead of failing.
            instruction, model, adapter, timeout: as in `summarize()`.
        """
        request = _classify_request(texts, _options(locals(), "texts"))
        return Classifications.from_pb(self._t.unary(self._stub.Classify, request, timeout=timeout))

    def evaluate(
        self,
        task: TaskName,
        dataset: EvalDatasetLike,
        *,
        configurations: Sequence[EvalConfiguration | Mapping[str, Any]] | None = None,
        examples: EvalDatasetLike | None = None,
        holdout_examples: int = 0,
        labels: LabelsLike = (),
        multi_label: bool = False,
        target_words: int | None = None,
        target_sentences: int | None = None,
        format: SummaryFormatName | None = None,
        allow_unanswerable: bool = False,
        instruction: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        chunking: ChunkingOptions | None = None,
        truncation: Truncation = None,
        limit: int = 0,
        concurrency: int = 0,
        return_predictions: bool = False,
        timeout: float | None = None,
    ) -> Evaluation:
        """Run a labeled dataset through one or more configurations and compare them. Returns an `Evaluation`:
        iterate it for progress and results, or call `.wait()` for the `EvalSummary`.

        Args:
            task: "classify", "summarize" or "answer".
            dataset: the items to score: a str is the path of a JSONL file on the server (inside its
                GENLOOM_TASKS_DATA_ROOT); else a list of records: ClassifyExample / SummarizeExample /
                AnswerExample, tuples as the task's examples take them, or mappings with the JSONL keys. For a
                local file use `genloom.types.read_eval_records(path, task)`.
            configurations: the configurations to compare, in order: EvalConfiguration or mappings of its
                fields (None: one configuration with every default).
            examples: the example split (same forms as `dataset`); None with `holdout_examples` N: the
                dataset's first N records, not scored.
            labels, multi_label, target_words, target_sentences, format, allow_unanswerable, instruction: the
                task's prompt options, shared by all configurations (classify labels default to the dataset's).
            sampling arguments: the default for configurations that set no `sampling`.
            chunking, truncation: as in the task methods; items that fit neither way fail (items_failed).
            limit: score at most the first N items (0: all). concurrency: items in flight (0: server default).
            return_predictions: also yield one `EvalPrediction` per item and configuration.
            timeout: seconds for the whole evaluation (default: none; it takes as long as the dataset needs).
        """
        request = _evaluate_request(task, dataset, _options(locals(), "task", "dataset"))
        return Evaluation(self._stream(self._stub.Evaluate, request, timeout))


class AsyncTasks:
    """The task service, for asyncio. Same methods as `Tasks`, awaitable; `summarize_stream()` and `evaluate()`
    return async iterators."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = tasks_pb2_grpc.TaskServiceStub(transport.channel)

    def _stream(self, method: Any, request: Any, timeout: float | object | None) -> Any:
        return self._t.stream(method, request, timeout=timeout)

    async def summarize(
        self,
        documents: str | Sequence[str],
        *,
        model: str = "",
        adapter: str = "",
        strategy: StrategyName | None = None,
        examples: Sequence[SummarizeExampleLike] = (),
        max_examples: int = 0,
        target_words: int | None = None,
        target_sentences: int | None = None,
        format: SummaryFormatName = "prose",
        instruction: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        chunking: ChunkingOptions | None = None,
        truncation: Truncation = None,
        timeout: float | None = _DEFAULT,
    ) -> Summaries:
        """See `Tasks.summarize`."""
        request = _summarize_request(documents, _options(locals(), "documents"))
        return Summaries.from_pb(await self._t.unary(self._stub.Summarize, request, timeout=timeout))

    def summarize_stream(
        self,
        document: str,
        *,
        model: str = "",
        adapter: str = "",
        strategy: StrategyName | None = None,
        examples: Sequence[SummarizeExampleLike] = (),
        max_examples: int = 0,
        target_words: int | None = None,
        target_sentences: int | None = None,
        format: SummaryFormatName = "prose",
        instruction: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        chunking: ChunkingOptions | None = None,
        truncation: Truncation = None,
        timeout: float | None = _DEFAULT,
    ) -> AsyncSummarizeStream:
        """See `Tasks.summarize_stream`."""
        request = _summarize_stream_request(document, _options(locals(), "document"))
        return AsyncSummarizeStream(self._stream(self._stub.SummarizeStream, request, timeout))

    async def answer(
        self,
        questions: QuestionsLike,
        *,
        context: str | None = None,
        model: str = "",
        adapter: str = "",
        strategy: StrategyName | None = None,
        examples: Sequence[AnswerExampleLike] = (),
        max_examples: int = 0,
        instruction: str | None = None,
        allow_unanswerable: bool = False,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        chunking: ChunkingOptions | None = None,
        truncation: Truncation = None,
        timeout: float | None = _DEFAULT,
    ) -> Answers:
        """See `Tasks.answer`."""
        request = _answer_request(questions, _options(locals(), "questions"))
        return Answers.from_pb(await self._t.unary(self._stub.Answer, request, timeout=timeout))

    async def classify(
        self,
        texts: str | Sequence[str],
        *,
        labels: LabelsLike,
        multi_label: bool = False,
        method: ClassifyMethodName = "score",
        calibrate: bool = False,
        threshold: float | None = None,
        normalize_by_length: bool = False,
        model: str = "",
        adapter: str = "",
        strategy: StrategyName | None = None,
        examples: Sequence[ClassifyExampleLike] = (),
        max_examples: int = 0,
        instruction: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        truncation: Truncation = None,
        timeout: float | None = _DEFAULT,
    ) -> Classifications:
        """See `Tasks.classify`."""
        request = _classify_request(texts, _options(locals(), "texts"))
        return Classifications.from_pb(await self._t.unary(self._stub.Classify, request, timeout=timeout))

    def evaluate(
        self,
        task: TaskName,
        dataset: EvalDatasetLike,
        *,
        configurations: Sequence[EvalConfiguration | Mapping[str, Any]] | None = None,
        examples: EvalDatasetLike | None = None,
        holdout_examples: int = 0,
        labels: LabelsLike = (),
        multi_label: bool = False,
        target_words: int | None = None,
        target_sentences: int | None = None,
        format: SummaryFormatName | None = None,
        allow_unanswerable: bool = False,
        instruction: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        chunking: ChunkingOptions | None = None,
        truncation: Truncation = None,
        limit: int = 0,
        concurrency: int = 0,
        return_predictions: bool = False,
        timeout: float | None = None,
    ) -> AsyncEvaluation:
        """See `Tasks.evaluate`."""
        request = _evaluate_request(task, dataset, _options(locals(), "task", "dataset"))
        return AsyncEvaluation(self._stream(self._stub.Evaluate, request, timeout))

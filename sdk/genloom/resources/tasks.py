"""`client.tasks`: summarize (whole or streamed), answer, classify, and evaluate prompting configurations.

Every task method takes one input or a batch and returns the batch-shaped result (`Summaries`, `Answers`,
`Classifications`) either way, like openai-python's `embeddings.create`: `result.results[0]`, or the shortcuts
`result.summaries`, `result.answers`, `result.labels`. Sampling keyword arguments are those of
`inference.generate()`, with the task defaults of tasks.proto for the ones left None (temperature 0).

This module holds the resources and is the public import path; the request building lives in `_task_requests`,
the summary and evaluation streams in `_task_streams`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from genloom._transport import _DEFAULT, AsyncTransport, SyncTransport
from genloom.resources._task_requests import (
    SAMPLING_OPTIONS,
    LabelsLike,
    QuestionsLike,
    _answer_request,
    _classify_request,
    _evaluate_request,
    _options,
    _summarize_request,
    _summarize_stream_request,
)
from genloom.resources._task_streams import AsyncEvaluation, AsyncSummarizeStream, Evaluation, SummarizeStream
from genloom.resources.inference import Truncation
from genloom.types._evaluation import EvalConfiguration
from genloom.types._task_inputs import (
    AnswerExampleLike,
    ChunkingOptions,
    ClassifyExampleLike,
    ClassifyMethodName,
    EvalDatasetLike,
    StrategyName,
    SummarizeExampleLike,
    SummaryFormatName,
    TaskName,
)
from genloom.types._task_results import Answers, Classifications, Summaries
from genloom.v1 import tasks_pb2_grpc

__all__ = [
    "SAMPLING_OPTIONS",
    "AsyncEvaluation",
    "AsyncSummarizeStream",
    "AsyncTasks",
    "Evaluation",
    "LabelsLike",
    "QuestionsLike",
    "SummarizeStream",
    "Tasks",
]


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

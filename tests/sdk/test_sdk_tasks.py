"""The SDK and CLI surface of TaskService, against a stand-in TaskService on a real gRPC server.

The stand-in records each request and answers with responses built by hand, so these tests pin down what the
client sends for each argument form and how it converts what comes back, without a model. Behaviour of the real
task service is tested with the service itself.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

import genloom
from genloom.cli import app
from genloom.resources.tasks import AsyncTasks, Tasks
from genloom.services.server import errors
from genloom.types import (
    AnswerExample,
    ClassifyExample,
    EvalConfigurationResult,
    EvalPrediction,
    EvalProgress,
    EvalSummary,
    SummarizeExample,
    SummarizeFinish,
    SummarizeProgress,
    SummaryDelta,
    parse_eval_records,
)
from genloom.v1 import common_pb2, inference_pb2, tasks_pb2, tasks_pb2_grpc

from ..conftest import ServerThread, start_server

MODEL = common_pb2.ModelRef(model="smollm2-135m-instruct", adapter="")


def _usage(prompt: int, completion: int) -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _context(**fields: Any) -> tasks_pb2.ContextReport:
    return tasks_pb2.ContextReport(**{"context_window": 8192, "prompt_tokens": 120, "chunks": 1, **fields})


class StandInTasks(tasks_pb2_grpc.TaskServiceServicer):
    """Records every request (and its metadata); answers with fixed, hand-built responses."""

    name = "genloom.v1.TaskService"

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.request_ids: list[str] = []
        self.fail_next: list[errors.ServiceError] = []

    def add_to_server(self, server: grpc.aio.Server) -> None:
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(self, server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _record(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.requests.append(request)
        self.request_ids.append(dict(context.invocation_metadata())["x-request-id"])
        if self.fail_next:
            raise self.fail_next.pop(0)

    async def Summarize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(request, context)
        results = [
            tasks_pb2.SummaryResult(
                summary=f"summary {i}",
                finish_reason=inference_pb2.FINISH_REASON_EOS,
                context=_context(examples_given=len(request.examples), examples_used=min(1, len(request.examples))),
                usage=_usage(100, 10),
            )
            for i in range(len(request.documents))
        ]
        return tasks_pb2.SummarizeResponse(model=MODEL, results=results, usage=_usage(100 * len(results), 10))

    async def SummarizeStream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self._record(request, context)
        for done in (0, 2):
            yield tasks_pb2.SummarizeStreamResponse(
                progress=tasks_pb2.SummarizeProgress(stage=tasks_pb2.SUMMARIZE_STAGE_MAP, done=done, total=2)
            )
        for piece in ("The gist", " in brief."):
            yield tasks_pb2.SummarizeStreamResponse(delta=tasks_pb2.SummaryDelta(text=piece))
        yield tasks_pb2.SummarizeStreamResponse(
            finish=tasks_pb2.SummarizeStreamFinish(
                model=MODEL,
                finish_reason=inference_pb2.FINISH_REASON_STOP_SEQUENCE,
                context=_context(chunks=2, chunk_tokens=512, reduce_rounds=0),
                usage=_usage(900, 40),
            )
        )

    async def Answer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(request, context)
        results = []
        for item in request.items:
            if not item.context:
                results.append(tasks_pb2.AnswerResult(answer="Paris", score=-0.1, context=_context(chunks=0)))
            elif "moon" in item.question:
                results.append(tasks_pb2.AnswerResult(unanswerable=True, score=-2.0, context=_context()))
            else:
                support = tasks_pb2.SupportingChunk(chunk_index=0, text=item.context, start=0, end=len(item.context))
                results.append(
                    tasks_pb2.AnswerResult(
                        answer=item.context.split()[0],
                        support=support,
                        score=-0.25,
                        finish_reason=inference_pb2.FINISH_REASON_EOS,
                        context=_context(),
                        usage=_usage(50, 3),
                    )
                )
        return tasks_pb2.AnswerResponse(model=MODEL, results=results, usage=_usage(50 * len(results), 3))

    async def Classify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._record(request, context)
        names = [label.name for label in request.labels]
        # The first label wins with 0.7; the rest share 0.3.
        probabilities = [0.7] + [0.3 / (len(names) - 1)] * (len(names) - 1) if len(names) > 1 else [0.9]
        results = [
            tasks_pb2.ClassifyResult(
                label=names[0],
                labels=[names[0]],
                probabilities=[
                    tasks_pb2.LabelProbability(
                        label=n, probability=p, logprob=-1.0, uncalibrated_probability=p, content_free_probability=0
                    )
                    for n, p in zip(names, probabilities, strict=True)
                ],
                context=_context(max_new_tokens=0),
                usage=_usage(30, 0),
            )
            for _ in request.texts
        ]
        return tasks_pb2.ClassifyResponse(model=MODEL, results=results, usage=_usage(30 * len(results), 0))

    async def Evaluate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self._record(request, context)
        inline = request.dataset.HasField("inline")
        items = len(request.dataset.inline.records) - request.holdout_examples if inline else 3
        results = []
        for index, configuration in enumerate(request.configurations):
            name = configuration.name or f"config-{index} shots={configuration.shots}"
            yield tasks_pb2.EvaluateResponse(
                progress=tasks_pb2.EvalProgress(configuration_index=index, configuration_name=name, items_total=items)
            )
            if request.return_predictions:
                yield tasks_pb2.EvaluateResponse(
                    prediction=tasks_pb2.EvalPrediction(
                        configuration_index=index, prediction="pos", reference="pos", score=1.0, latency_s=0.1
                    )
                )
            yield tasks_pb2.EvaluateResponse(
                progress=tasks_pb2.EvalProgress(
                    configuration_index=index, configuration_name=name, items_done=items, items_total=items
                )
            )
            resolved = tasks_pb2.EvalConfiguration()
            resolved.CopyFrom(configuration)
            resolved.name = name
            if not resolved.HasField("shots"):
                resolved.shots = 0
            metrics = tasks_pb2.EvalMetrics(
                items=items,
                accuracy=0.5 + 0.1 * index,
                macro_f1=0.4,
                mean_latency_s=0.25,
                usage=_usage(1000, 0),
                mean_examples_used=float(resolved.shots),
                per_label=[tasks_pb2.LabelMetrics(label="pos", precision=1, recall=0.5, f1=2 / 3, support=2)],
            )
            result = tasks_pb2.EvalConfigurationResult(
                configuration_index=index, name=name, configuration=resolved, model=MODEL, metrics=metrics
            )
            results.append(result)
            yield tasks_pb2.EvaluateResponse(result=result)
        yield tasks_pb2.EvaluateResponse(
            summary=tasks_pb2.EvalSummary(
                results=results,
                primary_metric="accuracy",
                best_configuration_index=len(results) - 1,
                total_s=1.5,
            )
        )


@pytest.fixture(scope="module")
def stand_in() -> Iterator[tuple[ServerThread, StandInTasks]]:
    service = StandInTasks()
    server = start_server([service])
    server.wait_ready()
    yield server, service
    server.stop()


@pytest.fixture
def client(stand_in: tuple[ServerThread, StandInTasks]) -> Iterator[genloom.Client]:
    with genloom.Client(target=stand_in[0].target, max_retries=1, timeout=10) as client:
        yield client


@pytest.fixture
def service(stand_in: tuple[ServerThread, StandInTasks]) -> StandInTasks:
    stand_in[1].requests.clear()
    stand_in[1].request_ids.clear()
    stand_in[1].fail_next.clear()
    return stand_in[1]


# --- summarize ---------------------------------------------------------------------------------------------------


def test_summarize_builds_the_request_from_every_argument_form(client: genloom.Client, service: StandInTasks) -> None:
    result = client.tasks.summarize(
        "A long document.",
        model="smollm2-135m-instruct",
        strategy="few-shot",
        examples=[
            ("first doc", "first summary"),
            {"document": "second doc", "summary": "second summary", "extra": "ignored"},
            SummarizeExample("third doc", "third summary"),
        ],
        max_examples=2,
        target_sentences=3,
        format="bullets",
        instruction="Summarize for a child.",
        temperature=0.3,
        seed=7,
        stop=["\n\n"],
        chunking=genloom.ChunkingOptions(chunk_tokens=256, overlap_tokens=0),
        truncation="right",
    )
    request = service.requests[-1]
    assert list(request.documents) == ["A long document."]
    assert request.model.model == "smollm2-135m-instruct"
    assert request.strategy == tasks_pb2.PROMPT_STRATEGY_FEW_SHOT
    assert [(e.document, e.summary) for e in request.examples] == [
        ("first doc", "first summary"),
        ("second doc", "second summary"),
        ("third doc", "third summary"),
    ]
    assert request.max_examples == 2
    assert request.target_length.unit == tasks_pb2.SUMMARY_LENGTH_UNIT_SENTENCES
    assert request.target_length.value == 3
    assert request.format == tasks_pb2.SUMMARY_FORMAT_BULLETS
    assert request.instruction == "Summarize for a child."
    assert request.sampling.temperature == pytest.approx(0.3)
    assert request.sampling.seed == 7 and list(request.sampling.stop) == ["\n\n"]
    assert not request.sampling.HasField("skip_special_tokens")
    assert request.chunking.chunk_tokens == 256
    assert request.chunking.HasField("overlap_tokens") and request.chunking.overlap_tokens == 0
    assert request.truncation == common_pb2.TRUNCATION_SIDE_RIGHT
    # A single document still gets the batch-shaped result.
    assert result.summaries == ["summary 0"]
    assert result.model == "smollm2-135m-instruct" and result.adapter == ""
    only = result.results[0]
    assert only.finish_reason == "eos"
    assert only.context.examples_given == 3 and only.context.context_window == 8192
    assert only.usage.total_tokens == 110


def test_summarize_defaults_leave_task_defaults_to_the_server(client: genloom.Client, service: StandInTasks) -> None:
    result = client.tasks.summarize(["one", "two"], target_words=40)
    request = service.requests[-1]
    assert list(request.documents) == ["one", "two"]
    assert request.strategy == tasks_pb2.PROMPT_STRATEGY_UNSPECIFIED
    assert request.target_length.unit == tasks_pb2.SUMMARY_LENGTH_UNIT_WORDS and request.target_length.value == 40
    assert request.format == tasks_pb2.SUMMARY_FORMAT_PROSE
    assert not request.HasField("chunking")
    assert not request.sampling.HasField("temperature")  # the task default (0), not inference's 1.0
    assert request.truncation == common_pb2.TRUNCATION_SIDE_UNSPECIFIED
    assert result.summaries == ["summary 0", "summary 1"]


def test_obviously_wrong_arguments_fail_before_a_call(client: genloom.Client, service: StandInTasks) -> None:
    with pytest.raises(ValueError, match="target_words or target_sentences"):
        client.tasks.summarize("doc", target_words=10, target_sentences=2)
    with pytest.raises(ValueError, match="strategy must be one of 'zero-shot', 'one-shot', 'few-shot'"):
        client.tasks.summarize("doc", strategy="two-shot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="format must be one of"):
        client.tasks.summarize("doc", format="haiku")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"a \(document, summary\) pair"):
        client.tasks.summarize("doc", examples=["just a string"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="did you mean"):
        client.tasks.classify("text", labels="pos,neg")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        client.tasks.classify(["ok", 3], labels=["a", "b"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="str\\(path\\)"):
        client.tasks.evaluate("classify", Path("data.jsonl"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected sampling options: temprature"):
        client.tasks.evaluate("classify", [("t", "a")], configurations=[{"sampling": {"temprature": 0.5}}])
    assert service.requests == []


def test_summarize_stream_yields_typed_events_and_accumulates(client: genloom.Client, service: StandInTasks) -> None:
    with client.tasks.summarize_stream("A long document.", target_words=20) as stream:
        assert stream.final is None
        events = list(stream)
    assert [type(e) for e in events] == [
        SummarizeProgress,
        SummarizeProgress,
        SummaryDelta,
        SummaryDelta,
        SummarizeFinish,
    ]
    assert events[0] == SummarizeProgress(stage="map", done=0, total=2, reduce_round=0)
    assert stream.progress == SummarizeProgress(stage="map", done=2, total=2, reduce_round=0)
    assert stream.text == "The gist in brief."
    assert stream.finish is not None and stream.finish.finish_reason == "stop_sequence"
    final = stream.final
    assert final is not None
    assert final.summary == "The gist in brief." and final.context.chunks == 2 and final.usage.completion_tokens == 40
    request = service.requests[-1]
    assert isinstance(request, tasks_pb2.SummarizeStreamRequest)
    assert request.document == "A long document." and request.target_length.value == 20
    with pytest.raises(TypeError, match="one document"):
        client.tasks.summarize_stream(["a", "b"])  # type: ignore[arg-type]


def test_stream_errors_are_typed(client: genloom.Client, service: StandInTasks) -> None:
    service.fail_next.append(errors.InvalidArgument.field("document", "must not be empty"))
    with pytest.raises(genloom.InvalidArgumentError) as err:
        with client.tasks.summarize_stream(" ") as stream:
            list(stream)
    assert err.value.field_violations == [genloom.FieldViolation("document", "must not be empty")]
    service.fail_next.append(errors.NotFound("no model 'missing'"))
    with pytest.raises(genloom.NotFoundError):
        client.tasks.evaluate("classify", [("t", "a")], configurations=[{"model": "missing"}]).wait()


async def test_async_twins(stand_in: tuple[ServerThread, StandInTasks], service: StandInTasks) -> None:
    async with genloom.AsyncClient(target=stand_in[0].target, timeout=10) as client:
        summaries = await client.tasks.summarize("doc", target_words=10)
        assert summaries.summaries == ["summary 0"]
        async with client.tasks.summarize_stream("doc") as stream:
            kinds = [type(event).__name__ async for event in stream]
        assert kinds[-1] == "SummarizeFinish" and stream.text == "The gist in brief."
        answers = await client.tasks.answer("Capital of France?")
        assert answers.answers == ["Paris"]
        labels = await client.tasks.classify(["a", "b"], labels=["x", "y"])
        assert labels.labels == ["x", "x"]
        evaluation = client.tasks.evaluate("classify", [("t", "x"), ("u", "y")], configurations=[{"shots": 0}])
        summary = await evaluation.wait()
        assert summary.best.name == "config-0 shots=0" and evaluation.results[0].metrics.items == 2
    assert [type(r).__name__ for r in service.requests] == [
        "SummarizeRequest",
        "SummarizeStreamRequest",
        "AnswerRequest",
        "ClassifyRequest",
        "EvaluateRequest",
    ]


def test_sync_and_async_methods_take_the_same_arguments() -> None:
    for name, inputs in [("summarize", 1), ("summarize_stream", 1), ("answer", 1), ("classify", 1), ("evaluate", 2)]:
        sync = list(inspect.signature(getattr(Tasks, name)).parameters.values())
        twin = list(inspect.signature(getattr(AsyncTasks, name)).parameters.values())
        assert sync == twin, name
        options = sync[1 + inputs :]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in options), f"{name}: options are keyword-only"


def test_unary_task_calls_are_retried_under_one_request_id(client: genloom.Client, service: StandInTasks) -> None:
    service.fail_next.append(errors.Unavailable("tokenizer unreachable"))
    assert client.tasks.classify("text", labels=["a", "b"]).labels == ["a"]
    assert len(service.requests) == 2 and len(set(service.request_ids)) == 1


# --- answer ------------------------------------------------------------------------------------------------------


def test_answer_items_context_and_examples(client: genloom.Client, service: StandInTasks) -> None:
    result = client.tasks.answer(
        [
            "Who wrote it?",
            genloom.AnswerItem("Capital of France?"),
            ("What is on the moon?", "Cheese is a dairy product."),
            {"question": "Who came?", "context": "Ada came late."},
        ],
        context="Tolstoy wrote it.",
        examples=[
            ("What is 2+2?", "4"),
            ("Who is there?", "Bob is there.", "Bob"),
            {"question": "Where?", "context": "In Rome.", "answers": ["Rome", "in Rome"]},
            {"question": "Why?", "context": "No reason given.", "unanswerable": True},
            AnswerExample("When?", "Today", alternative_answers=["now"]),
        ],
        allow_unanswerable=True,
        max_new_tokens=32,
    )
    request = service.requests[-1]
    assert [(i.question, i.context) for i in request.items] == [
        ("Who wrote it?", "Tolstoy wrote it."),  # the shared context goes to plain-str questions only
        ("Capital of France?", ""),
        ("What is on the moon?", "Cheese is a dairy product."),
        ("Who came?", "Ada came late."),
    ]
    examples = [
        (e.question, e.context, e.answer, e.unanswerable, list(e.alternative_answers)) for e in request.examples
    ]
    assert examples == [
        ("What is 2+2?", "", "4", False, []),
        ("Who is there?", "Bob is there.", "Bob", False, []),
        ("Where?", "In Rome.", "Rome", False, ["in Rome"]),
        ("Why?", "No reason given.", "", True, []),
        ("When?", "", "Today", False, ["now"]),
    ]
    assert request.allow_unanswerable and request.sampling.max_new_tokens == 32
    assert result.answers == ["Tolstoy", "Paris", "", "Ada"]
    first, closed_book, moon, _ = result.results
    assert first.support is not None and first.support.text == "Tolstoy wrote it." and first.support.end == 17
    assert first.score == pytest.approx(-0.25) and first.finish_reason == "eos"
    assert closed_book.support is None and closed_book.context.chunks == 0
    assert moon.unanswerable and moon.support is None


def test_answer_single_question_forms(client: genloom.Client, service: StandInTasks) -> None:
    client.tasks.answer("Who wrote it?", context="Tolstoy wrote it.")
    client.tasks.answer(genloom.AnswerItem("Q?", "Some context."))
    client.tasks.answer({"question": "Q2?"})
    assert [[(i.question, i.context) for i in r.items] for r in service.requests] == [
        [("Who wrote it?", "Tolstoy wrote it.")],
        [("Q?", "Some context.")],
        [("Q2?", "")],
    ]
    with pytest.raises(ValueError, match="'answer', 'answers' or"):
        client.tasks.answer("Q", examples=[{"question": "no answer given"}])


# --- classify ----------------------------------------------------------------------------------------------------


def test_classify_labels_examples_and_options(client: genloom.Client, service: StandInTasks) -> None:
    result = client.tasks.classify(
        ["I loved it", "Meh"],
        labels=["positive", ("negative", "unhappy or critical"), genloom.ClassLabel("neutral", "neither")],
        multi_label=True,
        method="generate",
        threshold=0.25,
        examples=[
            ("Great film", "positive"),
            ("Awful and boring", ["negative"]),
            {"text": "Fine, I guess", "label": "neutral"},
            {"text": "Good and bad", "labels": ["positive", "negative"]},
            ClassifyExample("Terrible", "negative"),
        ],
        strategy="few-shot",
        max_examples=4,
        max_new_tokens=8,
        truncation="left",
    )
    request = service.requests[-1]
    assert list(request.texts) == ["I loved it", "Meh"]
    assert [(label.name, label.description) for label in request.labels] == [
        ("positive", ""),
        ("negative", "unhappy or critical"),
        ("neutral", "neither"),
    ]
    assert [(e.text, list(e.labels)) for e in request.examples] == [
        ("Great film", ["positive"]),
        ("Awful and boring", ["negative"]),
        ("Fine, I guess", ["neutral"]),
        ("Good and bad", ["positive", "negative"]),
        ("Terrible", ["negative"]),
    ]
    assert request.multi_label and request.method == tasks_pb2.CLASSIFY_METHOD_GENERATE
    assert request.HasField("threshold") and request.threshold == pytest.approx(0.25)
    assert request.strategy == tasks_pb2.PROMPT_STRATEGY_FEW_SHOT and request.max_examples == 4
    assert request.sampling.max_new_tokens == 8 and request.truncation == common_pb2.TRUNCATION_SIDE_LEFT
    assert result.labels == ["positive", "positive"]
    first = result.results[0]
    assert first.labels == ["positive"]
    assert first.probability("positive") == pytest.approx(0.7)
    assert first.as_dict() == pytest.approx({"positive": 0.7, "negative": 0.15, "neutral": 0.15})
    assert list(first.as_dict()) == ["positive", "negative", "neutral"]  # the request's label order
    with pytest.raises(KeyError):
        first.probability("sarcastic")


def test_classify_defaults_and_label_mapping(client: genloom.Client, service: StandInTasks) -> None:
    client.tasks.classify("text", labels={"spam": "unsolicited advertising", "ham": "everything else"})
    request = service.requests[-1]
    assert [(label.name, label.description) for label in request.labels] == [
        ("spam", "unsolicited advertising"),
        ("ham", "everything else"),
    ]
    assert request.method == tasks_pb2.CLASSIFY_METHOD_SCORE
    assert not request.HasField("threshold") and not request.calibrate and not request.normalize_by_length


# --- evaluate ----------------------------------------------------------------------------------------------------


def test_evaluate_request_and_event_stream(client: genloom.Client, service: StandInTasks) -> None:
    dataset = [
        {"text": "good", "label": "pos"},
        ("bad", "neg"),
        ClassifyExample("great", ["pos"]),
        {"text": "awful", "labels": ["neg"], "source": "ignored"},
    ]
    evaluation = client.tasks.evaluate(
        "classify",
        dataset,
        configurations=[
            {"shots": 0},
            genloom.EvalConfiguration(
                name="four random",
                shots=4,
                method="generate",
                example_source=genloom.EvalExampleSource(
                    split=[("ok", "pos"), ("no", "neg")], selection="random", seed=3
                ),
                sampling={"max_new_tokens": 4, "temperature": 0.0},
            ),
            {"shots": 1, "calibrate": True, "example_source": {"split": "examples/classify.jsonl"}},
        ],
        holdout_examples=1,
        labels=["pos", "neg"],
        limit=10,
        concurrency=2,
        return_predictions=True,
        seed=5,
    )
    with evaluation:
        events = list(evaluation)
    request = service.requests[-1]
    assert request.task == tasks_pb2.TASK_TYPE_CLASSIFY
    records = request.dataset.inline.records
    assert [(r.classify.text, list(r.classify.labels)) for r in records] == [
        ("good", ["pos"]),
        ("bad", ["neg"]),
        ("great", ["pos"]),
        ("awful", ["neg"]),
    ]
    assert request.holdout_examples == 1 and not request.HasField("examples")
    assert [label.name for label in request.options.labels] == ["pos", "neg"]
    assert request.limit == 10 and request.concurrency == 2 and request.return_predictions
    assert request.sampling.seed == 5
    zero, four, one = request.configurations
    assert zero.HasField("shots") and zero.shots == 0 and not zero.HasField("sampling")
    assert four.name == "four random" and four.method == tasks_pb2.CLASSIFY_METHOD_GENERATE
    assert four.example_source.selection == tasks_pb2.EXAMPLE_SELECTION_RANDOM and four.example_source.seed == 3
    assert [r.classify.text for r in four.example_source.split.inline.records] == ["ok", "no"]
    assert four.sampling.max_new_tokens == 4 and four.sampling.HasField("temperature")
    assert one.calibrate and one.example_source.split.path == "examples/classify.jsonl"

    kinds = [type(e) for e in events]
    assert kinds[:4] == [EvalProgress, EvalPrediction, EvalProgress, EvalConfigurationResult]
    assert kinds[-1] is EvalSummary and kinds.count(EvalConfigurationResult) == 3
    prediction = next(e for e in events if isinstance(e, EvalPrediction))
    assert prediction.score == 1.0 and prediction.error == ""
    assert evaluation.progress is not None and evaluation.progress.items_done == 3
    summary = evaluation.wait()  # already exhausted: returns the summary it saw
    assert summary is evaluation.summary and summary.primary_metric == "accuracy"
    assert [r.name for r in evaluation.results] == ["config-0 shots=0", "four random", "config-2 shots=1"]
    best = summary.best
    assert best.configuration_index == 2 and best.metrics.metric("accuracy") == pytest.approx(0.7)
    assert best.metrics.rouge_l is None and best.metrics.metric("rouge_l") is None
    assert best.metrics.per_label[0].f1 == pytest.approx(2 / 3)
    resolved = summary.results[1].configuration
    assert resolved.shots == 4 and resolved.method == "generate" and resolved.strategy is None
    assert resolved.sampling == {"max_new_tokens": 4, "temperature": 0.0}
    assert resolved.example_source is not None and resolved.example_source.selection == "random"
    assert resolved.example_source.split == [ClassifyExample("ok", ("pos",)), ClassifyExample("no", ("neg",))]


def test_evaluate_server_paths_and_default_configuration(client: genloom.Client, service: StandInTasks) -> None:
    summary = client.tasks.evaluate(
        "summarize", "data/news.jsonl", examples="data/news-examples.jsonl", target_words=30
    ).wait()
    request = service.requests[-1]
    assert request.task == tasks_pb2.TASK_TYPE_SUMMARIZE
    assert request.dataset.path == "data/news.jsonl" and request.examples.path == "data/news-examples.jsonl"
    assert len(request.configurations) == 1 and not request.configurations[0].HasField("shots")
    assert request.options.target_length.value == 30
    assert request.options.format == tasks_pb2.SUMMARY_FORMAT_UNSPECIFIED
    assert len(summary.results) == 1


# --- local JSONL -------------------------------------------------------------------------------------------------


def test_parse_eval_records_per_task() -> None:
    lines = [
        '{"text": "good", "label": "pos"}',
        "",
        '{"text": "both", "labels": ["pos", "neg"], "id": 7}',
    ]
    assert parse_eval_records(lines, "classify") == [
        ClassifyExample("good", ("pos",)),
        ClassifyExample("both", ("pos", "neg")),
    ]
    assert parse_eval_records(['{"document": "d", "summary": "s"}'], "summarize") == [SummarizeExample("d", "s")]
    answers = parse_eval_records(
        [
            '{"question": "q", "context": "c", "answer": "a", "answers": ["a", "b"]}',
            '{"question": "q2", "unanswerable": true}',
        ],
        "answer",
    )
    assert answers == [
        AnswerExample("q", "a", "c", alternative_answers=("b",)),
        AnswerExample("q2", "", unanswerable=True),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "x"', r"line 3: not valid JSON"),
        ('["text", "label"]', r"line 3: expected a JSON object, not list"),
        ('{"text": "x"}', r"line 3: a classify record needs 'label' or 'labels'"),
        ('{"label": "pos"}', r"line 3: a classify record needs 'text'"),
        ('{"text": "x", "label": 3}', r"line 3: 'label' must be a string, not int"),
        ('{"text": "x", "labels": "pos"}', r"line 3: 'labels' must be a list of strings, not str"),
    ],
)
def test_parse_eval_records_names_the_bad_line(line: str, message: str) -> None:
    lines = ['{"text": "a", "label": "pos"}', "   ", line]
    with pytest.raises(ValueError, match=message):
        parse_eval_records(lines, "classify")


# --- CLI ---------------------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("summarize", ["--words", "--sentences", "--bullets", "--strategy", "--examples", "--stream", "--json"]),
        ("answer", ["--context", "--unanswerable", "--json"]),
        ("classify", ["--labels", "--multi-label", "--method", "--calibrate", "--examples", "--json"]),
        ("eval", ["--task", "--shots", "--holdout", "--examples", "--model", "--method", "--limit", "--server-path"]),
    ],
)
def test_cli_help(command: str, expected: list[str]) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    for option in expected:
        assert option in result.output, option


def _invoke(target: str, *args: str, stdin: str | None = None) -> Any:
    return runner.invoke(app, ["--target", target, *args], input=stdin, env={"GENLOOM_API_KEY": ""})


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_cli_eval_reads_the_local_file_and_prints_a_table(
    stand_in: tuple[ServerThread, StandInTasks], service: StandInTasks, tmp_path: Path
) -> None:
    data = _jsonl(tmp_path / "data.jsonl", [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(5)])
    result = _invoke(
        stand_in[0].target,
        "eval",
        str(data),
        "--task",
        "classify",
        "--shots",
        "0,1,4",
        "--holdout",
        "2",
        "--method",
        "score,generate",
        "--calibrate",
        "--limit",
        "3",
    )
    assert result.exit_code == 0, result.output
    request = service.requests[-1]
    assert len(request.dataset.inline.records) == 5 and request.holdout_examples == 2 and request.limit == 3
    configurations = [(c.shots, c.method, c.calibrate) for c in request.configurations]
    score, generate = tasks_pb2.CLASSIFY_METHOD_SCORE, tasks_pb2.CLASSIFY_METHOD_GENERATE
    assert configurations == [
        (0, score, True),
        (1, score, True),
        (4, score, True),
        (0, generate, False),  # calibration is for the score method only
        (1, generate, False),
        (4, generate, False),
    ]
    table = result.stdout.splitlines()
    assert table[0].split() == ["configuration", "items", "accuracy", "macro_f1", "examples", "latency", "tokens"]
    assert len(table) == 1 + 6 + 1
    assert table[6].startswith("*") and "config-5 shots=4" in table[6]  # the stand-in ranks the last one best
    assert not any(line.startswith("*") for line in table[1:6])
    assert table[-1].startswith("best: config-5 shots=4 (accuracy 1.000)")


def test_cli_eval_server_path_examples_file_and_json(
    stand_in: tuple[ServerThread, StandInTasks], service: StandInTasks, tmp_path: Path
) -> None:
    result = _invoke(
        stand_in[0].target,
        "eval",
        "datasets/qa.jsonl",
        "--task",
        "answer",
        "--server-path",
        "--examples",
        "datasets/qa-examples.jsonl",
        "--model",
        "a",
        "--model",
        "b",
        "--unanswerable",
        "--json",
    )
    assert result.exit_code == 0, result.output
    request = service.requests[-1]
    assert request.dataset.path == "datasets/qa.jsonl" and request.examples.path == "datasets/qa-examples.jsonl"
    assert [c.model.model for c in request.configurations] == ["a", "b"]
    assert request.options.allow_unanswerable
    payload = json.loads(result.stdout)
    assert payload["primary_metric"] == "accuracy" and len(payload["results"]) == 2

    examples = _jsonl(tmp_path / "ex.jsonl", [{"question": "q", "answer": "a"}])
    data = _jsonl(tmp_path / "qa.jsonl", [{"question": "q2", "context": "c", "answers": ["x", "y"]}])
    predictions = tmp_path / "predictions.jsonl"
    result = _invoke(
        stand_in[0].target,
        "eval",
        str(data),
        "-t",
        "answer",
        "--examples",
        str(examples),
        "--shots",
        "1",
        "--predictions",
        str(predictions),
    )
    assert result.exit_code == 0, result.output
    request = service.requests[-1]
    assert request.examples.inline.records[0].answer.answer == "a"
    assert list(request.dataset.inline.records[0].answer.alternative_answers) == ["y"]
    assert request.return_predictions
    assert json.loads(predictions.read_text().splitlines()[0])["prediction"] == "pos"


def test_cli_eval_rejects_a_bad_line_before_calling(
    stand_in: tuple[ServerThread, StandInTasks], service: StandInTasks, tmp_path: Path
) -> None:
    data = _jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": "pos"}, {"text": "b"}])
    result = _invoke(stand_in[0].target, "eval", str(data), "--task", "classify")
    assert result.exit_code == 2
    assert "line 2: a classify record needs 'label' or 'labels'" in result.stderr
    assert str(data) in result.stderr
    result = _invoke(stand_in[0].target, "eval", str(data), "--task", "classify", "--holdout", "1", "--examples", "x")
    assert result.exit_code == 2 and "not both" in result.stderr
    result = _invoke(stand_in[0].target, "eval", str(data), "--task", "summarize", "--method", "score")
    assert result.exit_code == 2 and "--task classify" in result.stderr
    assert service.requests == []


def test_cli_classify_prints_probabilities(
    stand_in: tuple[ServerThread, StandInTasks], service: StandInTasks, tmp_path: Path
) -> None:
    examples = _jsonl(tmp_path / "ex.jsonl", [{"text": "nice", "label": "pos"}])
    result = _invoke(
        stand_in[0].target,
        "classify",
        "--labels",
        "pos, neg",
        "I loved it",
        "--examples",
        str(examples),
        "--method",
        "score",
        "--calibrate",
    )
    assert result.exit_code == 0, result.output
    request = service.requests[-1]
    assert [label.name for label in request.labels] == ["pos", "neg"] and request.calibrate
    assert request.examples[0].text == "nice"
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[0] pos") and "I loved it" in lines[0]
    assert lines[1].split()[:3] == ["*", "pos", "0.700"] and lines[2].split()[:2] == ["neg", "0.300"]
    result = _invoke(stand_in[0].target, "classify", "--labels", "pos,neg", "--json", stdin="from stdin")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["label"] == "pos"
    assert list(service.requests[-1].texts) == ["from stdin"]


def test_cli_summarize_and_answer(
    stand_in: tuple[ServerThread, StandInTasks], service: StandInTasks, tmp_path: Path
) -> None:
    document = tmp_path / "report.txt"
    document.write_text("A long report.")
    result = _invoke(stand_in[0].target, "summarize", str(document), "--words", "50", "--bullets")
    assert result.exit_code == 0, result.output
    assert result.stdout == "summary 0\n" and "[eos; 100 prompt + 10 generated tokens]" in result.stderr
    request = service.requests[-1]
    assert list(request.documents) == ["A long report."] and request.format == tasks_pb2.SUMMARY_FORMAT_BULLETS

    result = _invoke(stand_in[0].target, "summarize", "-", "--stream", stdin="From stdin.")
    assert result.exit_code == 0, result.output
    assert result.stdout == "The gist in brief.\n" and "[map: 2/2]" in result.stderr
    assert service.requests[-1].document == "From stdin."

    result = _invoke(stand_in[0].target, "summarize", "-", "--words", "5", "--sentences", "2", stdin="x")
    assert result.exit_code == 2 and "not both" in result.stderr

    context = tmp_path / "context.txt"
    context.write_text("Tolstoy wrote it.")
    result = _invoke(stand_in[0].target, "answer", "--context", str(context), "Who wrote it?", "--unanswerable")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Tolstoy\n" and "score -0.250" in result.stderr
    request = service.requests[-1]
    assert request.allow_unanswerable and request.items[0].context == "Tolstoy wrote it."


def test_cli_reports_server_errors(stand_in: tuple[ServerThread, StandInTasks], service: StandInTasks) -> None:
    service.fail_next.append(errors.InvalidArgument.field("labels[1]", "duplicate label 'a'"))
    result = _invoke(stand_in[0].target, "classify", "--labels", "a,a", "text")
    assert result.exit_code == 1
    assert "INVALID_ARGUMENT" in result.stderr and "labels[1]: duplicate label 'a'" in result.stderr

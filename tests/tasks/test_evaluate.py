"""Evaluate end to end on the real default model: the stream's shape, metrics that agree with the predictions
it streamed (recomputed here by hand), example splits that are never scored, datasets from the server's disk,
and bad datasets."""

from __future__ import annotations

import json
from collections import Counter

import grpc
import pytest

from genloom.services.tasks import metrics
from genloom.v1 import inference_pb2, tasks_pb2

from .conftest import TaskStack, bad_request_fields

SENTIMENT = [
    ("What a wonderful, heartwarming film.", "positive"),
    ("I hated every minute of it.", "negative"),
    ("Brilliant acting and a lovely score.", "positive"),
    ("Boring, slow and badly written.", "negative"),
    ("A joy to watch, I smiled throughout.", "positive"),
    ("The worst movie I have seen this year.", "negative"),
    ("Delightful characters and a great ending.", "positive"),
    ("Awful dialogue and a pointless plot.", "negative"),
    ("Fantastic, I would watch it again.", "positive"),
    ("Terrible pacing, I fell asleep.", "negative"),
]


def classify_records(pairs: list[tuple[str, str]]) -> list[tasks_pb2.EvalRecord]:
    return [tasks_pb2.EvalRecord(classify=tasks_pb2.ClassifyExample(text=t, labels=[lb])) for t, lb in pairs]


async def collect(stack: TaskStack, request: tasks_pb2.EvaluateRequest) -> list[tasks_pb2.EvaluateResponse]:
    return [m async for m in stack.stub.Evaluate(request, timeout=600)]


def macro_f1(gold: list[str], pred: list[str]) -> float:
    labels = sorted(set(gold) | {p for p in pred if p})  # "" = the generate method matched no label
    f1s = []
    for label in labels:
        tp = sum(g == p == label for g, p in zip(gold, pred, strict=True))
        fp = sum(p == label and g != label for g, p in zip(gold, pred, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, pred, strict=True))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(f1s) / len(f1s)


async def test_classify_evaluation_streams_metrics_that_match_its_predictions(tasks: TaskStack) -> None:
    holdout = 2
    request = tasks_pb2.EvaluateRequest(
        task=tasks_pb2.TASK_TYPE_CLASSIFY,
        dataset=tasks_pb2.EvalDataset(inline=tasks_pb2.EvalRecords(records=classify_records(SENTIMENT))),
        holdout_examples=holdout,
        configurations=[
            tasks_pb2.EvalConfiguration(),  # zero-shot, score
            tasks_pb2.EvalConfiguration(strategy=tasks_pb2.PROMPT_STRATEGY_FEW_SHOT, shots=2),
            tasks_pb2.EvalConfiguration(shots=1, method=tasks_pb2.CLASSIFY_METHOD_GENERATE, name="gen"),
        ],
        return_predictions=True,
        concurrency=4,
    )
    messages = await collect(tasks, request)
    items = SENTIMENT[holdout:]
    assert messages[-1].HasField("summary")
    summary = messages[-1].summary
    assert summary.primary_metric == "accuracy" and len(summary.results) == 3
    assert [r.name for r in summary.results] == [
        "zero-shot smollm2-135m-instruct score",
        "few-shot(2) smollm2-135m-instruct score",
        "gen",
    ]
    for index, result in enumerate(summary.results):
        own = [m for m in messages[:-1] if _config_of(m) == index]
        # progress first (0 done), predictions, a final progress with every item done, then the result
        assert own[0].HasField("progress") and own[0].progress.items_done == 0
        assert own[-1].HasField("result") and own[-1].result == result
        assert own[-2].progress.items_done == own[-2].progress.items_total == len(items)
        predictions = sorted((m.prediction for m in own if m.HasField("prediction")), key=lambda p: p.item_index)
        assert [p.item_index for p in predictions] == list(range(len(items)))
        # the held-out examples are never scored: item i is dataset record holdout + i
        assert [p.reference for p in predictions] == [label for _, label in items]
        assert all(not p.error and p.latency_s > 0 for p in predictions)
        m = result.metrics
        gold = [label for _, label in items]
        pred = [p.prediction for p in predictions]
        assert m.items == len(items) and m.items_failed == 0
        assert m.accuracy == pytest.approx(sum(g == p for g, p in zip(gold, pred, strict=True)) / len(items))
        assert m.accuracy == pytest.approx(sum(p.score for p in predictions) / len(items))
        assert m.macro_f1 == pytest.approx(macro_f1(gold, pred))
        assert {pl.label: pl.support for pl in m.per_label} == {"positive": 4, "negative": 4}
        assert m.mean_examples_used == [0, 2, 1][index]
        assert m.mean_latency_s == pytest.approx(sum(p.latency_s for p in predictions) / len(items))
        assert m.usage.total_tokens > 0 and m.mean_prompt_tokens > 0
        assert result.configuration.shots == [0, 2, 1][index]
    accuracies = [r.metrics.accuracy for r in summary.results]
    assert summary.best_configuration_index == accuracies.index(max(accuracies))


def _config_of(message: tasks_pb2.EvaluateResponse) -> int:
    kind = message.WhichOneof("event")
    return getattr(message, kind).configuration_index  # type: ignore[no-any-return]


async def test_summarize_evaluation_from_a_server_file(tasks: TaskStack) -> None:
    lines = [
        {
            "document": "The library opens at nine on weekdays and at ten on Saturdays. It is closed on Sundays.",
            "summary": "The library opens at nine on weekdays, ten on Saturdays, and is closed Sundays.",
        },
        {
            "document": "A storm knocked out power in the north district. Crews expect to restore it by evening.",
            "summary": "A storm cut power in the north district; it should be back by evening.",
        },
    ]
    path = tasks.data_root / "summaries.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    request = tasks_pb2.EvaluateRequest(
        task=tasks_pb2.TASK_TYPE_SUMMARIZE,
        dataset=tasks_pb2.EvalDataset(path="summaries.jsonl"),
        configurations=[tasks_pb2.EvalConfiguration()],
        sampling=inference_pb2.SamplingParams(max_new_tokens=32),
        return_predictions=True,
    )
    messages = await collect(tasks, request)
    predictions = sorted((m.prediction for m in messages if m.HasField("prediction")), key=lambda p: p.item_index)
    scores = [metrics.rouge(p.prediction, line["summary"]) for p, line in zip(predictions, lines, strict=True)]
    m = messages[-1].summary.results[0].metrics
    assert messages[-1].summary.primary_metric == "rouge_l"
    assert m.rouge1 == pytest.approx(sum(s[0] for s in scores) / 2)
    assert m.rouge2 == pytest.approx(sum(s[1] for s in scores) / 2)
    assert m.rouge_l == pytest.approx(sum(s[2] for s in scores) / 2)
    assert 0 < m.rouge1 <= 1 and [p.score for p in predictions] == pytest.approx([s[2] for s in scores])


async def test_answer_evaluation_exact_match_and_token_f1(tasks: TaskStack) -> None:
    records = [
        tasks_pb2.AnswerExample(question="What colour is the door?", context="The door is painted red.", answer="red"),
        tasks_pb2.AnswerExample(
            question="Who founded the club?",
            context="The chess club was founded by Maria Lopez in 1990.",
            answer="Maria Lopez",
            alternative_answers=["Lopez"],
        ),
        tasks_pb2.AnswerExample(
            question="How many legs does a spider have?", answer="eight", alternative_answers=["8"]
        ),
    ]
    request = tasks_pb2.EvaluateRequest(
        task=tasks_pb2.TASK_TYPE_ANSWER,
        dataset=tasks_pb2.EvalDataset(
            inline=tasks_pb2.EvalRecords(records=[tasks_pb2.EvalRecord(answer=r) for r in records])
        ),
        configurations=[tasks_pb2.EvalConfiguration()],
        sampling=inference_pb2.SamplingParams(max_new_tokens=16),
        return_predictions=True,
    )
    messages = await collect(tasks, request)
    predictions = sorted((m.prediction for m in messages if m.HasField("prediction")), key=lambda p: p.item_index)
    expected = [
        metrics.answer_scores(p.prediction, p.unanswerable, [r.answer, *r.alternative_answers], False)
        for p, r in zip(predictions, records, strict=True)
    ]
    m = messages[-1].summary.results[0].metrics
    assert m.exact_match == pytest.approx(sum(e[0] for e in expected) / 3)
    assert m.token_f1 == pytest.approx(sum(e[1] for e in expected) / 3)
    assert m.token_f1 > 0  # the model gets at least one of these right


async def test_bad_datasets_are_invalid_argument_with_line_numbers(tasks: TaskStack) -> None:
    path = tasks.data_root / "broken.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": "also fine", "label": "b"}\n{"text": "no label"}\n')
    base = dict(task=tasks_pb2.TASK_TYPE_CLASSIFY, configurations=[tasks_pb2.EvalConfiguration()])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(tasks, tasks_pb2.EvaluateRequest(dataset=tasks_pb2.EvalDataset(path="broken.jsonl"), **base))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "line 3" in (err.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(tasks, tasks_pb2.EvaluateRequest(dataset=tasks_pb2.EvalDataset(path="../outside.jsonl"), **base))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    inline = tasks_pb2.EvalDataset(inline=tasks_pb2.EvalRecords(records=classify_records(SENTIMENT[:4])))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(
            tasks,
            tasks_pb2.EvaluateRequest(
                task=tasks_pb2.TASK_TYPE_CLASSIFY, dataset=inline, configurations=[tasks_pb2.EvalConfiguration(shots=2)]
            ),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(err.value) == ["configurations[0].shots"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(
            tasks,
            tasks_pb2.EvaluateRequest(
                task=tasks_pb2.TASK_TYPE_SUMMARIZE, dataset=inline, configurations=[tasks_pb2.EvalConfiguration()]
            ),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(err.value)[0].startswith("dataset.inline.records[0]")


def test_label_counts_helper() -> None:
    assert Counter(label for _, label in SENTIMENT) == {"positive": 5, "negative": 5}

"""Task RPCs check sampling with the inference service's own validator (services/inference/sampling.py): a value
no engine can use is INVALID_ARGUMENT with a google.rpc.BadRequest naming the task request's field, before any
model is called; a tiny temperature is greedy, as in the inference service. Regression tests for issue 12: a
Summarize with temperature 1e-45 killed the hf engine behind the task service, and task RPCs answered sampling
errors without BadRequest details."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genloom.v1 import inference_pb2, tasks_pb2

from .conftest import TaskStack, bad_request_fields

DOCUMENT = (
    "The team met on Monday to plan the product launch. Marketing will prepare the announcement, engineering "
    "will finish the release by Friday, and support will update the help pages before customers see the change."
)
LABELS = [tasks_pb2.ClassLabel(name="positive"), tasks_pb2.ClassLabel(name="negative")]


def summarize(**sampling: Any) -> tasks_pb2.SummarizeRequest:
    return tasks_pb2.SummarizeRequest(
        documents=[DOCUMENT], sampling=inference_pb2.SamplingParams(max_new_tokens=12, **sampling)
    )


async def assert_serving(tasks: TaskStack) -> None:
    health = health_pb2_grpc.HealthStub(tasks.channel)
    for service in ("genloom.v1.InferenceService", "genloom.v1.TaskService"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    await tasks.engine.check_health()


async def test_tiny_temperature_summarizes_greedily(tasks: TaskStack) -> None:
    greedy = await tasks.stub.Summarize(summarize(temperature=0))
    tiny = await tasks.stub.Summarize(summarize(temperature=1e-45))
    assert tiny.results[0].summary == greedy.results[0].summary
    await assert_serving(tasks)


@pytest.mark.parametrize(
    ("name", "value"),
    [("temperature", math.nan), ("temperature", math.inf), ("repetition_penalty", 1e-45), ("top_p", -1.0)],
)
async def test_unusable_sampling_is_refused_with_its_field(tasks: TaskStack, name: str, value: float) -> None:
    sampling = inference_pb2.SamplingParams(**{name: value})
    calls = [
        tasks.stub.Summarize(tasks_pb2.SummarizeRequest(documents=[DOCUMENT], sampling=sampling)),
        tasks.stub.Answer(
            tasks_pb2.AnswerRequest(items=[tasks_pb2.AnswerItem(question="When is the release?")], sampling=sampling)
        ),
        tasks.stub.Classify(
            tasks_pb2.ClassifyRequest(
                texts=["great"], labels=LABELS, method=tasks_pb2.CLASSIFY_METHOD_GENERATE, sampling=sampling
            )
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(err.value) == [f"sampling.{name}"]
    stream = tasks.stub.SummarizeStream(tasks_pb2.SummarizeStreamRequest(document=DOCUMENT, sampling=sampling))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stream:
            pass
    assert bad_request_fields(err.value) == [f"sampling.{name}"]
    await assert_serving(tasks)


async def test_vocabulary_bounds_are_checked_by_the_task_service(tasks: TaskStack) -> None:
    sampling = inference_pb2.SamplingParams(top_k=4294967295, stop_token_ids=[10**9])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.stub.Summarize(tasks_pb2.SummarizeRequest(documents=[DOCUMENT], sampling=sampling))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(err.value) == ["sampling.top_k", "sampling.stop_token_ids[0]"]


def evaluate(
    config_sampling: inference_pb2.SamplingParams, sampling: inference_pb2.SamplingParams
) -> tasks_pb2.EvaluateRequest:
    """A two-item classify Evaluate: a default configuration, and one with `config_sampling`."""
    records = [
        tasks_pb2.EvalRecord(classify=tasks_pb2.ClassifyExample(text=t, labels=[label]))
        for t, label in (("great", "positive"), ("awful", "negative"))
    ]
    return tasks_pb2.EvaluateRequest(
        task=tasks_pb2.TASK_TYPE_CLASSIFY,
        dataset=tasks_pb2.EvalDataset(inline=tasks_pb2.EvalRecords(records=records)),
        configurations=[tasks_pb2.EvalConfiguration(), tasks_pb2.EvalConfiguration(sampling=config_sampling)],
        sampling=sampling,
    )


async def test_evaluate_names_the_configuration_whose_sampling_is_bad(tasks: TaskStack) -> None:
    request = evaluate(
        inference_pb2.SamplingParams(temperature=math.inf), inference_pb2.SamplingParams(repetition_penalty=1e-45)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in tasks.stub.Evaluate(request):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(err.value) == ["sampling.repetition_penalty", "configurations[1].sampling.temperature"]


async def test_a_million_stop_token_ids_are_refused_at_once(tasks: TaskStack) -> None:
    """Over the limit only the count is reported: no violation per entry (before, a million out-of-vocabulary ids
    built a million violations on the event loop)."""
    sampling = inference_pb2.SamplingParams(stop_token_ids=[10**9] * 1_000_000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.stub.Summarize(tasks_pb2.SummarizeRequest(documents=[DOCUMENT], sampling=sampling), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = bad_request_fields(err.value)
    assert fields == ["sampling.stop_token_ids"] and len(fields) <= 20
    await assert_serving(tasks)


async def test_a_million_stop_sequences_are_refused_at_once(tasks: TaskStack) -> None:
    sampling = inference_pb2.SamplingParams(max_new_tokens=4, stop=[""] * 1_000_000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.stub.Summarize(tasks_pb2.SummarizeRequest(documents=[DOCUMENT], sampling=sampling), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(bad_request_fields(err.value)) <= 20
    assert len(err.value.details() or "") < 1000
    await assert_serving(tasks)


async def test_min_new_tokens_raises_the_task_budget(tasks: TaskStack) -> None:
    """Classify without max_new_tokens reserves the longest label + 4 tokens; a larger min_new_tokens raises that
    budget to it (before, the task sent max_new_tokens below min_new_tokens and inference refused the request)."""
    request = tasks_pb2.ClassifyRequest(
        texts=["What a great day!"],
        labels=LABELS,
        method=tasks_pb2.CLASSIFY_METHOD_GENERATE,
        sampling=inference_pb2.SamplingParams(min_new_tokens=20),
    )
    response = await tasks.stub.Classify(request, timeout=120)
    result = response.results[0]
    assert result.context.max_new_tokens == 20
    assert response.usage.completion_tokens >= 20


async def test_evaluate_checks_the_vocabulary_before_any_item(tasks: TaskStack) -> None:
    request = evaluate(
        inference_pb2.SamplingParams(top_k=4294967295), inference_pb2.SamplingParams(stop_token_ids=[10**9])
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in tasks.stub.Evaluate(request, timeout=60):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(err.value) == ["sampling.stop_token_ids[0]", "configurations[1].sampling.top_k"]

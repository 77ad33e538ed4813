"""The whole loop on the real default model: a LoRA job on self-made labelled task records, trained by a real
worker, then served by its ft: name through Classify (the prompt it was trained on) and Generate."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from genloom.services.finetune.servicer import FineTuningServicer
from genloom.services.inference.servicer import InferenceServicer
from genloom.services.inference.settings import InferenceSettings
from genloom.services.server.app import GenloomServer
from genloom.services.server.settings import ModelSettings, ServerSettings
from genloom.services.tasks.servicer import TaskServicer
from genloom.services.tasks.settings import TasksSettings
from genloom.services.tokenizer.servicer import TokenizerServicer
from genloom.services.tokenizer.settings import TokenizerSettings
from genloom.v1 import (
    common_pb2,
    finetune_pb2,
    finetune_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)

from ..conftest import DEFAULT_MODEL
from .conftest import FineTuneEnv, WorkerProcess

S = finetune_pb2
pytestmark = pytest.mark.timeout(1200)

# An arbitrary mapping the base model cannot guess: animals are "blue", vehicles are "green".
LABELS = ["blue", "green"]
ANIMALS = ["cat", "dog", "horse", "rabbit", "fox", "owl", "sheep", "goat", "mouse", "duck", "deer", "bear"]
VEHICLES = ["car", "bus", "truck", "tram", "van", "tractor", "scooter", "lorry", "taxi", "jeep", "coach", "train"]
PLACES = ["in the field", "near the river", "by the old barn", "at dawn", "in the rain"]
HELD_OUT = [
    ("The wolf slept by the old barn.", "blue"),
    ("The tiger ran near the river.", "blue"),
    ("A camel waited at dawn.", "blue"),
    ("The squirrel hid in the rain.", "blue"),
    ("The ambulance raced near the river.", "green"),
    ("A motorbike stopped by the old barn.", "green"),
    ("The minibus waited at dawn.", "green"),
    ("The bulldozer crawled in the rain.", "green"),
]


def records() -> list[dict[str, str]]:
    rows = []
    places = itertools.cycle(PLACES)
    for animal, vehicle in zip(ANIMALS, VEHICLES, strict=True):
        rows.append({"text": f"The {animal} stood {next(places)}.", "label": "blue"})
        rows.append({"text": f"The {vehicle} stood {next(places)}.", "label": "green"})
        rows.append({"text": f"A {animal} moved {next(places)}.", "label": "blue"})
        rows.append({"text": f"A {vehicle} moved {next(places)}.", "label": "green"})
    return rows


@pytest_asyncio.fixture(loop_scope="session")
async def stack(hf_engine: Any, default_model_dir: Path, ft_env: FineTuneEnv) -> AsyncIterator[grpc.aio.Channel]:
    """Tokenizer, inference (the shared hf engine), tasks and fine-tuning on one server, with the test Redis."""
    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent, redis_url=ft_env.redis_url)
    services = [
        TokenizerServicer.from_settings(models, TokenizerSettings()),
        InferenceServicer(models, InferenceSettings(), engine=hf_engine),
        TaskServicer(TasksSettings()),
        FineTuningServicer(models, ft_env.settings()),
    ]
    server = GenloomServer(ServerSettings(port=0, shutdown_grace=1.0), services)
    await server.start()
    await server.wait_ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield channel
    await channel.close()
    await server.stop(1.0)


async def _classify(tasks: Any, model: str) -> list[tasks_pb2.ClassifyResult]:
    request = tasks_pb2.ClassifyRequest(
        texts=[t for t, _ in HELD_OUT],
        labels=[tasks_pb2.ClassLabel(name=n) for n in LABELS],
        model=common_pb2.ModelRef(model=model),
    )
    return list((await tasks.Classify(request, timeout=300)).results)


def _true_probability(results: list[tasks_pb2.ClassifyResult]) -> float:
    total = 0.0
    for result, (_, gold) in zip(results, HELD_OUT, strict=True):
        total += next(p.probability for p in result.probabilities if p.label == gold)
    return total / len(HELD_OUT)


async def test_lora_classifier_on_the_default_model_served_by_name(
    stack: grpc.aio.Channel, shared_worker: WorkerProcess
) -> None:
    ft = finetune_pb2_grpc.FineTuningServiceStub(stack)
    tasks = tasks_pb2_grpc.TaskServiceStub(stack)
    inference = inference_pb2_grpc.InferenceServiceStub(stack)
    data = "".join(json.dumps(r) + "\n" for r in records()).encode()
    spec = S.JobSpec(
        training_data=S.TrainingDataSource(jsonl=data),
        data_format=S.DATA_FORMAT_TASK_RECORDS,
        task=tasks_pb2.TASK_TYPE_CLASSIFY,
        task_options=tasks_pb2.TaskPromptOptions(labels=[tasks_pb2.ClassLabel(name=n) for n in LABELS]),
        hyperparameters=S.Hyperparameters(
            epochs=4, batch_size=8, learning_rate=3e-3, lora_rank=8, max_seq_length=256, checkpoint_interval_steps=8
        ),
        validation_split=0.125,
        suffix="colours",
    )
    job = (await ft.CreateJob(S.CreateJobRequest(spec=spec), timeout=60)).job
    assert job.spec.base_model == DEFAULT_MODEL
    events = [r.event async for r in ft.WatchJob(S.WatchJobRequest(job_id=job.id), timeout=1100)]
    job = (await ft.GetJob(S.GetJobRequest(job_id=job.id))).job
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    losses = [e.metrics.train_loss for e in events if e.metrics.HasField("train_loss")]
    assert losses[-1] < losses[0] * 0.5, losses  # the loss falls
    name = job.result_model
    assert name == f"ft:{DEFAULT_MODEL}:colours:{job.id}"

    base = await _classify(tasks, "")
    tuned = await _classify(tasks, name)
    accuracy = sum(r.label == gold for r, (_, gold) in zip(tuned, HELD_OUT, strict=True)) / len(HELD_OUT)
    assert accuracy >= 0.75, [(r.label, g) for r, (_, g) in zip(tuned, HELD_OUT, strict=True)]
    print("true-label probability", _true_probability(base), "->", _true_probability(tuned))
    assert _true_probability(tuned) > _true_probability(base) + 0.1

    # Generation changes too: the same prompt, greedy, with and without the fine-tuned model.
    prompt = inference_pb2.Prompt(
        conversation=common_pb2.Conversation(
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Describe a horse in one sentence.")]
        )
    )
    sampling = inference_pb2.SamplingParams(max_new_tokens=16, temperature=0.0)
    outputs = await asyncio.gather(
        *(
            inference.Generate(
                inference_pb2.GenerateRequest(prompt=prompt, sampling=sampling, model=common_pb2.ModelRef(model=m))
            )
            for m in ("", name)
        )
    )
    assert outputs[0].text != outputs[1].text

"""The SDK's `client.tasks` and the CLI task commands against the real task service (real model, real gRPC)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

import genloom

from .conftest import TaskStack

MEETING = (
    "The quarterly planning meeting moved from Monday to Friday because the large conference room was booked. "
    "Everyone must bring a laptop."
)


async def test_async_client_runs_every_task(tasks: TaskStack) -> None:
    async with genloom.AsyncClient(target=tasks.target, timeout=300) as client:
        classified = await client.tasks.classify(
            ["I adored it.", "A dull mess."],
            labels=[("positive", "the writer liked it"), "negative"],
            examples=[("Loved it.", "positive")],
            calibrate=True,
        )
        for result in classified.results:
            assert sum(result.as_dict().values()) == pytest.approx(1.0)
            assert result.label == max(result.as_dict(), key=result.as_dict().__getitem__)
            assert result.context.examples_used == 1
        assert classified.model == "smollm2-135m-instruct"

        summaries = await client.tasks.summarize(MEETING, max_new_tokens=32, target_words=15)
        assert summaries.results[0].summary and summaries.usage.total_tokens > 0

        stream = client.tasks.summarize_stream(MEETING, max_new_tokens=32, target_words=15)
        _ = [event async for event in stream]
        assert stream.text == summaries.results[0].summary
        assert stream.final is not None and stream.final.summary == stream.text

        answers = await client.tasks.answer("Which day is the meeting on?", context=MEETING, max_new_tokens=16)
        result = answers.results[0]
        assert "friday" in result.answer.lower() and result.support is not None and result.support.text == MEETING

        evaluation = client.tasks.evaluate(
            "classify",
            [
                {"text": "Wonderful and moving.", "label": "positive"},
                {"text": "Tedious and silly.", "label": "negative"},
                {"text": "A triumph.", "label": "positive"},
                {"text": "Unwatchable.", "label": "negative"},
            ],
            configurations=[{}, {"method": "generate"}],
        )
        summary = await evaluation.wait()
        assert len(summary.results) == 2 and summary.primary_metric == "accuracy"
        assert all(r.metrics.items == 4 for r in summary.results)


async def test_cli_classify_and_eval(tasks: TaskStack, tmp_path: Path) -> None:
    env = {**os.environ, "GENLOOM_API_KEY": ""}

    async def cli(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "genloom.cli", "--target", tasks.target, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 300)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    out = await cli("classify", "--labels", "positive,negative", "--json", "What a lovely day.")
    results = json.loads(out)["results"]
    assert results[0]["label"] in ("positive", "negative")

    data = tmp_path / "reviews.jsonl"
    lines = [
        ("Great fun.", "positive"), ("Awful.", "negative"), ("Loved it.", "positive"),
        ("Hated it.", "negative"), ("Superb.", "positive"), ("Dreadful.", "negative"),
    ]  # fmt: skip
    data.write_text("".join(json.dumps({"text": t, "label": lb}) + "\n" for t, lb in lines))
    out = await cli("eval", str(data), "--task", "classify", "--shots", "0,1", "--holdout", "2")
    assert "zero-shot" in out and "one-shot" in out and "accuracy" in out.lower()

"""Interop: a Node.js client that knows nothing but protos/genloom/v1/finetune.proto submits a fine-tuning job and
follows it with WatchJob; a real `genloom worker` trains it (tiny random Llama).

tests/node/finetune_client.mjs loads the .proto at run time (no generated code), sends its records inline as JSONL
bytes, streams WatchJob to the terminal event and prints what it saw as one JSON object; this test checks that
against the Python stub's view of the same job. Without Node.js or `make node-deps` it fails rather than skips,
as tests/node/test_node_clients.py does.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from genloom.v1 import finetune_pb2

from ..node.test_node_clients import NODE_DIR, run_node_client
from .conftest import TINY, FineTuneServer, WorkerProcess, qa_records

S = finetune_pb2
CLIENT = NODE_DIR / "finetune_client.mjs"
pytestmark = pytest.mark.timeout(600)


def _stream_position(event_id: str) -> tuple[int, int]:
    """A Redis Stream id "<ms>-<seq>" as a sortable pair (the test may look inside; clients must not)."""
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def test_node_client_creates_and_watches_a_job(
    ft: FineTuneServer, shared_worker: WorkerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = qa_records(24, start=100)
    monkeypatch.setenv("GENLOOM_FT_RECORDS", json.dumps(records))
    result: dict[str, Any] = run_node_client(ft.server.target, CLIENT)
    job_id = result["job_id"]

    # CreateJob answered at once, in VALIDATING, with the inline bytes stored and shown as a path.
    created = result["created"]
    assert created["created"] is True and created["state"] == "JOB_STATE_VALIDATING"
    assert created["id"] == job_id and job_id.startswith("ftjob-")
    assert created["training_data_source"] == "path" and created["training_data_path"]
    assert created["max_steps"] == result["request"]["hyperparameters"]["max_steps"]
    assert created["lora_rank"] == 8  # a default the request left unset, filled in
    assert result["request"]["records"] == len(records)

    # The stream: the whole lifecycle, ending on the success event with the registered model.
    assert result["states"] == [
        "JOB_STATE_VALIDATING",
        "JOB_STATE_QUEUED",
        "JOB_STATE_RUNNING",
        "JOB_STATE_SUCCEEDED",
    ]
    assert result["terminal"] == "JOB_STATE_SUCCEEDED"
    assert result["events"][-1]["type"] == "JOB_EVENT_TYPE_STATE_CHANGE"
    assert result["result_model"] == f"ft:{TINY}:node:{job_id}"
    assert all(e["job_id"] == job_id for e in result["events"])

    # Event ids strictly increasing (no duplicates, no reordering) and exactly what the Python stub reads back.
    ids = result["event_ids"]
    positions = [_stream_position(i) for i in ids]
    assert all(a < b for a, b in itertools.pairwise(positions))
    stored = ft.events(job_id, follow=False)
    assert ids == [e.id for e in stored]
    assert [e["type"] for e in result["events"]] == [S.JobEventType.Name(e.type) for e in stored]
    assert [e["created_at_ms"] for e in result["events"]] == [e.created_at.ToMilliseconds() for e in stored]

    # Metrics: one training event per step (logging every step by default), up to max_steps.
    max_steps = result["request"]["hyperparameters"]["max_steps"]
    python_metrics = [e.metrics for e in stored if e.type == S.JOB_EVENT_TYPE_METRICS]
    assert result["metrics_events"] == len(python_metrics)
    node_steps = [e["step"] for e in result["events"] if e["type"] == "JOB_EVENT_TYPE_METRICS"]
    assert node_steps == [m.step for m in python_metrics]
    train_steps = [m.step for m in python_metrics if m.HasField("train_loss")]
    assert train_steps == list(range(1, max_steps + 1))

    # GetJob agrees: succeeded, same model, same newest event, every record accounted for.
    job = ft.get(job_id)
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    assert job.result_model == result["result_model"]
    assert job.last_event_id == ids[-1]
    assert job.training_examples + job.validation_examples == len(records)
    assert job.latest_metrics.step == max_steps and job.trained_tokens > 0
    assert job.idempotency_key == result["request"]["idempotency_key"]

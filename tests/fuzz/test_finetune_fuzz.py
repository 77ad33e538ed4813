"""Every FineTuningService RPC with generated requests (properties: tests/fuzz/harness.py). No worker runs:
created jobs and sweeps stay queued, which is enough to exercise validation, storage, listing and cancelling."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from genloom.v1 import finetune_pb2 as ft

from .harness import TINY, FuzzSession, assert_still_serving, fuzz_rpc, methods

SERVICE = "FineTuningService"
TRAIN = b"".join(b'{"prompt": "Item %d colour:", "completion": " red"}\n' % i for i in range(6))


def _spec(**fields: object) -> ft.JobSpec:
    values: dict[str, object] = dict(
        base_model=TINY,
        training_data=ft.TrainingDataSource(jsonl=TRAIN),
        hyperparameters=ft.Hyperparameters(epochs=1, batch_size=2, max_seq_length=32),
        suffix="fuzz",
    )
    values.update(fields)
    return ft.JobSpec(**values)


def bases(s: FuzzSession) -> dict[str, list[Message]]:
    job, cancelled = s.job_ids[0], s.job_ids[1]
    sweep = ft.SweepSpec(
        base_job=_spec(),
        search_space=[
            ft.SearchDimension(name="learning_rate", float_range=ft.FloatRange(min=1e-4, max=1e-2, log=True)),
            ft.SearchDimension(name="lora_rank", choice=ft.ChoiceSpace(values=[ft.ParameterValue(int_value=4)])),
        ],
        method=ft.SWEEP_METHOD_BAYESIAN,
        max_trials=2,
    )
    return {
        "CreateJob": [
            ft.CreateJobRequest(spec=_spec()),
            ft.CreateJobRequest(
                spec=_spec(
                    training_data=ft.TrainingDataSource(path="train.jsonl"),
                    method=ft.FINE_TUNE_METHOD_LORA,
                    validation_split=0.25,
                    metadata={"team": "fuzz"},
                ),
                webhook=ft.Webhook(url="https://example.com/hook", secret="s3cret"),
            ),
        ],
        "GetJob": [ft.GetJobRequest(job_id=job)],
        "ListJobs": [
            ft.ListJobsRequest(page_size=5),
            ft.ListJobsRequest(states=[ft.JOB_STATE_QUEUED], base_model=TINY),
        ],
        "CancelJob": [ft.CancelJobRequest(job_id=cancelled)],
        "WatchJob": [ft.WatchJobRequest(job_id=cancelled, follow=False), ft.WatchJobRequest(job_id=job, follow=False)],
        "ListCheckpoints": [ft.ListCheckpointsRequest(job_id=job)],
        "CreateSweep": [
            ft.CreateSweepRequest(spec=sweep),
            ft.CreateSweepRequest(spec=sweep, webhook=ft.Webhook(url="https://example.com/sweep")),
        ],
        "GetSweep": [ft.GetSweepRequest(sweep_id=s.sweep_ids[0])],
        "ListSweeps": [ft.ListSweepsRequest(page_size=5)],
        "CancelSweep": [ft.CancelSweepRequest(sweep_id=s.sweep_ids[0])],
    }


WEIGHTS = {"CreateJob": 1.5, "CreateSweep": 1.5, "WatchJob": 0.7}


@pytest.mark.parametrize("method", methods(SERVICE))
def test_fuzz(fuzz: FuzzSession, method: str) -> None:
    fuzz_rpc(fuzz, f"{SERVICE}.{method}", bases(fuzz)[method], WEIGHTS.get(method, 1.0))


def test_still_serving_after_finetune_fuzz(fuzz: FuzzSession) -> None:
    assert_still_serving(fuzz)

"""Every TaskService RPC with generated requests (properties: tests/fuzz/harness.py)."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from genloom.v1 import inference_pb2
from genloom.v1 import tasks_pb2 as t

from .harness import FuzzSession, assert_still_serving, fuzz_rpc, methods

SERVICE = "TaskService"
SHORT = inference_pb2.SamplingParams(max_new_tokens=4)
DOC = "Cats sleep most of the day. They wake at night to hunt. " * 3
LABELS = [t.ClassLabel(name="positive", description="good"), t.ClassLabel(name="negative")]


def _summarize(cls: type, many: bool) -> list[Message]:
    docs = {"documents": [DOC, "Short."]} if many else {"document": DOC}
    return [
        cls(sampling=SHORT, **docs),
        cls(
            strategy=t.PROMPT_STRATEGY_ONE_SHOT,
            examples=[t.SummarizeExample(document="A dog ran.", summary="Dog ran.")],
            target_length=t.SummaryLength(unit=t.SUMMARY_LENGTH_UNIT_WORDS, value=5),
            chunking=t.ChunkingOptions(chunk_tokens=64, max_chunks=3),
            sampling=SHORT,
            **docs,
        ),
    ]


def bases(s: FuzzSession) -> dict[str, list[Message]]:
    records = [
        t.EvalRecord(classify=t.ClassifyExample(text=text, labels=[label]))
        for text, label in [("great", "positive"), ("awful", "negative")]
    ]
    return {
        "Summarize": _summarize(t.SummarizeRequest, True),
        "SummarizeStream": _summarize(t.SummarizeStreamRequest, False),
        "Answer": [
            t.AnswerRequest(items=[t.AnswerItem(question="What do cats do?", context=DOC)], sampling=SHORT),
            t.AnswerRequest(
                items=[t.AnswerItem(question="Who?", context=DOC)],
                strategy=t.PROMPT_STRATEGY_FEW_SHOT,
                examples=[t.AnswerExample(question="Q?", context="C.", answer="A")] * 2,
                allow_unanswerable=True,
                chunking=t.ChunkingOptions(chunk_tokens=48),
                sampling=SHORT,
            ),
        ],
        "Classify": [
            t.ClassifyRequest(texts=["great film"], labels=LABELS),
            t.ClassifyRequest(texts=["bad"], labels=LABELS, method=t.CLASSIFY_METHOD_GENERATE, sampling=SHORT),
            t.ClassifyRequest(texts=["ok"], labels=LABELS, multi_label=True, calibrate=True, threshold=0.5),
        ],
        "Evaluate": [
            t.EvaluateRequest(
                task=t.TASK_TYPE_CLASSIFY,
                dataset=t.EvalDataset(inline=t.EvalRecords(records=records)),
                configurations=[t.EvalConfiguration()],
                return_predictions=True,
            ),
            t.EvaluateRequest(
                task=t.TASK_TYPE_CLASSIFY, dataset=t.EvalDataset(path="classify.jsonl"), sampling=SHORT, limit=2
            ),
        ],
    }


WEIGHTS = {"Evaluate": 0.7, "SummarizeStream": 0.7}


@pytest.mark.parametrize("method", methods(SERVICE))
def test_fuzz(fuzz: FuzzSession, method: str) -> None:
    fuzz_rpc(fuzz, f"{SERVICE}.{method}", bases(fuzz)[method], WEIGHTS.get(method, 1.0))


def test_still_serving_after_task_fuzz(fuzz: FuzzSession) -> None:
    assert_still_serving(fuzz)

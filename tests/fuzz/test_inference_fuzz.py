"""Every InferenceService RPC with generated requests (properties: tests/fuzz/harness.py)."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from genloom.v1 import common_pb2, tokenizer_pb2
from genloom.v1 import inference_pb2 as inf

from .harness import LORA, TINY, FuzzSession, assert_still_serving, fuzz_rpc, methods

SERVICE = "InferenceService"
SHORT = inf.SamplingParams(max_new_tokens=4)


def _prompts() -> list[inf.Prompt]:
    chat = common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Hi")])
    return [
        inf.Prompt(text="Once upon a time"),
        inf.Prompt(conversation=chat),
        inf.Prompt(token_ids=tokenizer_pb2.TokenIds(ids=[1, 17, 300, 42])),
    ]


def _generate(cls: type) -> list[Message]:
    prompts = _prompts()
    return [
        cls(prompt=prompts[0], sampling=SHORT),
        cls(
            request_id="fuzz-req",
            model=common_pb2.ModelRef(model=TINY),
            prompt=prompts[1],
            sampling=inf.SamplingParams(max_new_tokens=4, temperature=0.7, top_k=5, top_p=0.9, seed=1, logprobs=2),
            truncation=common_pb2.TRUNCATION_SIDE_LEFT,
        ),
        cls(model=common_pb2.ModelRef(adapter=LORA), prompt=prompts[2], sampling=SHORT),
    ]


def bases(s: FuzzSession) -> dict[str, list[Message]]:
    return {
        "Generate": _generate(inf.GenerateRequest),
        "GenerateStream": _generate(inf.GenerateStreamRequest),
        "Score": [
            inf.ScoreRequest(
                items=[inf.ScoreItem(prompt=p, candidates=[" good", " bad"]) for p in _prompts()],
                return_token_logprobs=True,
            )
        ],
        "Abort": [inf.AbortRequest(request_id="fuzz-req")],
        "ListModels": [inf.ListModelsRequest()],
        "GetModelInfo": [inf.GetModelInfoRequest(model=TINY), inf.GetModelInfoRequest(model=s.fine_tuned_name)],
        "LoadAdapter": [
            inf.LoadAdapterRequest(name="fuzz-lora-2", path=str(s.adapters_root / LORA), replace=True),
            inf.LoadAdapterRequest(name="fuzz-lora-3", path=LORA, base_model=TINY),
        ],
        "UnloadAdapter": [inf.UnloadAdapterRequest(name="fuzz-lora-2")],
        "ListAdapters": [inf.ListAdaptersRequest(), inf.ListAdaptersRequest(base_model=TINY)],
    }


WEIGHTS = {"Generate": 2.0, "GenerateStream": 1.5, "Score": 1.5, "ListModels": 0.3, "ListAdapters": 0.5}


@pytest.mark.parametrize("method", methods(SERVICE))
def test_fuzz(fuzz: FuzzSession, method: str) -> None:
    fuzz_rpc(fuzz, f"{SERVICE}.{method}", bases(fuzz)[method], WEIGHTS.get(method, 1.0))


def test_still_serving_after_inference_fuzz(fuzz: FuzzSession) -> None:
    assert_still_serving(fuzz)

"""Every TokenizerService RPC with generated requests (properties: tests/fuzz/harness.py)."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from genloom.services.server.settings import ModelSettings
from genloom.v1 import common_pb2
from genloom.v1 import tokenizer_pb2 as tok

from .harness import TINY, FuzzSession, assert_still_serving, fuzz_rpc, methods

SERVICE = "TokenizerService"
CHAT = common_pb2.Conversation(
    messages=[
        common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Hello there"),
    ]
)


def bases(s: FuzzSession) -> dict[str, list[Message]]:
    text = tok.TokenizerInput(text="Hello, world")
    chat = tok.TokenizerInput(conversation=CHAT)
    return {
        "Tokenize": [
            tok.TokenizeRequest(model=TINY, inputs=[text], return_offsets=True, return_tokens=True),
            tok.TokenizeRequest(inputs=[chat, text]),
        ],
        "Detokenize": [tok.DetokenizeRequest(model=TINY, sequences=[tok.TokenIds(ids=[1, 2, 3, 100])])],
        "CountTokens": [tok.CountTokensRequest(inputs=[text, chat], reserve_tokens=16)],
        "ApplyChatTemplate": [tok.ApplyChatTemplateRequest(conversation=CHAT, return_ids=True)],
        "GetTokenizerInfo": [
            tok.GetTokenizerInfoRequest(model=TINY),
            tok.GetTokenizerInfoRequest(model=str(s.tiny_dir)),
        ],
        "ListTokenizers": [tok.ListTokenizersRequest()],
    }


WEIGHTS = {"ListTokenizers": 0.3}


@pytest.mark.parametrize("method", methods(SERVICE))
def test_fuzz(fuzz: FuzzSession, method: str) -> None:
    fuzz_rpc(fuzz, f"{SERVICE}.{method}", bases(fuzz)[method], WEIGHTS.get(method, 1.0))


def test_model_caches_stay_bounded(fuzz: FuzzSession) -> None:
    """Issue 12 #3: each spelling of a model directory was loaded and cached for good. Two dozen spellings of one
    directory add at most one entry (names are canonical before caching), and the cache stays within the configured
    models plus GENLOOM_MAX_CACHED_MODELS."""
    stub = fuzz.target.stubs[SERVICE]
    before = stub.ListTokenizers(tok.ListTokenizersRequest(), timeout=30).tokenizers
    root, name = fuzz.models_root, fuzz.tiny_dir.name
    spellings = [f"{root}/{'./' * i}{name}" for i in range(12)]
    spellings += [f"{root}/links/{'../links/' * i}../{name}" for i in range(12)]
    for spelling in spellings:
        fuzz.target.check(f"{SERVICE}.GetTokenizerInfo", tok.GetTokenizerInfoRequest(model=spelling))
    after = stub.ListTokenizers(tok.ListTokenizersRequest(), timeout=30).tokenizers
    shown = [t.model[-60:] for t in after]
    assert len(after) <= len(before) + 1, f"{len(before)} tokenizers before, {len(after)} after: {shown}"
    assert len(after) <= 2 + ModelSettings().max_cached_models, shown  # the configured two, then the LRU


def test_still_serving_after_tokenizer_fuzz(fuzz: FuzzSession) -> None:
    assert_still_serving(fuzz)

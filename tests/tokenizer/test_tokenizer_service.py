"""The tokenizer service end to end: real server, real channel, real tokenizers, checked against transformers."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

import genloom
from genloom.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

from ..conftest import DEFAULT_MODEL, ServerThread

TEXTS = [
    "Hello, world!",
    "Multi-byte: héllo wörld, 世界, emoji 🚀.",
    "",
    "  leading and trailing spaces  ",
    "A longer sentence that goes on for a while, so that it needs more than a handful of tokens to encode.",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.fixture(scope="module")
def reference(default_model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.fixture()
def client(tokenizer_server: ServerThread):  # type: ignore[no-untyped-def]
    with genloom.Client(target=tokenizer_server.target, timeout=30) as c:
        yield c


@pytest.fixture()
def stub(tokenizer_server: ServerThread):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(tokenizer_server.target) as channel:
        yield tokenizer_pb2_grpc.TokenizerServiceStub(channel)


def test_tokenize_matches_transformers(client: genloom.Client, reference) -> None:  # type: ignore[no-untyped-def]
    result = client.tokenizer.tokenize(TEXTS)
    assert result.model == DEFAULT_MODEL
    assert [r.ids for r in result.results] == [reference(t)["input_ids"] for t in TEXTS]
    assert [r.count for r in result.results] == [len(reference(t)["input_ids"]) for t in TEXTS]


def test_tokenize_offsets_and_tokens(client: genloom.Client, reference) -> None:  # type: ignore[no-untyped-def]
    text = TEXTS[1]
    (result,) = client.tokenizer.tokenize(text, return_offsets=True, return_tokens=True).results
    expected = reference(text, return_offsets_mapping=True)
    assert result.offsets == [tuple(o) for o in expected["offset_mapping"]]
    assert result.tokens == reference.convert_ids_to_tokens(expected["input_ids"])
    # Offsets are code-point indices into the original string (byte-level pieces of one character share it).
    assert text[result.offsets[-2][0] : result.offsets[-2][1]] == "🚀"
    assert all(0 <= s <= e <= len(text) for s, e in result.offsets)


def test_tokenize_conversation_uses_chat_template(client: genloom.Client, reference) -> None:  # type: ignore[no-untyped-def]
    result = client.tokenizer.tokenize([CHAT, "plain"])
    expected_text = reference.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert result.results[0].ids == reference(expected_text, add_special_tokens=False)["input_ids"]
    assert result.results[1].ids == reference("plain")["input_ids"]
    without_prompt = client.tokenizer.tokenize([CHAT], add_generation_prompt=False).results[0]
    assert without_prompt.count < result.results[0].count


def test_detokenize_round_trips(client: genloom.Client, reference) -> None:  # type: ignore[no-untyped-def]
    ids = [reference(t)["input_ids"] for t in TEXTS]
    result = client.tokenizer.detokenize(ids)
    assert result.texts == TEXTS
    chat_ids = client.tokenizer.tokenize([CHAT]).results[0].ids
    with_specials = client.tokenizer.detokenize(chat_ids).texts[0]
    without = client.tokenizer.detokenize(chat_ids, skip_special_tokens=True).texts[0]
    assert "<|im_start|>" in with_specials and "<|im_start|>" not in without
    assert "What is 2+2?" in without


def test_count_tokens_and_context_fit(client: genloom.Client, reference) -> None:  # type: ignore[no-untyped-def]
    long_text = "word " * 600  # ~600 tokens: fits 8192 but not the small model's 512
    result = client.tokenizer.count_tokens([TEXTS[0], long_text])
    assert result.counts == [len(reference(t)["input_ids"]) for t in (TEXTS[0], long_text)]
    assert result.total == sum(result.counts)
    assert result.context_window == 8192
    assert result.fits_context == [True, True]
    small = client.tokenizer.count_tokens([TEXTS[0], long_text], model="small")
    assert small.context_window == 512
    assert small.fits_context == [True, False]
    reserved = client.tokenizer.count_tokens([TEXTS[0]], model="small", reserve_tokens=510)
    assert reserved.fits_context == [False]


def test_apply_chat_template(client: genloom.Client, reference) -> None:  # type: ignore[no-untyped-def]
    result = client.tokenizer.apply_chat_template(CHAT, return_ids=True)
    expected = reference.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert result.text == expected
    assert result.ids == reference(expected, add_special_tokens=False)["input_ids"]
    assert result.count == len(result.ids)
    bare = client.tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)
    assert bare.text == reference.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    assert bare.ids == []


def test_tokenizer_info_and_list(client: genloom.Client, reference) -> None:  # type: ignore[no-untyped-def]
    info = client.tokenizer.info()
    assert info.model == DEFAULT_MODEL
    assert info.vocab_size == len(reference)
    assert info.context_window == 8192
    kinds = {s.kind: (s.token, s.id) for s in info.special_tokens}
    assert kinds["eos"] == ("<|im_end|>", reference.eos_token_id)
    assert kinds["bos"] == ("<|im_start|>", reference.bos_token_id)
    assert info.has_chat_template and "<|im_start|>" in info.chat_template
    small = client.tokenizer.info(model="small")
    assert (small.context_window, small.has_chat_template) == (512, False)
    listed = client.tokenizer.list()
    assert [(t.model, t.is_default) for t in listed][:2] == [(DEFAULT_MODEL, True), ("small", False)]


def test_model_paths_are_off_by_default(client: genloom.Client, small_model_dir: Path) -> None:
    # Even a configured model's directory: by default clients name models, never server paths (tests with paths
    # allowed are in test_model_paths.py).
    with pytest.raises(genloom.NotFoundError, match="GENLOOM_ALLOW_MODEL_PATHS is off"):
        client.tokenizer.count_tokens("hello", model=str(small_model_dir))
    assert [t.model for t in client.tokenizer.list()][:2] == [DEFAULT_MODEL, "small"]


async def test_async_client(tokenizer_server: ServerThread, reference) -> None:  # type: ignore[no-untyped-def]
    async with genloom.AsyncClient(target=tokenizer_server.target) as client:
        result = await client.tokenizer.tokenize(TEXTS)
        assert [r.ids for r in result.results] == [reference(t)["input_ids"] for t in TEXTS]
        counted = await client.tokenizer.count_tokens(TEXTS)
        assert counted.counts == [r.count for r in result.results]
        info = await client.tokenizer.info()
        assert info.vocab_size == len(reference)
        with pytest.raises(genloom.NotFoundError):
            await client.tokenizer.info(model="missing")


# -- bad input ---------------------------------------------------------------------------------------------------


def _code(err: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return err.value.code()


def test_unknown_model_is_not_found(client: genloom.Client) -> None:
    for call in (
        lambda: client.tokenizer.tokenize("x", model="no-such-model"),
        lambda: client.tokenizer.detokenize([1], model="no-such-model"),
        lambda: client.tokenizer.count_tokens("x", model="no-such-model"),
        lambda: client.tokenizer.apply_chat_template(CHAT, model="no-such-model"),
        lambda: client.tokenizer.info(model="no-such-model"),
        lambda: client.tokenizer.info(model="/no/such/dir"),
    ):
        with pytest.raises(genloom.NotFoundError) as err:
            call()
        assert "no-such-model" in err.value.message or "/no/such/dir" in err.value.message


def test_empty_batch_is_invalid(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    for call, request in (
        (stub.Tokenize, tokenizer_pb2.TokenizeRequest()),
        (stub.CountTokens, tokenizer_pb2.CountTokensRequest()),
        (stub.Detokenize, tokenizer_pb2.DetokenizeRequest()),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
        assert "at least one" in err.value.details()


def test_oversized_batch_is_invalid_with_field_violation(client: genloom.Client) -> None:
    with pytest.raises(genloom.InvalidArgumentError) as err:
        client.tokenizer.tokenize(["x"] * 65)  # the test server's limit is 64
    assert "65 items; the limit is 64" in err.value.message
    assert [v.field for v in err.value.field_violations] == ["inputs"]
    assert len(client.tokenizer.tokenize(["x"] * 64).results) == 64


def test_invalid_utf8_is_invalid_argument(tokenizer_server: ServerThread) -> None:
    # Hand-built TokenizeRequest bytes: inputs[0].text = b"\xff\xfe" (not UTF-8). Well-behaved protobuf
    # libraries refuse to build this, but raw clients can send it.
    text = b"\xff\xfe"
    item = b"\x0a" + bytes([len(text)]) + text  # TokenizerInput.text (field 1, length-delimited)
    request = b"\x12" + bytes([len(item)]) + item  # TokenizeRequest.inputs (field 2)
    with grpc.insecure_channel(tokenizer_server.target) as channel:
        call = channel.unary_unary(
            "/genloom.v1.TokenizerService/Tokenize",
            request_serializer=lambda b: b,
            response_deserializer=tokenizer_pb2.TokenizeResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            call(request)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in err.value.details()


def test_out_of_vocabulary_ids_are_invalid(client: genloom.Client) -> None:
    with pytest.raises(genloom.InvalidArgumentError) as err:
        client.tokenizer.detokenize([[1, 2], [3, 49152, 10**6]])
    assert [v.field for v in err.value.field_violations] == ["sequences[1].ids[1]", "sequences[1].ids[2]"]
    assert "49152" in err.value.message and "size 49152" in err.value.message


def test_bad_conversations_are_invalid(stub: tokenizer_pb2_grpc.TokenizerServiceStub, client: genloom.Client) -> None:
    no_role = common_pb2.Conversation(messages=[common_pb2.ChatMessage(content="hi")])
    request = tokenizer_pb2.TokenizeRequest(
        inputs=[
            tokenizer_pb2.TokenizerInput(text="ok"),
            tokenizer_pb2.TokenizerInput(conversation=no_role),
            tokenizer_pb2.TokenizerInput(),
            tokenizer_pb2.TokenizerInput(conversation=common_pb2.Conversation()),
        ]
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Tokenize(request)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    for field in ("inputs[1].conversation.messages[0].role", "inputs[2]", "inputs[3].conversation.messages"):
        assert field in details
    with pytest.raises(genloom.InvalidArgumentError) as no_template:
        client.tokenizer.tokenize([CHAT], model="small")
    assert "no chat template" in no_template.value.message
    with pytest.raises(ValueError, match="role"):
        client.tokenizer.tokenize([[{"role": "robot", "content": "x"}]])

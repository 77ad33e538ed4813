"""SDK behaviour against real servers: retries and backoff, the exception hierarchy, CLI commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

import genloom
from genloom._exceptions import error_from_status
from genloom.services.server import errors
from genloom.v1 import inference_pb2, inference_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

from ..conftest import DEFAULT_MODEL, ServerThread, start_server


class FlakyTokenizer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """CountTokens fails with `error` for the first `failures` calls, then answers."""

    name = "genloom.v1.TokenizerService"

    def __init__(self, error: errors.ServiceError, failures: int) -> None:
        self.error, self.failures, self.calls = error, failures, 0
        self.request_ids: list[str] = []

    def add_to_server(self, server: grpc.aio.Server) -> None:
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(self, server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def CountTokens(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.calls += 1
        self.request_ids.append(dict(context.invocation_metadata())["x-request-id"])
        if self.calls <= self.failures:
            raise self.error
        return tokenizer_pb2.CountTokensResponse(model="fake", counts=[7], total=7, context_window=10)


def _flaky(error: errors.ServiceError, failures: int) -> tuple[ServerThread, FlakyTokenizer]:
    service = FlakyTokenizer(error, failures)
    return start_server([service]), service


def test_retries_resource_exhausted_honouring_retry_info() -> None:
    server, service = _flaky(errors.ResourceExhausted("busy", retry_after=0.2), failures=2)
    try:
        with genloom.Client(target=server.target, max_retries=2) as client:
            start = time.monotonic()
            assert client.tokenizer.count_tokens("x").counts == [7]
            assert time.monotonic() - start >= 0.4  # waited the server's 0.2 s twice
        assert service.calls == 3
        assert len(set(service.request_ids)) == 1  # one request id across the retries
    finally:
        server.stop()


def test_gives_up_after_max_retries_with_typed_error() -> None:
    server, service = _flaky(errors.ResourceExhausted("queue full", retry_after=0.05), failures=10)
    try:
        with genloom.Client(target=server.target, max_retries=1) as client:
            with pytest.raises(genloom.ResourceExhaustedError) as err:
                client.tokenizer.count_tokens("x")
        assert service.calls == 2
        assert err.value.retry_after == pytest.approx(0.05)
        assert err.value.message == "queue full"
    finally:
        server.stop()


def test_retries_unavailable_with_backoff_but_never_invalid_argument() -> None:
    server, service = _flaky(errors.Unavailable("warming up"), failures=1)
    try:
        with genloom.Client(target=server.target, max_retries=2) as client:
            start = time.monotonic()
            assert client.tokenizer.count_tokens("x").total == 7
            # First backoff without RetryInfo: full jitter over 0.5 s (the schedule: tests/sdk/test_sdk_overload.py).
            assert time.monotonic() - start < 0.5 + 1.0
        assert service.calls == 2
    finally:
        server.stop()
    server, service = _flaky(errors.InvalidArgument.field("inputs", "bad"), failures=10)
    try:
        with genloom.Client(target=server.target, max_retries=5) as client:
            with pytest.raises(genloom.InvalidArgumentError) as err:
                client.tokenizer.count_tokens("x")
        assert service.calls == 1
        assert err.value.field_violations == [genloom.FieldViolation("inputs", "bad")]
    finally:
        server.stop()


async def test_async_client_retries_too() -> None:
    server, service = _flaky(errors.Unavailable("warming up"), failures=1)
    try:
        async with genloom.AsyncClient(target=server.target, max_retries=1) as client:
            assert (await client.tokenizer.count_tokens("x")).counts == [7]
        assert service.calls == 2
    finally:
        server.stop()


class FlakyStreams(inference_pb2_grpc.InferenceServiceServicer):
    """GenerateStream fails UNAVAILABLE before its first message for the first `failures` calls; with
    `fail_midway`, every call fails after its first message instead."""

    name = "genloom.v1.InferenceService"

    def __init__(self, failures: int = 0, fail_midway: bool = False) -> None:
        self.failures, self.fail_midway, self.calls = failures, fail_midway, 0
        self.request_ids: list[str] = []

    def add_to_server(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self, server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def GenerateStream(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.calls += 1
        self.request_ids.append(dict(context.invocation_metadata())["x-request-id"])
        if self.calls <= self.failures:
            raise errors.Unavailable("shutting down")
        for word in ("one", " two", " three"):
            yield inference_pb2.GenerateStreamResponse(request_id="r", delta=inference_pb2.GenerateDelta(text=word))
            if self.fail_midway:
                raise errors.Unavailable("replica lost")
        yield inference_pb2.GenerateStreamResponse(request_id="r", finish=inference_pb2.GenerateFinish())


def test_streams_start_again_only_before_their_first_message() -> None:
    service = FlakyStreams(failures=2)
    server = start_server([service])
    try:
        with genloom.Client(target=server.target, max_retries=2) as client:
            with client.inference.stream("x") as stream:
                assert "".join(delta.text for delta in stream) == "one two three"
        assert service.calls == 3 and len(set(service.request_ids)) == 1
        service.calls, service.failures = 0, 5
        with genloom.Client(target=server.target, max_retries=1) as client:
            with pytest.raises(genloom.UnavailableError):
                list(client.inference.stream("x"))
        assert service.calls == 2
        # Once a message has arrived, a failure is the caller's: repeating the stream would repeat its text.
        service.calls, service.failures, service.fail_midway = 0, 0, True
        with genloom.Client(target=server.target, max_retries=3) as client:
            stream = client.inference.stream("x")
            with pytest.raises(genloom.UnavailableError):
                for _ in stream:
                    pass
            assert stream.text == "one"
        assert service.calls == 1
    finally:
        server.stop()


async def test_async_streams_start_again_before_their_first_message() -> None:
    service = FlakyStreams(failures=1)
    server = start_server([service])
    try:
        async with genloom.AsyncClient(target=server.target, max_retries=1) as client:
            stream = client.inference.stream("x")
            assert [delta.text async for delta in stream] == ["one", " two", " three"]
        assert service.calls == 2
    finally:
        server.stop()


def test_unreachable_server_is_unavailable_error() -> None:
    with genloom.Client(target="127.0.0.1:1", max_retries=0, timeout=5) as client:
        with pytest.raises(genloom.UnavailableError):
            client.tokenizer.count_tokens("x")


def test_channel_options_replace_defaults_and_keepalive_is_on() -> None:
    """gRPC honours the first of two same-named options, so the caller's must replace the SDK's, not follow them."""
    with genloom.Client(target="127.0.0.1:1") as client:
        defaults = dict(client._transport.options.channel_options)
    assert defaults["grpc.keepalive_time_ms"] == 30_000 and defaults["grpc.http2.max_pings_without_data"] == 0
    assert defaults["grpc.lb_policy_name"] == "round_robin"
    custom = [("grpc.keepalive_time_ms", 5_000), ("grpc.lb_policy_name", "pick_first")]
    with genloom.Client(target="127.0.0.1:1", channel_options=custom) as client:
        options = client._transport.options.channel_options
    names = [name for name, _ in options]
    assert len(names) == len(set(names))
    assert dict(options)["grpc.keepalive_time_ms"] == 5_000 and dict(options)["grpc.lb_policy_name"] == "pick_first"


def test_deadline_is_deadline_exceeded(tokenizer_server: ServerThread) -> None:
    documents = ["many words in a long document " * 4000] * 64  # ~1.5M tokens: far more than 50 ms of work
    with genloom.Client(target=tokenizer_server.target, timeout=0.05) as client:
        with pytest.raises(genloom.DeadlineExceededError):
            client.tokenizer.count_tokens(documents)


def test_every_status_code_maps_to_its_own_class() -> None:
    classes = {}
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        err = error_from_status(code, "m")
        assert isinstance(err, genloom.APIStatusError) and isinstance(err, genloom.GenLoomError)
        assert err.code is code
        classes[code] = type(err)
    assert len(set(classes.values())) == len(classes)


def test_client_reads_environment(monkeypatch: pytest.MonkeyPatch, tokenizer_server: ServerThread) -> None:
    monkeypatch.setenv("GENLOOM_TARGET", tokenizer_server.target)
    monkeypatch.setenv("GENLOOM_TIMEOUT", "12.5")
    with genloom.Client() as client:
        assert client.target == tokenizer_server.target
        assert client._options.timeout == 12.5
        assert client.tokenizer.count_tokens("hello").model == DEFAULT_MODEL


def _cli(target: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "genloom.cli", "--target", target, *args],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        env={**os.environ, "GENLOOM_API_KEY": ""},
    )


def test_cli_tokenize_and_count(tokenizer_server: ServerThread, tmp_path: Path) -> None:
    result = _cli(tokenizer_server.target, "tokenize", "Hello world", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["model"] == DEFAULT_MODEL and payload["results"][0]["count"] == 2
    document = tmp_path / "doc.txt"
    document.write_text(" ".join(["word"] * 700))
    result = _cli(tokenizer_server.target, "count-tokens", "hi", "--file", str(document), "--model", "small")
    assert result.returncode == 0, result.stderr
    assert "[1] 700 tokens  (does not fit)" in result.stdout
    assert "context window 512" in result.stdout
    result = _cli(tokenizer_server.target, "count-tokens", "--chat", stdin="What is 2+2?")
    assert result.returncode == 0 and "tokens" in result.stdout
    result = _cli(tokenizer_server.target, "tokenizer-info")
    assert "context window  8192" in result.stdout


def test_cli_reports_errors(tokenizer_server: ServerThread) -> None:
    result = _cli(tokenizer_server.target, "tokenize", "x", "--model", "missing")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr and "missing" in result.stderr

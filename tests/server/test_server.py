"""Server plumbing with real servers and channels: health, reflection, auth, error mapping, metrics, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import genloom
from genloom.services.models.registry import ModelRegistry
from genloom.services.server.placeholder import PlaceholderService
from genloom.services.server.process import ServerProcess
from genloom.services.server.settings import ModelSettings
from genloom.services.tokenizer.servicer import TokenizerServicer
from genloom.services.tokenizer.settings import TokenizerSettings
from genloom.services.tokenizer.store import TokenizerStore, load_tokenizer
from genloom.v1 import finetune_pb2, inference_pb2, tasks_pb2, tasks_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

from ..conftest import DEFAULT_MODEL, ServerThread, model_cache, start_server, tokenizer_service

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TOKENIZER_SERVICE = "genloom.v1.TokenizerService"


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


def test_health_not_serving_until_models_load_then_serving_then_not_serving_on_shutdown(
    default_model_dir: Path,
) -> None:
    release = threading.Event()

    def slow_loader(spec: Any, max_model_len: int) -> Any:
        release.wait(60)
        return load_tokenizer(spec, max_model_len)

    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    store = TokenizerStore(ModelRegistry(models), loader=slow_loader)
    server = start_server([TokenizerServicer(store, TokenizerSettings())])
    try:
        assert _health(server.target) == NOT_SERVING
        assert _health(server.target, TOKENIZER_SERVICE) == NOT_SERVING
        with genloom.Client(target=server.target, max_retries=0) as client:
            with pytest.raises(genloom.UnavailableError, match="still loading"):
                client.tokenizer.count_tokens("hi")
            statuses: list[int] = []
            with grpc.insecure_channel(server.target) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                watcher = threading.Thread(target=lambda: statuses.extend(int(r.status) for r in _until_error(watch)))
                watcher.start()
                release.set()
                server.wait_ready()
                assert _health(server.target) == SERVING
                assert _health(server.target, TOKENIZER_SERVICE) == SERVING
                assert client.tokenizer.count_tokens("hi").counts == [1]
                server.stop(grace=0.5)
                watcher.join(10)
        assert statuses[0] == NOT_SERVING
        assert statuses[-2:] == [SERVING, NOT_SERVING]
    finally:
        release.set()
        server.stop()


def _until_error(stream: Any) -> Iterator[Any]:
    try:
        yield from stream
    except grpc.RpcError:
        return


@pytest.fixture(scope="module")
def all_services_server(default_model_dir: Path) -> Iterator[ServerThread]:
    """The tokenizer service and the other three services' contracts (placeholders: no engine is started)."""
    placeholders = [
        PlaceholderService(module.DESCRIPTOR.services_by_name[name])
        for module, name in (
            (inference_pb2, "InferenceService"),
            (tasks_pb2, "TaskService"),
            (finetune_pb2, "FineTuningService"),
        )
    ]
    server = start_server([tokenizer_service(default_model_dir), *placeholders], api_keys="key-one,key-two")
    server.wait_ready()
    yield server
    server.stop()


def test_reflection_lists_every_service(all_services_server: ServerThread) -> None:
    with grpc.insecure_channel(all_services_server.target) as channel:  # reflection needs no API key
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert services >= {
        "genloom.v1.TokenizerService",
        "genloom.v1.InferenceService",
        "genloom.v1.TaskService",
        "genloom.v1.FineTuningService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_health_needs_no_api_key(all_services_server: ServerThread) -> None:
    assert _health(all_services_server.target) == SERVING


def _every_rpc(channel: grpc.Channel, module: Any, service_name: str) -> Iterator[tuple[str, Any]]:
    """(name, zero-argument call) for every RPC of a service, each sending a default request."""
    service = module.DESCRIPTOR.services_by_name[service_name]
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        path = f"/{service.full_name}/{method.name}"
        factory = channel.unary_stream if method.server_streaming else channel.unary_unary
        call = factory(
            path, request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString
        )
        if method.server_streaming:
            yield method.name, lambda call=call, cls=request_cls, **kw: list(call(cls(), timeout=10, **kw))
        else:
            yield method.name, lambda call=call, cls=request_cls, **kw: call(cls(), timeout=10, **kw)


@pytest.mark.parametrize(
    "module,service_name",
    [
        (tokenizer_pb2, "TokenizerService"),
        (inference_pb2, "InferenceService"),
        (tasks_pb2, "TaskService"),
        (finetune_pb2, "FineTuningService"),
    ],
)
def test_auth_rejects_missing_and_wrong_keys_on_every_rpc(
    all_services_server: ServerThread, module: Any, service_name: str
) -> None:
    with grpc.insecure_channel(all_services_server.target) as channel:
        for name, call in _every_rpc(channel, module, service_name):
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "key-one"),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
            # The right key gets through authentication (a default request may still be invalid).
            for key in ("key-one", "key-two"):
                try:
                    call(metadata=(("authorization", f"Bearer {key}"),))
                except grpc.RpcError as err:
                    assert err.code() != grpc.StatusCode.UNAUTHENTICATED, name


def test_sdk_sends_api_key(all_services_server: ServerThread) -> None:
    with genloom.Client(target=all_services_server.target, api_key="key-two") as client:
        assert client.tokenizer.count_tokens("hello world").counts == [2]
    with genloom.Client(target=all_services_server.target, api_key="nope") as client:
        with pytest.raises(genloom.UnauthenticatedError, match="invalid API key"):
            client.tokenizer.count_tokens("hello world")


def test_api_keys_file(default_model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nfile-key\n\n")
    placeholder = PlaceholderService(tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"])
    server = start_server([placeholder], api_keys_file=keys)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.ListTokenizers(tokenizer_pb2.ListTokenizersRequest(), metadata=(("authorization", "Bearer x"),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:  # authenticated; then the placeholder answers
                stub.ListTokenizers(
                    tokenizer_pb2.ListTokenizersRequest(), metadata=(("authorization", "Bearer file-key"),)
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop()


def test_services_not_shipped_yet_answer_unimplemented(all_services_server: ServerThread) -> None:
    with grpc.insecure_channel(all_services_server.target) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        auth = (("authorization", "Bearer key-one"),)
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(tasks_pb2.ClassifyRequest(), metadata=auth, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "TaskService.Classify is not implemented" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.SummarizeStream(tasks_pb2.SummarizeStreamRequest(), metadata=auth, timeout=5))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


class _BrokenService:
    """A service whose handler has a bug: proves INTERNAL hides internals and the log keeps them."""

    name = "genloom.test.Broken"

    def add_to_server(self, server: grpc.aio.Server) -> None:
        async def explode(request: bytes, context: Any) -> bytes:
            raise RuntimeError("secret database password in a stack trace")

        handler = grpc.unary_unary_rpc_method_handler(explode)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.name, {"Explode": handler}),))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class _PeerService:
    """Answers with the caller's address (a new one per connection), or streams slowly."""

    name = "genloom.test.Peer"

    def add_to_server(self, server: grpc.aio.Server) -> None:
        async def peer(request: bytes, context: Any) -> bytes:
            return str(context.peer()).encode()

        async def slow(request: bytes, context: Any) -> Any:
            for i in range(10):
                await asyncio.sleep(0.3)
                yield str(i).encode()

        handlers = {
            "Peer": grpc.unary_unary_rpc_method_handler(peer),
            "Slow": grpc.unary_stream_rpc_method_handler(slow),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.name, handlers),))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class _FailingAtStartService:
    """Reports itself not serving as its start ends, as an engine that dies right after loading makes the
    inference service do."""

    name = "genloom.test.FailsAtStart"

    def __init__(self) -> None:
        self.report: Any = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        return None

    def bind_health(self, report: Any) -> None:
        self.report = report

    async def start(self) -> None:
        await self.report(False)

    async def close(self) -> None:
        return None


def test_a_service_that_fails_during_start_is_not_reported_serving() -> None:
    """Start-up must not overwrite a failure a service reported meanwhile; its recovery makes everything SERVING."""
    service = _FailingAtStartService()
    server = start_server([service, _PeerService()])
    try:
        server.wait_ready()
        assert _health(server.target, service.name) == NOT_SERVING
        assert _health(server.target) == NOT_SERVING
        assert _health(server.target, _PeerService.name) == SERVING
        server.call(service.report(True))
        assert _health(server.target, service.name) == SERVING
        assert _health(server.target) == SERVING
    finally:
        server.stop()


def test_max_connection_age_makes_clients_reconnect_without_failing_calls() -> None:
    """With GENLOOM_MAX_CONNECTION_AGE a client's connection is replaced every so often (so it re-resolves its
    target and finds new replicas); calls keep succeeding and a stream longer than the age runs to its end."""
    server = start_server([_PeerService()], max_connection_age=0.5, shutdown_grace=10.0)
    try:
        with grpc.insecure_channel(server.target) as channel:
            peer = channel.unary_unary("/genloom.test.Peer/Peer")
            slow = channel.unary_stream("/genloom.test.Peer/Slow")
            assert [m.decode() for m in slow(b"", timeout=30)] == [str(i) for i in range(10)]  # 3 s > 0.5 s
            peers = set()
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                peers.add(peer(b"", timeout=10))
                time.sleep(0.05)
        assert len(peers) >= 3, peers
    finally:
        server.stop()


def test_unexpected_errors_are_internal_without_details(caplog: pytest.LogCaptureFixture) -> None:
    server = start_server([_BrokenService()])
    try:
        with grpc.insecure_channel(server.target) as channel:
            call = channel.unary_unary("/genloom.test.Broken/Explode")
            with caplog.at_level(logging.ERROR), pytest.raises(grpc.RpcError) as err:
                call(b"", metadata=(("x-request-id", "req-123"),), timeout=5)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in err.value.details()
        assert "req-123" in err.value.details()
        assert "secret database password" in caplog.text  # the traceback went to the log
    finally:
        server.stop()


def test_request_id_is_echoed_and_metrics_are_exported(tokenizer_server: ServerThread, default_model_dir: Path) -> None:
    server = start_server([tokenizer_service(default_model_dir)], metrics_port=0)
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.target) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            request = tokenizer_pb2.CountTokensRequest(inputs=[tokenizer_pb2.TokenizerInput(text="hi")])
            _, call = stub.CountTokens.with_call(request, metadata=(("x-request-id", "trace-42"),))
            assert ("x-request-id", "trace-42") in tuple(call.initial_metadata())
            with pytest.raises(grpc.RpcError):
                stub.CountTokens(tokenizer_pb2.CountTokensRequest())
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read()
        text = body.decode()
        assert re.search(
            r'genloom_rpc_requests_total\{code="OK",method="CountTokens",service="genloom.v1.Tokeni'
            r'zerService"\} [1-9]',
            text,
        )
        assert 'code="INVALID_ARGUMENT",method="CountTokens"' in text
        assert "genloom_rpc_duration_seconds_bucket" in text
    finally:
        server.stop()


def test_sdk_errors_carry_request_id(tokenizer_server: ServerThread) -> None:
    with genloom.Client(target=tokenizer_server.target) as client, pytest.raises(genloom.NotFoundError) as err:
        client.tokenizer.info(model="missing")
    assert err.value.request_id and len(err.value.request_id) == 32
    assert err.value.request_id in str(err.value)


# -- the process: CLI flags, SIGTERM ------------------------------------------------------------------------------


def _in_flight(metrics_port: int, method: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    m = re.search(rf'genloom_rpc_in_flight\{{method="{method}",service="[^"]+"\}} ([\d.]+)', text)
    return float(m.group(1)) if m else 0.0


def test_sigterm_drains_in_flight_calls_and_refuses_new_ones() -> None:
    server = ServerProcess(
        "tokenizer",
        ["--tokenizer-max-batch", "100000", "--shutdown-grace", "60", "--metrics-port", "0"],
        env={"GENLOOM_MODEL_CACHE": str(model_cache())},
    )
    with server:
        assert server.metrics_port is not None
        docs = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40 for i in range(6000)]
        with genloom.Client(target=server.target, max_retries=0, timeout=120) as client, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.tokenizer.count_tokens, docs)
            while _in_flight(server.metrics_port, "CountTokens") < 1:  # the big call is being handled
                assert not pending.done(), pending.exception()
                time.sleep(0.02)
            server.terminate()
            result = pending.result(timeout=120)
            assert len(result.counts) == len(docs) and min(result.counts) > 400
        assert server.stop() == 0
        assert any("shutting down" in line for line in server.log)
        with genloom.Client(target=server.target, max_retries=0, timeout=5) as client:
            with pytest.raises(genloom.UnavailableError):
                client.tokenizer.count_tokens("too late")


def test_cli_rejects_bad_settings_naming_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "genloom.cli", "serve", "tokenizer", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "GENLOOM_PORT" in result.stderr and "70000" in result.stderr
    env = {**os.environ, "GENLOOM_TOKENIZER_MAX_BATCH": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "genloom.cli", "serve", "tokenizer"], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2
    assert "GENLOOM_TOKENIZER_MAX_BATCH" in result.stderr

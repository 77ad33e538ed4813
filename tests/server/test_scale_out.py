"""Replicas behind one client target, as a deployment runs them: two real `genloom serve all` processes (task,
inference and tokenizer services, hf engine, the default model) on loopback, one SDK client with the target
`ipv4:127.0.0.1:P1,127.0.0.1:P2` (round-robin). The services keep no state between calls, so either replica
answers any call; these tests prove it by killing one mid-run.
"""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

import genloom
from genloom.services.server.process import ServerProcess

from ..conftest import model_cache

LABELS = ["positive", "negative"]
TEXTS = ["I loved every minute of it.", "A dull, tedious mess.", "Great acting and a clever plot."]


def _replica() -> ServerProcess:
    return ServerProcess(
        "all",
        ["--engine", "hf", "--metrics-port", "0", "--shutdown-grace", "2"],
        env={
            "GENLOOM_MODEL_CACHE": str(model_cache()),
            # The finetune service in `serve all` keeps its (empty) job store here, away from other tests' data.
            "GENLOOM_REDIS_URL": "redis://127.0.0.1:6379/14",
            # Two replicas share two cores: one thread each keeps them from starving each other.
            "OMP_NUM_THREADS": "1",
        },
    )


@pytest.fixture()
def replicas() -> Iterator[list[ServerProcess]]:
    servers = [_replica(), _replica()]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: s.start(), servers))
    try:
        yield servers
    finally:
        for server in servers:
            server.stop(timeout=30)


def _target(servers: list[ServerProcess]) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)


def _served(server: ServerProcess, method: str, service: str = "genloom.v1.TaskService") -> int:
    """Calls of `method` this replica finished with OK (its Prometheus counter)."""
    assert server.metrics_port is not None
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    pattern = rf'genloom_rpc_requests_total\{{code="OK",method="{method}",service="{service}"\}} ([\d.e+]+)'
    m = re.search(pattern, text)
    return int(float(m.group(1))) if m else 0


def _wait_both_connected(client: genloom.Client, servers: list[ServerProcess]) -> None:
    """Round-robin spreads calls once the channel has a connection to each replica: call until both answered."""
    deadline = time.monotonic() + 60
    while min(_served(s, "CountTokens", "genloom.v1.TokenizerService") for s in servers) == 0:
        assert time.monotonic() < deadline, "the client never reached both replicas"
        client.tokenizer.count_tokens("warm up")


class _CallLoop:
    """Calls `call` again and again in a thread until stopped or until a call fails (the error is kept)."""

    def __init__(self, call: Callable[[], str]) -> None:
        self.results: list[str] = []
        self.errors: list[BaseException] = []
        self._call, self._stop = call, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.results.append(self._call())
            except BaseException as error:
                self.errors.append(error)
                return

    def wait_for(self, count: int, why: str) -> None:
        while len(self.results) < count:
            assert self._thread.is_alive(), f"{why}: {self.errors!r}"
            time.sleep(0.05)

    def kill_while_serving(self, server: ServerProcess, methods: Sequence[str]) -> None:
        """SIGKILL `server` while it is handling one of `methods`, so a call under way has to go elsewhere."""
        while sum(_in_flight(server, method) for method in methods) == 0:
            assert self._thread.is_alive(), self.errors
            time.sleep(0.005)
        assert server.process is not None
        server.process.kill()
        server.process.wait(30)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        assert not self.errors, self.errors


def test_replicas_share_calls_and_idempotent_calls_survive_a_killed_replica(replicas: list[ServerProcess]) -> None:
    first, second = replicas
    with genloom.Client(target=_target(replicas), max_retries=3, timeout=60) as client:
        _wait_both_connected(client, replicas)
        for _ in range(8):
            result = client.tasks.classify(TEXTS, labels=LABELS)
            assert [r.label for r in result.results][:2] == ["positive", "negative"]
        shares = [_served(s, "Classify") for s in replicas]
        assert sum(shares) == 8 and min(shares) >= 3, f"round-robin should spread calls, got {shares}"

        # A client keeps calling while one replica dies without warning (SIGKILL: no graceful shutdown).
        def classify_and_generate() -> str:
            label = client.tasks.classify(TEXTS[0], labels=LABELS).results[0].label
            client.inference.generate("Say hi.", max_new_tokens=4, temperature=0)
            return label

        loop = _CallLoop(classify_and_generate)
        loop.wait_for(3, "a call failed before the kill")
        loop.kill_while_serving(first, ["Classify", "Generate"])
        second_before = _served(second, "Classify")
        loop.wait_for(len(loop.results) + 6, "a call failed after the kill")
        loop.stop()
        assert set(loop.results) == {"positive"}
        # Every call since the kill was answered by the survivor.
        assert _served(second, "Classify") - second_before >= 6


def test_task_service_spreads_over_inference_replicas_and_survives_losing_one() -> None:
    """The compose/Kubernetes topology: the task service in its own process reaches one tokenizer and two
    inference replicas through one round-robin target. Losing an inference replica mid-run costs no task call:
    the task service retries its upstream call on the other replica (the client here does not retry at all)."""
    env = {"GENLOOM_MODEL_CACHE": str(model_cache()), "OMP_NUM_THREADS": "1"}
    tokenizer = ServerProcess("tokenizer", env=env)
    inference = [ServerProcess("inference", ["--engine", "hf", "--metrics-port", "0"], env=env) for _ in range(2)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda s: s.start(), [tokenizer, *inference]))
    tasks = ServerProcess(
        "tasks",
        env={
            **env,
            "GENLOOM_TASKS_TOKENIZER_TARGET": tokenizer.target,
            "GENLOOM_TASKS_INFERENCE_TARGET": _target(inference),
        },
    )
    try:
        tasks.start()
        with genloom.Client(target=tasks.target, max_retries=0, timeout=120) as client:

            def classify() -> str:
                return client.tasks.classify(TEXTS[1], labels=LABELS).results[0].label

            deadline = time.monotonic() + 120
            while min(_served(s, "Score", "genloom.v1.InferenceService") for s in inference) < 2:
                assert time.monotonic() < deadline, "the task service never used both inference replicas"
                assert classify() == "negative"

            loop = _CallLoop(classify)
            loop.kill_while_serving(inference[0], ["Score"])
            loop.wait_for(len(loop.results) + 5, "a task call failed after an inference replica died")
            loop.stop()
            assert set(loop.results) == {"negative"}
    finally:
        for server in (tasks, tokenizer, *inference):
            server.stop(timeout=30)


@dataclass
class _StreamOutcome:
    deltas: int = 0
    finished: bool = False
    error: BaseException | None = None
    ended_at: float = 0.0
    first_delta: threading.Event = field(default_factory=threading.Event)


def _consume(client: genloom.Client, outcome: _StreamOutcome) -> None:
    try:
        with client.inference.stream(
            "Write a long story about a lighthouse.", max_new_tokens=160, ignore_eos=True, temperature=0
        ) as stream:
            for _ in stream:
                outcome.deltas += 1
                outcome.first_delta.set()
            outcome.finished = stream.finish is not None
    except BaseException as error:
        outcome.error = error
    finally:
        outcome.ended_at = time.monotonic()
        outcome.first_delta.set()


@pytest.mark.parametrize("how", ["sigkill", "sigterm", "sigstop"])
def test_streams_on_a_lost_replica_fail_with_unavailable_and_others_finish(
    replicas: list[ServerProcess], how: str
) -> None:
    """A stream is not retried (part of it was delivered): on a replica that dies it ends with UNAVAILABLE at
    once; one on a replica that shuts down gracefully gets the shutdown grace, then UNAVAILABLE; one on a replica
    that stops answering but keeps its connections open (frozen: what a lost node or a partition looks like)
    ends with UNAVAILABLE when the client's keepalive pings go unanswered (shortened here from the SDK's 30 s +
    20 s). Streams on the other replica are untouched. None may hang."""
    first = replicas[0]
    keepalive = [
        ("grpc.keepalive_time_ms", 5_000),
        ("grpc.keepalive_timeout_ms", 3_000),
        ("grpc.http2.ping_timeout_ms", 3_000),
    ]
    with genloom.Client(target=_target(replicas), max_retries=2, timeout=300, channel_options=keepalive) as client:
        _wait_both_connected(client, replicas)
        outcomes = [_StreamOutcome() for _ in range(4)]
        threads = [threading.Thread(target=_consume, args=(client, o), daemon=True) for o in outcomes]
        for thread in threads:
            thread.start()
        for outcome in outcomes:
            assert outcome.first_delta.wait(120)
        assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
        in_flight = [_in_flight(s, "GenerateStream") for s in replicas]
        assert in_flight == [2, 2], f"round-robin should put two streams on each replica, got {in_flight}"

        assert first.process is not None
        lost_at = time.monotonic()
        if how == "sigkill":
            first.process.kill()
        elif how == "sigterm":
            first.terminate()  # the shutdown grace is 2 s; these streams need longer
        else:
            first.process.send_signal(signal.SIGSTOP)
        try:
            for thread in threads:
                thread.join(180)
                assert not thread.is_alive(), "a stream hung after its replica went away"
        finally:
            if how == "sigstop":
                first.process.kill()

    failed = [o for o in outcomes if o.error is not None]
    finished = [o for o in outcomes if o.finished]
    assert len(failed) == 2 and len(finished) == 2, [(o.deltas, o.finished, o.error) for o in outcomes]
    for outcome in failed:
        assert isinstance(outcome.error, genloom.UnavailableError), repr(outcome.error)
        assert outcome.deltas >= 1
        # Ends as soon as the replica is gone (SIGKILL) or its grace ran out (SIGTERM), not at a deadline.
        assert outcome.ended_at - lost_at < 30
    for outcome in finished:
        assert outcome.deltas >= 50
    if how == "sigterm":
        assert first.process.wait(60) == 0


def _in_flight(server: ServerProcess, method: str) -> int:
    """Calls of `method` this replica is handling now."""
    assert server.metrics_port is not None
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    m = re.search(rf'genloom_rpc_in_flight\{{method="{method}",service="[^"]+"\}} ([\d.]+)', text)
    return int(float(m.group(1))) if m else 0

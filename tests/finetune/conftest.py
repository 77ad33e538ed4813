"""Fine-tuning fixtures: a real Redis database of its own, real `genloom worker` processes, a tiny random Llama.

The tiny model (the default model's tokenizer and vocabulary, 2 layers of width 64) trains in well under a second
per step on a CPU, so the lifecycle tests (cancel, kill -9 and resume, two workers, sweeps) stay quick; one test
trains the real default model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.finetune.store import TERMINAL
from genloom.services.server.settings import ModelSettings
from genloom.v1 import finetune_pb2, finetune_pb2_grpc

from ..conftest import DEFAULT_MODEL, ServerThread, model_cache, start_server, write_tiny_llama

REDIS_URL = os.environ.get("GENLOOM_TEST_FINETUNE_REDIS", "redis://127.0.0.1:6379/13")
TINY = "tiny-llama"
S = finetune_pb2


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama with the default model's tokenizer (and chat template)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    write_tiny_llama(path, default_model_dir)
    return path


@dataclass
class FineTuneEnv:
    redis_url: str
    artifact_root: Path
    data_root: Path
    queue: str
    models: str
    env: dict[str, str] = field(default_factory=dict)

    def model_settings(self) -> ModelSettings:
        return ModelSettings(
            model=DEFAULT_MODEL, models=self.models, model_cache=model_cache(), redis_url=self.redis_url
        )

    def settings(self, **overrides: Any) -> FinetuneSettings:
        values: dict[str, Any] = dict(
            artifact_root=self.artifact_root,
            training_data_root=self.data_root,
            queue=self.queue,
            min_examples=4,
            lease_seconds=3.0,
            reap_interval=0.5,
            webhook_backoff=0.05,
            webhook_attempts=3,
            webhook_allowed_hosts="127.0.0.1",  # the tests' webhook receivers listen on loopback
        )
        values.update(overrides)
        return FinetuneSettings(**values)


@pytest.fixture(scope="session")
def ft_env(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FineTuneEnv]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    root = tmp_path_factory.mktemp("ft")
    env = FineTuneEnv(
        redis_url=REDIS_URL,
        artifact_root=root / "artifacts",
        data_root=root / "data",
        queue=f"training-test-{uuid.uuid4().hex[:8]}",
        models=f"{TINY}={tiny_model_dir}",
    )
    env.data_root.mkdir()
    env.env = {
        **os.environ,
        "GENLOOM_REDIS_URL": env.redis_url,
        "GENLOOM_MODELS": env.models,
        "GENLOOM_MODEL_CACHE": str(model_cache()),
        "GENLOOM_FINETUNE_ARTIFACT_ROOT": str(env.artifact_root),
        "GENLOOM_FINETUNE_DATA_ROOT": str(env.data_root),
        "GENLOOM_FINETUNE_QUEUE": env.queue,
        "GENLOOM_FINETUNE_MIN_EXAMPLES": "4",
        "GENLOOM_FINETUNE_LEASE_SECONDS": "3",
        "GENLOOM_FINETUNE_WEBHOOK_ATTEMPTS": "3",
        "GENLOOM_FINETUNE_WEBHOOK_BACKOFF": "0.05",
        "GENLOOM_FINETUNE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    yield env
    client.flushdb()


class WorkerProcess:
    """A real `genloom worker` (python -m genloom.services.finetune.worker) in its own process group."""

    def __init__(self, env: FineTuneEnv, name: str, log_dir: Path) -> None:
        self.env, self.base, self.log_dir = env, name, log_dir
        self.launch()

    def launch(self) -> None:
        self.name = f"{self.base}-{uuid.uuid4().hex[:6]}@test"
        self.log = self.log_dir / f"{self.name}.log"
        env = self.env
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genloom.cli", "worker", "--hostname", self.name],
            env=env.env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if b"ready." in self.log.read_bytes():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def restart(self) -> WorkerProcess:
        """A fresh process in place of a killed one (under a new name)."""
        self.kill()
        self.launch()
        return self.wait_ready()

    def kill(self) -> None:
        """kill -9 the whole worker (its process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class Workers:
    def __init__(self, env: FineTuneEnv, log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.running: list[WorkerProcess] = []

    def start(self, name: str = "w") -> WorkerProcess:
        worker = WorkerProcess(self.env, f"{name}{len(self.running)}", self.log_dir)
        self.running.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.running:
            worker.stop()
        self.running.clear()


@pytest.fixture(scope="session")
def worker_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture(scope="session")
def shared_worker(ft_env: FineTuneEnv, worker_logs: Path) -> Iterator[WorkerProcess]:
    """One worker for the whole session (tests that need more start their own)."""
    workers = Workers(ft_env, worker_logs)
    worker = workers.start("shared").wait_ready()
    yield worker
    workers.stop_all()


@pytest.fixture
def workers(ft_env: FineTuneEnv, worker_logs: Path) -> Iterator[Workers]:
    pool = Workers(ft_env, worker_logs)
    yield pool
    pool.stop_all()


@dataclass
class FineTuneServer:
    server: ServerThread
    channel: grpc.Channel
    stub: finetune_pb2_grpc.FineTuningServiceStub
    env: FineTuneEnv

    def create(self, spec: finetune_pb2.JobSpec, **request: Any) -> finetune_pb2.Job:
        return self.stub.CreateJob(finetune_pb2.CreateJobRequest(spec=spec, **request), timeout=60).job

    def get(self, job_id: str) -> finetune_pb2.Job:
        return self.stub.GetJob(finetune_pb2.GetJobRequest(job_id=job_id), timeout=30).job

    def events(self, job_id: str, after: str = "", follow: bool = True, timeout: float = 600) -> list[Any]:
        request = finetune_pb2.WatchJobRequest(job_id=job_id, after_event_id=after, follow=follow)
        return [r.event for r in self.stub.WatchJob(request, timeout=timeout)]

    def wait(self, job_id: str, timeout: float = 600, until: Any = None) -> finetune_pb2.Job:
        """Poll until the job is terminal (or `until(job)` holds)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if (until(job) if until else job.state in TERMINAL) or time.monotonic() > deadline:
                return job
            time.sleep(0.1)


@pytest.fixture(scope="session")
def ft(ft_env: FineTuneEnv) -> Iterator[FineTuneServer]:
    from genloom.services.finetune.servicer import FineTuningServicer

    server = start_server([FineTuningServicer(ft_env.model_settings(), ft_env.settings())])
    server.wait_ready()
    channel = grpc.insecure_channel(server.target)
    yield FineTuneServer(server, channel, finetune_pb2_grpc.FineTuningServiceStub(channel), ft_env)
    channel.close()
    server.stop()


def qa_records(n: int, *, start: int = 0) -> list[dict[str, str]]:
    """Prompt/completion pairs with an easy pattern: the completion names the colour assigned to a number's
    parity, so a tiny model's loss falls fast."""
    colours = ("red", "blue")
    return [{"prompt": f"Item {i} colour:", "completion": f" {colours[i % 2]}"} for i in range(start, start + n)]


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def tiny_spec(records: list[dict[str, Any]] | None = None, **hyperparameters: Any) -> finetune_pb2.JobSpec:
    hp = dict(epochs=2, batch_size=4, learning_rate=1e-2, max_seq_length=64, checkpoint_interval_steps=5)
    hp.update(hyperparameters)
    return finetune_pb2.JobSpec(
        base_model=TINY,
        training_data=finetune_pb2.TrainingDataSource(jsonl=jsonl(records or qa_records(24))),
        hyperparameters=finetune_pb2.Hyperparameters(**hp),
        suffix="test",
    )

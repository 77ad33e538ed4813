"""Property-based fuzzing of every genloom RPC against real servers (tests/fuzz).

One genloom server per session hosts the tokenizer, inference (the `hf` engine on a tiny random 2-layer Llama with
the default model's tokenizer, so generation costs milliseconds), tasks and finetune services; finetune uses a
Redis database of its own, flushed at start and end (no worker runs: created jobs just queue). Requests go through
a real gRPC channel and the genloom.v1 stubs (not the SDK), so the raw status is what gets checked. The server opts
into every hostile-input surface: model paths (inside a model root), adapter roots, task and training data roots,
each with symlinks out of it; one loopback webhook address is allow-listed as a positive control.

The modules:
- test_{tokenizer,inference,tasks,finetune}_fuzz.py: every RPC (from the service descriptors) with generated
  requests: valid requests with one or two fields set to hostile values, valid requests merged with sparse generated
  messages, and whole-message garbage (strategies.py builds them from the message descriptors);
- test_every_field.py: every field of every request, one at a time, at its most hostile value;
- test_paths.py: every path-like field with ways out of its root (no read outside, no existence oracle);
- test_webhooks.py: internal webhook destinations refused at create time, and at send time for names;
- test_cancellation.py: calls abandoned by their clients leave no error, no stuck engine work;
- test_harness_checks.py: each property check can fail (scripted answers, no server).
The properties every call must keep are in harness.py.

Running it:
    .venv/bin/python -m pytest tests/fuzz -p no:cacheprovider

Budget and reproducibility:
- By default each RPC gets a few dozen generated examples (harness.DEFAULT_EXAMPLES, weighted per RPC by cost),
  derandomized: the same examples every run; the whole suite takes well under 3 minutes on 2 cores.
- GENLOOM_FUZZ_EXAMPLES=N: N examples per RPC (before weighting), randomized (Hypothesis prints a reproduction
  blob for each failure; `--hypothesis-seed=S` fixes the seed). E.g. GENLOOM_FUZZ_EXAMPLES=300 (~10 minutes).
- No example database is written (database=None): nothing lands in the repository.
- GENLOOM_TEST_FUZZ_REDIS: the Redis database to use (default redis://127.0.0.1:6379/11; it is flushed).
- GENLOOM_FUZZ_REPORT=path.json: also write the status counts and property failures there.

At the end the session prints the status counts per RPC, ERROR log records the servers wrote, and the smallest
request seen for each property failure.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.inference.settings import InferenceSettings
from genloom.services.server.settings import ModelSettings
from genloom.services.tasks.settings import TasksSettings
from genloom.services.tokenizer.settings import TokenizerSettings
from genloom.v1 import finetune_pb2, inference_pb2

from ..conftest import model_cache, start_server, write_tiny_llama
from .harness import LORA, STATS, TINY, WEBHOOK_CONTROL_HOST, ErrorLogCounter, FuzzSession, FuzzTarget
from .strategies import MessageStrategies, Vocabulary

REDIS_URL = os.environ.get("GENLOOM_TEST_FUZZ_REDIS", "redis://127.0.0.1:6379/11")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


TRAIN_RECORDS = [{"prompt": f"Item {i} colour:", "completion": f" {('red', 'blue')[i % 2]}"} for i in range(8)]
CLASSIFY_RECORDS = [{"text": t, "label": lab} for t, lab in [("great", "positive"), ("awful", "negative")] * 2]


def _make_tiny_model(path: Path, adapter_dir: Path, default_model_dir: Path) -> None:
    """The suite's tiny random Llama with a 512-token window (any generation is short), and a LoRA on it."""
    model = write_tiny_llama(path, default_model_dir, window=512)
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(str(adapter_dir))


def _lay_out_files(s: FuzzSession) -> None:
    """Roots with valid files, and ways out of each root: `..`, symlinks to outside files and directories."""
    for d in (s.task_data, s.train_data, s.artifacts, s.outside / "lora"):
        d.mkdir(parents=True, exist_ok=True)
    (s.outside / "secret.jsonl").write_bytes(_jsonl(CLASSIFY_RECORDS))
    (s.outside / "train.jsonl").write_bytes(_jsonl(TRAIN_RECORDS))
    for name in os.listdir(s.adapters_root / LORA):
        shutil.copy(s.adapters_root / LORA / name, s.outside / "lora" / name)
    (s.task_data / "classify.jsonl").write_bytes(_jsonl(CLASSIFY_RECORDS))
    (s.task_data / "broken.jsonl").write_bytes(b'{"text": "x"\n\xff\xfe\n' + b"[]\n" * 3)
    (s.train_data / "train.jsonl").write_bytes(_jsonl(TRAIN_RECORDS))
    for root in (s.task_data, s.train_data, s.adapters_root, s.models_root):
        links = root / "links"
        links.mkdir()
        (links / "outside").symlink_to(s.outside, target_is_directory=True)
        (links / "secret.jsonl").symlink_to(s.outside / "secret.jsonl")
        (links / "etc").symlink_to("/etc", target_is_directory=True)
        (links / "loop").symlink_to(links / "loop")  # a symlink loop: ELOOP on any access
        (links / "dangling").symlink_to(s.root / "does-not-exist")
    (s.models_root / "links" / "default-model").symlink_to(model_cache(), target_is_directory=True)
    (s.train_data / "links" / "artifacts").symlink_to(s.artifacts, target_is_directory=True)


def _paths(s: FuzzSession) -> list[str]:
    out = [
        "",
        "/",
        ".",
        "..",
        "~",
        "~/.ssh/id_rsa",
        "/etc/passwd",
        "/proc/self/environ",
        "/proc/self/cwd/pyproject.toml",
        "/dev/null",
        "/" + "a" * 300,
        "/" + "a" * 300 + "/b",
        "a" * 256,
        "x/" * 2000,
        str(s.tiny_dir),
        f"{s.models_root}/./{TINY}",
        f"{s.models_root}/././{TINY}/",
        f"{s.models_root}//{TINY}",
        f"{s.models_root}/links/../{TINY}",
        f"{s.models_root}/links/default-model/smollm2-135m-instruct",
        str(model_cache()),
        str(s.adapters_root / LORA),
        f"{s.adapters_root}/./{LORA}",
        str(s.outside / "lora"),
        LORA,
        "../outside/lora",
        "classify.jsonl",
        "train.jsonl",
        "broken.jsonl",
        "./classify.jsonl",
        "../outside/secret.jsonl",
        "../../../../../../etc/passwd",
        "links/outside/secret.jsonl",
        "links/secret.jsonl",
        "links/etc/passwd",
        "links/loop",
        "links/dangling",
        "links/artifacts",
        "links",
        str(s.task_data / "classify.jsonl"),
        str(s.train_data / "train.jsonl"),
        str(s.train_data / "links" / "outside" / "train.jsonl"),
        str(s.outside / "secret.jsonl"),
        str(s.artifacts),
    ]
    out += [str(p) for p in s.artifacts.rglob("*") if p.is_file()][:10]
    return out


def _seed_server(s: FuzzSession) -> None:
    """Objects for requests to name: a loaded adapter, queued and cancelled jobs, a sweep, event ids."""
    stubs = s.target.stubs
    stubs["InferenceService"].LoadAdapter(
        inference_pb2.LoadAdapterRequest(name=LORA, path=str(s.adapters_root / LORA)), timeout=60
    )
    ft = stubs["FineTuningService"]
    spec = finetune_pb2.JobSpec(
        base_model=TINY,
        training_data=finetune_pb2.TrainingDataSource(jsonl=_jsonl(TRAIN_RECORDS)),
        hyperparameters=finetune_pb2.Hyperparameters(epochs=1, batch_size=2, max_seq_length=32),
        suffix="fuzz",
    )
    for i in range(2):
        job = ft.CreateJob(finetune_pb2.CreateJobRequest(spec=spec, idempotency_key=f"fuzz-{i}"), timeout=60).job
        s.job_ids.append(job.id)
    ft.CancelJob(finetune_pb2.CancelJobRequest(job_id=s.job_ids[1]), timeout=30)
    for event in ft.WatchJob(finetune_pb2.WatchJobRequest(job_id=s.job_ids[1], follow=False), timeout=30):
        s.event_ids.append(event.event.id)
    sweep = finetune_pb2.SweepSpec(
        base_job=spec,
        search_space=[
            finetune_pb2.SearchDimension(
                name="learning_rate", float_range=finetune_pb2.FloatRange(min=1e-4, max=1e-2, grid_points=2)
            )
        ],
        method=finetune_pb2.SWEEP_METHOD_GRID,
        max_trials=2,
    )
    s.sweep_ids.append(ft.CreateSweep(finetune_pb2.CreateSweepRequest(spec=sweep), timeout=60).sweep.id)
    listed = ft.ListJobs(finetune_pb2.ListJobsRequest(page_size=1), timeout=30)
    if listed.next_page_token:
        s.page_tokens.append(listed.next_page_token)


@pytest.fixture(scope="session")
def fuzz(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzSession]:
    """The fuzz session: servers up, objects seeded, strategies built. Prints how long start-up took."""
    from genloom.services.finetune.servicer import FineTuningServicer
    from genloom.services.inference.servicer import InferenceServicer
    from genloom.services.tasks.servicer import TaskServicer
    from genloom.services.tokenizer.servicer import TokenizerServicer

    started = time.monotonic()
    errors = ErrorLogCounter()
    logging.getLogger().addHandler(errors)
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    root = tmp_path_factory.mktemp("fuzz")
    s = FuzzSession(root, root / "models" / TINY)
    s.tiny_dir.mkdir(parents=True)
    s.adapters_root.mkdir()
    _make_tiny_model(s.tiny_dir, s.adapters_root / LORA, default_model_dir)
    _lay_out_files(s)

    models = ModelSettings(
        model=TINY,
        models=f"{TINY}={s.tiny_dir}",
        model_cache=model_cache(),
        redis_url=REDIS_URL,
        allow_model_paths=True,
        model_roots=str(s.models_root),
    )
    inference = InferenceSettings(
        engine="hf",
        device="cpu",
        default_max_new_tokens=8,
        max_queued_requests=256,
        adapter_roots=str(s.adapters_root),
    )
    tasks = TasksSettings(data_root=s.task_data, max_eval_items=32, max_eval_configs=4, max_chunks=8)
    finetune = FinetuneSettings(
        artifact_root=s.artifacts,
        training_data_root=s.train_data,
        queue=f"fuzz-{uuid.uuid4().hex[:8]}",
        min_examples=4,
        webhook_attempts=1,
        webhook_timeout=1.0,
        webhook_backoff=0.01,
        # One loopback address is allow-listed: test_webhooks' positive control (a delivery that must arrive).
        webhook_allowed_hosts=WEBHOOK_CONTROL_HOST,
    )
    services = [
        TokenizerServicer.from_settings(models, TokenizerSettings()),
        InferenceServicer(models, inference),
        TaskServicer(tasks),
        FineTuningServicer(models, finetune),
    ]
    server = start_server(services)
    server.wait_ready()
    liveness = inference_pb2.GenerateRequest(
        prompt=inference_pb2.Prompt(text="Hello"),
        sampling=inference_pb2.SamplingParams(max_new_tokens=4, temperature=0),
    )
    home = os.environ.get("HOME", "")
    secrets = [
        str(tmp_path_factory.getbasetemp()),
        str(root),
        str(model_cache()),
        str(s.artifacts),
        str(REPO_ROOT),
        sys.prefix,
        home + "/" if home not in ("", "/") else "",
        server.target,
        f"localhost:{server.port}",
        f"[::1]:{server.port}",
        "127.0.0.1:6379",
        "redis://",
        "ipv4:",
        "ipv6:",
        "Traceback (most recent call last)",
        'File "/',
    ]
    # The artifact store is never shown to clients (paths in records are relative to it); nor is Redis.
    records = [str(s.artifacts), "redis://", str(REPO_ROOT), sys.prefix]
    s.target = FuzzTarget(server.target, secrets, liveness, record_secrets=records)
    _seed_server(s)
    hyperparameter_names = [f.name for f in finetune_pb2.Hyperparameters.DESCRIPTOR.fields]
    s.vocabulary = Vocabulary(
        names=[
            TINY,
            LORA,
            s.fine_tuned_name,
            "positive",
            "negative",
            "smollm2-135m-instruct",
            *s.job_ids,
            *s.sweep_ids,
            *s.event_ids,
            *s.page_tokens,
            *hyperparameter_names,
        ],
        paths=_paths(s),
        urls=[f"http://{server.target}/", f"http://127.0.0.1:{server.port}/grpc.health.v1.Health/Check"],
        jsonl=[
            _jsonl(TRAIN_RECORDS),
            _jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 5),
            _jsonl(CLASSIFY_RECORDS),
            b'{"prompt": "a"}\n' * 5,
            b"\xff\xfe\x00\n",
            b"{" * 10_000,
            b"[" * 100_000,
            b'{"prompt": "' + b"x" * 200_000 + b'", "completion": "y"}\n',
            b"\n" * 50_000,
        ],
    )
    s.strategies = MessageStrategies(s.vocabulary)
    STATS.server_started_s = time.monotonic() - started
    yield s
    s.target.close()
    server.stop()
    client.flushdb()
    logging.getLogger().removeHandler(errors)


@pytest.fixture(autouse=True)
def fuzz_window() -> Iterator[None]:
    """Counts ERROR records (and time) only while a fuzz test runs, and fails the test that made a server log one:
    a handled bad request logs a warning at most."""
    before = STATS.errors.copy()
    started = time.monotonic()
    STATS.active = True
    try:
        yield
    finally:
        STATS.active = False
        STATS.fuzz_seconds += time.monotonic() - started
    logged = STATS.errors - before
    assert not logged, f"the servers logged ERROR records: {dict(logged)}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The lead's numbers: fuzz requests run, their status codes per RPC, every property failure seen."""
    if not STATS.counts:
        return
    tr = terminalreporter
    tr.section("genloom fuzz: status counts")
    rpcs = sorted({rpc for rpc, _ in STATS.counts})
    total = sum(STATS.counts.values())
    for rpc in rpcs:
        codes = {code: n for (r, code), n in STATS.counts.items() if r == rpc}
        shown = ", ".join(f"{code} {n}" for code, n in sorted(codes.items(), key=lambda kv: -kv[1]))
        tr.write_line(f"{rpc:42} {sum(codes.values()):5}  {shown}")
    by_code = ", ".join(f"{code} {n}" for code, n in STATS.by_code().most_common())
    tr.write_line(f"{'TOTAL':42} {total:5}  {by_code}")
    tr.write_line(f"server start-up {STATS.server_started_s:.1f}s; fuzz tests {STATS.fuzz_seconds:.1f}s wall")
    if STATS.errors:
        tr.section("genloom fuzz: ERROR log records from the servers")
        for line, n in STATS.errors.most_common(30):
            tr.write_line(f"{n:5}  {line}")
    if STATS.violations:
        tr.section("genloom fuzz: property failures (smallest request seen per RPC and kind)")
        for v in sorted(STATS.violations.values(), key=lambda v: (v.kind, v.rpc)):
            tr.write_line(f"[{v.kind}] {v.rpc}: {v.observed}")
            tr.write_line(f"    request: {v.request}")
    report = os.environ.get("GENLOOM_FUZZ_REPORT")
    if report:
        Path(report).write_text(
            json.dumps(
                {
                    "requests": total,
                    "by_code": dict(STATS.by_code()),
                    "by_rpc": {rpc: {c: n for (r, c), n in STATS.counts.items() if r == rpc} for rpc in rpcs},
                    "violations": [v.__dict__ for v in STATS.violations.values()],
                    "error_logs": dict(STATS.errors),
                },
                indent=2,
            )
        )

"""Issue 12 on the fine-tuning service: webhooks that cannot be aimed at the server's own network, training data
read only from the data root (and uploads only by their own job), no server paths or Redis addresses in what
clients see, over-long base models refused as input, and Redis restarts that neither fail the first call nor
cost a running job an attempt.

The Redis tests run their own redis-server on a free port (persisting to an append-only file, so a restart keeps
the jobs) that they stop and start; nothing touches the machine's Redis beyond the suite's usual databases.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
import redis

from genloom.services.finetune import spec as spec_mod
from genloom.services.finetune import webhooks
from genloom.services.finetune.jobs import Heartbeat, JobManager
from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.finetune.store import Store
from genloom.services.server.errors import PermissionDenied
from genloom.services.server.settings import SettingsError
from genloom.v1 import finetune_pb2, finetune_pb2_grpc

from ..conftest import start_server
from ..tasks.conftest import bad_request_fields
from .conftest import FineTuneEnv, FineTuneServer, WorkerProcess, jsonl, qa_records, tiny_spec

S = finetune_pb2
pytestmark = pytest.mark.timeout(900)


# -- a Redis of our own, to restart ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """redis-server on a free loopback port, persisting every write (AOF), so stop() + start() is a restart."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.dir = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=1).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server syncs its AOF and exits
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = OwnRedis(tmp_path_factory.mktemp("own-redis"))
    server.start()
    yield server
    server.stop()


@dataclasses.dataclass
class OwnService:
    env: FineTuneEnv
    ft: FineTuneServer


@pytest.fixture(scope="module")
def own_service(ft_env: FineTuneEnv, own_redis: OwnRedis) -> Iterator[OwnService]:
    """A finetune server on our Redis with the default webhook policy (no allow-list) and its own queue."""
    from genloom.services.finetune.servicer import FineTuningServicer

    queue = f"training-hardening-{uuid.uuid4().hex[:8]}"
    env = dataclasses.replace(
        ft_env,
        redis_url=own_redis.url,
        queue=queue,
        env={
            **ft_env.env,
            "GENLOOM_REDIS_URL": own_redis.url,
            "GENLOOM_FINETUNE_QUEUE": queue,
            "GENLOOM_FINETUNE_WEBHOOK_ALLOWED_HOSTS": "",
        },
    )
    server = start_server([FineTuningServicer(env.model_settings(), env.settings(webhook_allowed_hosts=""))])
    server.wait_ready()
    channel = grpc.insecure_channel(server.target)
    yield OwnService(env, FineTuneServer(server, channel, finetune_pb2_grpc.FineTuningServiceStub(channel), env))
    channel.close()
    server.stop()


def _rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)
    return caught.value


# -- webhooks: destinations -------------------------------------------------------------------------------------

REFUSED_URLS = [
    "http://127.0.0.1/hook",
    "http://127.0.0.2:8080/hook",
    "http://2130706433/",  # 127.0.0.1 as one decimal number
    "http://0x7f000001/",
    "http://0177.0.0.1/",  # octal
    "http://127.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "http://[2002:a00:1::]/",  # 6to4 of 10.0.0.1
    "http://localhost:8080/",
    "http://LOCALHOST./",
    "http://api.localhost/",
    "http://169.254.169.254/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.0.1/",
    "http://100.64.0.1/",  # CGNAT
    "http://[fe80::1]/",
    "http://[fd00::1]/",
    "http://224.0.0.1/",
    "http://0.0.0.0/",
    "http://0/",
    "http://[::]/",
    "http://240.0.0.1/",
    "https://user:hunter2@example.com/hook",
    "ftp://example.com/hook",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_webhook_destination_refused_by_default(url: str) -> None:
    violations = spec_mod.check_webhook(S.Webhook(url=url))
    assert [v.field for v in violations] == ["webhook.url"], url
    assert "hunter2" not in violations[0].description  # credentials are never echoed


@pytest.mark.parametrize("url", ["https://example.com/hook", "http://93.184.216.34:8080/x", "http://[2606:4700::1]/"])
def test_public_webhook_destinations_accepted(url: str) -> None:
    assert spec_mod.check_webhook(S.Webhook(url=url)) == []


def test_allow_list_admits_named_private_destinations() -> None:
    policy = FinetuneSettings(webhook_allowed_hosts="127.0.0.1, 10.0.0.0/8, hooks.internal").webhook_policy()
    for url in ("http://127.0.0.1:9000/h", "http://10.9.8.7/h", "http://hooks.internal/h"):
        assert spec_mod.check_webhook(S.Webhook(url=url), policy=policy) == [], url
    for url in ("http://127.0.0.2/h", "http://192.168.1.1/h", "http://169.254.169.254/"):
        assert spec_mod.check_webhook(S.Webhook(url=url), policy=policy) != [], url
    with pytest.raises(SettingsError):
        FinetuneSettings(webhook_allowed_hosts="10.0.0.0/99")


class _Receiver(BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append((dict(self.headers), body))
        self.send_response(type(self).status)
        if type(self).status in (301, 302, 307):
            self.send_header("Location", "http://127.0.0.1:1/elsewhere")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[int, type[_Receiver]]]:
    handler = type("Receiver", (_Receiver,), {"calls": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1]), handler
    server.shutdown()


def _local_name() -> str:
    """A host name (not "localhost") this machine resolves to one of its own, non-public addresses."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
    except OSError:
        pytest.skip(f"the machine's host name {name!r} does not resolve")
    addresses = {ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos}
    if not any(webhooks.blocked_reason(a) for a in addresses):
        pytest.skip(f"{name!r} resolves to public addresses only")
    return name


def test_names_are_checked_again_at_send_time(receiver: tuple[int, type[_Receiver]]) -> None:
    """A name that passed CreateJob (it is not a literal address) but resolves to a private address when the
    webhook is sent (DNS rebinding) is not called; allow-listed, it is, on the address that was checked."""
    port, handler = receiver
    name = _local_name()
    url = f"http://{name}:{port}/hook"
    assert spec_mod.check_webhook(S.Webhook(url=url)) == []  # a name: fine at creation
    assert not webhooks.deliver(url, "", "job.succeeded", b"{}", attempts=2, backoff=0.01)
    assert handler.calls == []
    policy = webhooks.WebhookPolicy.parse(["127.0.0.0/8", "::1", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"])
    target, host_header, address = webhooks.resolve_destination(url, policy)
    assert target.startswith(f"http://{address}") and host_header == f"{name}:{port}"
    assert webhooks.deliver(url, "", "job.succeeded", b"{}", policy=policy, attempts=1)
    assert handler.calls and handler.calls[0][0]["Host"] == f"{name}:{port}"


def test_redirects_are_not_followed(receiver: tuple[int, type[_Receiver]]) -> None:
    port, handler = receiver
    handler.status = 307
    policy = webhooks.WebhookPolicy.parse(["127.0.0.1"])
    assert not webhooks.deliver(f"http://127.0.0.1:{port}/h", "", "job.failed", b"{}", policy=policy, attempts=1)
    assert len(handler.calls) == 1


def test_create_refuses_internal_webhooks_with_bad_request(own_service: OwnService) -> None:
    ft = own_service.ft
    for url in ("http://2130706433/", "http://[::ffff:127.0.0.1]:8080/", "http://169.254.169.254/"):
        err = _rpc_error(ft.create, tiny_spec(), webhook=S.Webhook(url=url))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, url
        assert bad_request_fields(err) == ["webhook.url"]  # type: ignore[arg-type]
        sweep = S.CreateSweepRequest(
            spec=S.SweepSpec(
                base_job=tiny_spec(),
                search_space=[
                    S.SearchDimension(name="seed", choice=S.ChoiceSpace(values=[S.ParameterValue(int_value=1)]))
                ],
            ),
            webhook=S.Webhook(url=url),
        )
        err = _rpc_error(ft.stub.CreateSweep, sweep, timeout=60)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, url
        assert bad_request_fields(err) == ["webhook.url"]  # type: ignore[arg-type]


def test_webhook_failure_event_and_body_reveal_nothing_of_the_server(
    ft: FineTuneServer, shared_worker: WorkerProcess, receiver: tuple[int, type[_Receiver]]
) -> None:
    port, handler = receiver
    handler.status = 404
    job = ft.create(tiny_spec(max_steps=2), webhook=S.Webhook(url=f"http://127.0.0.1:{port}/hook"))
    assert ft.wait(job.id).state == S.JOB_STATE_SUCCEEDED
    deadline = time.monotonic() + 30
    warning = None
    while warning is None and time.monotonic() < deadline:
        events = ft.events(job.id, follow=False)
        warning = next((e for e in events if e.level == S.JOB_EVENT_LEVEL_WARNING and "webhook" in e.message), None)
        time.sleep(0.1)
    assert warning is not None and "failed" in warning.message
    assert "404" not in warning.message and str(port) not in warning.message  # no status oracle
    body = handler.calls[0][1].decode()
    root = str(ft.env.artifact_root)
    assert root not in body and str(ft.env.data_root) not in body
    record = json.loads(body)
    assert record["spec"]["trainingData"]["path"] == f"upload:{job.id}/training.jsonl"
    assert not record["resultPath"].startswith("/")
    final = ft.get(job.id)
    assert root not in str(final)
    for ckpt in ft.stub.ListCheckpoints(S.ListCheckpointsRequest(job_id=job.id)).checkpoints:
        assert not ckpt.path.startswith("/") and root not in ckpt.path
    for event in ft.events(job.id, follow=False):
        assert root not in str(event)


# -- training data paths ------------------------------------------------------------------------------------------


def test_relative_data_path_is_taken_inside_the_data_root(ft: FineTuneServer) -> None:
    sub = ft.env.data_root / f"rel-{uuid.uuid4().hex[:6]}"
    sub.mkdir()
    (sub / "train.jsonl").write_bytes(jsonl(qa_records(12)))
    spec = tiny_spec()
    spec.training_data.path = f"{sub.name}/train.jsonl"
    job = ft.create(spec)
    assert job.spec.training_data.path == f"{sub.name}/train.jsonl"  # shown relative to the data root
    validated = ft.wait(job.id, timeout=120, until=lambda j: j.state != S.JOB_STATE_VALIDATING)
    ft.stub.CancelJob(S.CancelJobRequest(job_id=job.id))
    assert validated.state != S.JOB_STATE_FAILED, validated.error
    assert validated.training_examples + validated.validation_examples == 12


def test_no_existence_oracle_outside_the_data_root(ft: FineTuneServer) -> None:
    outside = ft.env.data_root.parent / f"secret-{uuid.uuid4().hex[:6]}.jsonl"
    outside.write_bytes(jsonl(qa_records(12)))
    answers = []
    for path in (f"../{outside.name}", "../no-such-file.jsonl", str(outside), "/no/such/file.jsonl"):
        spec = tiny_spec()
        spec.training_data.path = path
        err = _rpc_error(ft.create, spec)
        answers.append((err.code(), err.details().replace(repr(path), "<path>")))
    assert {code for code, _ in answers} == {grpc.StatusCode.PERMISSION_DENIED}
    assert len({details for _, details in answers}) == 1, answers
    assert all(str(ft.env.data_root) not in details for _, details in answers)


def test_no_job_reads_the_artifact_store_by_path(ft: FineTuneServer) -> None:
    owner = ft.create(tiny_spec(qa_records(12)))
    uploaded = ft.env.artifact_root / "jobs" / owner.id / "data" / "training.jsonl"
    deadline = time.monotonic() + 10
    while not uploaded.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uploaded.is_file()
    link = ft.env.data_root / f"link-{uuid.uuid4().hex[:6]}.jsonl"
    link.symlink_to(uploaded)
    for path, code in (
        (str(uploaded), grpc.StatusCode.PERMISSION_DENIED),
        (link.name, grpc.StatusCode.PERMISSION_DENIED),  # a symlink out of the data root
        (f"upload:{owner.id}/training.jsonl", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        spec = tiny_spec()
        spec.training_data.path = path
        err = _rpc_error(ft.create, spec)
        assert err.code() == code, path
        if not path.startswith("/"):  # (an absolute path is the client's own words, quoted back)
            assert str(ft.env.artifact_root) not in err.details()
    ft.stub.CancelJob(S.CancelJobRequest(job_id=owner.id))


def test_a_job_reads_only_its_own_upload(ft_env: FineTuneEnv) -> None:
    manager = JobManager(Store.from_url(ft_env.redis_url), ft_env.model_settings(), ft_env.settings(), lambda _: None)
    other = "ftjob-" + "a" * 26
    theirs = manager.store_data(S.TrainingDataSource(jsonl=jsonl(qa_records(4))), other, "training")
    assert theirs.path == f"upload:{other}/training.jsonl"
    assert manager.data_file(S.Job(id=other), theirs.path, "training").is_file()
    intruder = S.Job(id="ftjob-" + "b" * 26)  # a record naming another job's upload (never made by CreateJob)
    with pytest.raises(PermissionDenied):
        manager.data_file(intruder, theirs.path, "training")
    trial = S.Job(id="ftjob-" + "c" * 26, sweep_id="ftsweep-" + "d" * 26)
    sweep_data = manager.store_data(S.TrainingDataSource(jsonl=b"{}\n"), trial.sweep_id, "training")
    assert manager.data_file(trial, sweep_data.path, "training").is_file()  # a trial reads its sweep's data


def test_data_root_may_not_contain_the_artifact_store(tmp_path: Path) -> None:
    with pytest.raises(SettingsError):
        FinetuneSettings(artifact_root=tmp_path / "artifacts", training_data_root=tmp_path)


def test_over_long_base_model_is_an_input_error(ft: FineTuneServer) -> None:
    for name in ("/" + "a" * 300, "/" + "a" * 300 + "/" + "b" * 300, "x" * 5000):
        spec = tiny_spec()
        spec.base_model = name
        err = _rpc_error(ft.create, spec)
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), err.details()
        assert len(err.details()) < 1000


# -- Redis restarts -------------------------------------------------------------------------------------------------


def test_first_calls_after_a_redis_restart_succeed(own_service: OwnService, own_redis: OwnRedis) -> None:
    ft = own_service.ft
    job = ft.create(tiny_spec())
    assert ft.events(job.id, follow=False)  # the watcher's connection is pooled now
    own_redis.stop()
    err = _rpc_error(ft.stub.GetJob, S.GetJobRequest(job_id=job.id), timeout=60)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    details = err.details()
    assert "job store is unavailable" in details
    assert str(own_redis.port) not in details and "127.0.0.1" not in details and "redis://" not in details
    own_redis.start()
    assert ft.events(job.id, follow=False)  # stale pooled connections: retried, not "Connection closed"
    assert ft.get(job.id).id == job.id
    ft.stub.CancelJob(S.CancelJobRequest(job_id=job.id), timeout=60)


def test_a_lease_lapsed_only_because_redis_was_down_costs_no_attempt(
    own_service: OwnService, own_redis: OwnRedis, worker_logs: Path
) -> None:
    env, ft = own_service.env, own_service.ft
    worker = WorkerProcess(env, "blip", worker_logs).wait_ready()
    try:
        job = ft.create(tiny_spec(qa_records(64), epochs=100, checkpoint_interval_steps=1000))
        running = ft.wait(job.id, timeout=300, until=lambda j: j.latest_metrics.step >= 3 or j.state in (4, 5, 6))
        assert running.state == S.JOB_STATE_RUNNING, running.error
        own_redis.stop()
        time.sleep(env.settings().lease_seconds * 1.7)  # the lease (3 s) lapses meanwhile
        own_redis.start()
        after = ft.get(job.id)
        # Long enough for the reaper (every 0.5 s) to have re-queued it, were the worker deemed lost.
        time.sleep(env.settings().lease_seconds * 3)
        later = ft.wait(job.id, timeout=120, until=lambda j: j.latest_metrics.step >= after.latest_metrics.step + 5)
        assert later.state == S.JOB_STATE_RUNNING, later.error
        assert later.attempts == 1 and later.worker == worker.name
        events = ft.events(job.id, follow=False)
        assert not [e.message for e in events if "stopped reporting" in e.message or "re-queued" in e.message]
        ft.stub.CancelJob(S.CancelJobRequest(job_id=job.id), timeout=60)
        final = ft.wait(job.id, timeout=120)
        assert final.state == S.JOB_STATE_CANCELLED and final.attempts == 1
    finally:
        worker.stop()


def test_a_truly_lost_worker_still_costs_an_attempt_after_the_grace(ft_env: FineTuneEnv, own_redis: OwnRedis) -> None:
    url = own_redis.url.rsplit("/", 1)[0] + "/1"
    redis.Redis.from_url(url).flushdb()
    models = dataclasses.replace(ft_env.model_settings(), redis_url=url)
    sent: list[str] = []
    settings = ft_env.settings(max_attempts=3, lost_worker_grace=1.0)
    manager = JobManager(Store.from_url(url), models, settings, sent.append)
    job, _ = manager.create(S.CreateJobRequest(spec=tiny_spec()))
    manager.validate(job.id)
    store = manager.store

    def start(j: finetune_pb2.Job) -> None:
        j.attempts += 1
        j.worker = "w@test"

    assert store.acquire_lease("lease", job.id, "tok", 0.2)
    store.transition(job.id, S.JOB_STATE_RUNNING, allowed_from=[S.JOB_STATE_QUEUED], message="r", mutate=start)
    time.sleep(0.3)  # the lease lapsed
    manager.reap()
    assert store.get_job(job.id).state == S.JOB_STATE_RUNNING  # within the grace: the worker may come back

    def ours(j: finetune_pb2.Job) -> bool:
        return j.state == S.JOB_STATE_RUNNING and j.worker == "w@test" and j.attempts == 1

    # A worker cut off from Redis takes its lease back (and its heartbeat keeps it).
    beat = Heartbeat(store, "lease", job.id, "tok", 0.6, reclaim=lambda: store.reclaim_lease(job.id, "tok", 0.6, ours))
    assert beat.reclaim is not None and beat.reclaim()
    beat.start()
    time.sleep(1.5)
    manager.reap()
    assert store.get_job(job.id).state == S.JOB_STATE_RUNNING and not beat.lost
    beat._stop.set()  # the worker dies (its lease is left to lapse)
    beat._thread.join()
    deadline = time.monotonic() + 10
    while store.get_job(job.id).state == S.JOB_STATE_RUNNING and time.monotonic() < deadline:
        manager.reap()
        time.sleep(0.2)
    requeued = store.get_job(job.id)
    assert requeued.state == S.JOB_STATE_QUEUED and sent[-1] == job.id
    assert not store.reclaim_lease(job.id, "tok", 0.6, ours)  # too late: re-queued, not ours any more

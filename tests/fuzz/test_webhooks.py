"""Webhook destinations: a URL whose host is a literal loopback, private, link-local, unspecified, multicast or
cloud-metadata address, or `localhost`, and any scheme but http(s), is refused at CreateJob / CreateSweep with
INVALID_ARGUMENT naming webhook.url (the fuzz server allow-lists nothing). Names that only resolve to such
addresses are the send-time check's job (DNS rebinding) and are not asserted here."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
import time

import grpc
import pytest
from google.protobuf.message import Message

from genloom.v1 import finetune_pb2

from . import test_finetune_fuzz
from .harness import WEBHOOK_CONTROL_HOST, FuzzSession, assert_still_serving

REFUSED = (
    "http://127.0.0.1/hook",
    "http://localhost:6379/",
    "http://LOCALHOST./x",
    "http://0.0.0.0:80/",
    "http://[::1]:8080/",
    "http://[::ffff:127.0.0.1]/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[fe80::1]/",
    "http://224.0.0.1/",
    "http://user:pass@127.0.0.1/",
    "http://example.com@127.0.0.1/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "redis://127.0.0.1:6379/0",
    "ftp://example.com/",
)


def _with_url(request: Message, url: str) -> Message:
    out = type(request)()
    out.CopyFrom(request)
    out.webhook.url = url
    return out


@pytest.mark.parametrize("method", ["CreateJob", "CreateSweep"])
def test_internal_webhook_destinations_are_refused(fuzz: FuzzSession, method: str) -> None:
    base = test_finetune_fuzz.bases(fuzz)[method][0]
    rpc = f"FineTuningService.{method}"
    failures = []
    for url in (*REFUSED, f"http://{fuzz.target.target}/"):
        outcome = fuzz.target.check(rpc, _with_url(base, url))
        fields = [v.field for v in outcome.bad_request()]
        if outcome.code != grpc.StatusCode.INVALID_ARGUMENT or "webhook.url" not in fields:
            failures.append(f"{url}: {outcome.summary(160)}")
    assert not failures, f"{rpc} accepted internal webhook destinations:\n" + "\n".join(failures)


class HookListener:
    """A real HTTP server on every interface, recording the paths webhooks POST to."""

    def __init__(self) -> None:
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                seen.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _internal_name() -> str | None:
    """This machine's host name when it resolves only to non-public addresses (loopback on most machines)."""
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        return None
    return name if addresses and all(not ipaddress.ip_address(a).is_global for a in addresses) else None


def test_names_resolving_to_internal_addresses_get_no_webhook(fuzz: FuzzSession) -> None:
    """A job whose webhook names a host that resolves to loopback (checked at send time, when the job ends) gets no
    delivery there, while an allow-listed address (the control) does; the job's events don't tell which."""
    name = _internal_name()
    if name is None:
        pytest.skip("this machine's host name does not resolve to an internal address")
    base = test_finetune_fuzz.bases(fuzz)["CreateJob"][0]
    stub = fuzz.target.stubs["FineTuningService"]
    listener = HookListener()
    try:
        jobs = {}
        for label, host in (("control", WEBHOOK_CONTROL_HOST), ("attack", name)):
            outcome = fuzz.target.check(
                "FineTuningService.CreateJob", _with_url(base, f"http://{host}:{listener.port}/{label}")
            )
            if outcome.code == grpc.StatusCode.OK:
                jobs[label] = outcome.responses[0].job.id
                stub.CancelJob(finetune_pb2.CancelJobRequest(job_id=jobs[label]), timeout=30)  # terminal: webhook
            else:
                assert label == "attack", f"the allow-listed control URL was refused: {outcome.summary()}"
        deadline = time.monotonic() + 10
        while "/control" not in listener.seen and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the attack's delivery, if any, runs alongside the control's
        assert "/control" in listener.seen, "the control webhook never arrived: the test could not tell"
        assert "/attack" not in listener.seen, f"a webhook reached {name} (loopback) after resolving its name"
        if "attack" in jobs:
            request = finetune_pb2.WatchJobRequest(job_id=jobs["attack"], follow=False)
            events = [r.event for r in stub.WatchJob(request, timeout=30)]
            leaked = [e.message for e in events if str(listener.port) in e.message or "refused" in e.message.lower()]
            assert not leaked, f"job events tell a caller about the destination: {leaked}"
    finally:
        listener.close()


def test_still_serving_after_webhooks(fuzz: FuzzSession) -> None:
    assert_still_serving(fuzz)

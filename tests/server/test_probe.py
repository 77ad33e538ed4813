"""The container health probe (`python -m genloom.services.server.probe`) against real servers: the exit status
Docker's HEALTHCHECK and Kubernetes' exec probes read, with plaintext and TLS."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from ..conftest import ServerThread, start_server

PROBE = [sys.executable, "-m", "genloom.services.server.probe"]


class _GatedService:
    """A service that only becomes ready when told to: the window in which health is NOT_SERVING."""

    name = "genloom.test.Gated"

    def __init__(self) -> None:
        self.open: asyncio.Event | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        self.open = asyncio.Event()

    async def start(self) -> None:
        assert self.open is not None
        await self.open.wait()

    async def close(self) -> None:
        return None


def _probe(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GENLOOM_")}
    env = {**clean, **(env or {})}
    return subprocess.run([*PROBE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def gated_server() -> Any:
    service = _GatedService()
    server = start_server([service])
    yield server, service
    server.stop()


def test_probe_follows_the_servers_settings_and_health(gated_server: tuple[ServerThread, _GatedService]) -> None:
    server, service = gated_server
    # What a container sets: the server listens on every interface; the probe asks loopback.
    env = {"GENLOOM_HOST": "0.0.0.0", "GENLOOM_PORT": str(server.port)}
    loading = _probe(env=env)
    assert loading.returncode == 1, loading
    assert "NOT_SERVING" in loading.stderr

    assert service.open is not None
    server.loop.call_soon_threadsafe(service.open.set)
    server.wait_ready(30)
    ready = _probe(env=env)
    assert ready.returncode == 0, ready
    assert f"127.0.0.1:{server.port}: SERVING" in ready.stdout
    assert _probe("--service", "genloom.test.Gated", env=env).returncode == 0
    unknown = _probe("--service", "genloom.v1.Nope", env=env)
    assert unknown.returncode == 1 and "unknown service" in unknown.stderr

    # Shutting down: health turns NOT_SERVING before the port closes, then nothing answers.
    server.stop()
    gone = _probe("--timeout", "2", env=env)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr


def test_probe_fails_fast_when_nothing_listens() -> None:
    started = time.monotonic()
    result = _probe("--target", f"127.0.0.1:{_free_port()}", "--timeout", "3")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert time.monotonic() - started < 30


def test_probe_speaks_tls_when_the_server_does(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    service = _GatedService()
    server = start_server([service], tls_cert=cert, tls_key=key)
    try:
        assert service.open is not None
        server.loop.call_soon_threadsafe(service.open.set)
        server.wait_ready(30)
        env = {"GENLOOM_PORT": str(server.port), "GENLOOM_TLS_CERT": str(cert), "GENLOOM_TLS_KEY": str(key)}
        ok = _probe(env=env)
        assert ok.returncode == 0, ok
        # Plaintext against a TLS port, or a certificate checked against the wrong name, is a failure, not a hang.
        assert _probe("--no-tls", "--timeout", "3", env=env).returncode == 1
        wrong = _probe("--server-name", "elsewhere.example", "--timeout", "3", env=env)
        assert wrong.returncode == 1 and "UNAVAILABLE" in wrong.stderr
    finally:
        server.stop()

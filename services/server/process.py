"""`genloom serve` as a child process: start on a free port, wait until healthy, stop with SIGTERM.

Used by the demo, the benchmarks and the tests that need a real separate server process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_LISTENING = re.compile(r"genloom serving .* on ([\w.:\[\]-]+):(\d+)")
_METRICS = re.compile(r"metrics on http://[\w.:\[\]-]+:(\d+)/")
# grpc_health ships no type information; the status is an int enum value.
SERVING: int = health_pb2.HealthCheckResponse.SERVING


class ServerProcess:
    """Runs `genloom serve <service> --port 0 <args>`; `port`/`target` are known once `start()` returns."""

    def __init__(self, service: str = "all", args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        # The bound ports are read from the info-level start-up log lines (stderr is captured, not shown), so
        # the log level is info whatever `args` say.
        self.command = [sys.executable, "-m", "genloom.cli", "serve", service, "--port", "0", *args]
        self.command += ["--log-level", "info"]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[str] | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.log: list[str] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> ServerProcess:
        """Start the process and wait until it listens and its health is SERVING."""
        if self.process is not None:
            raise RuntimeError("already started")
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env
        )
        assert self.process.stderr is not None
        listening = threading.Event()
        threading.Thread(target=self._read_log, args=(listening,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not listening.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("genloom serve did not start:\n" + "".join(self.log[-30:]))
        self.wait_serving(deadline - time.monotonic())
        return self

    def _read_log(self, listening: threading.Event) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if m := _METRICS.search(line):
                self.metrics_port = int(m.group(1))
            if m := _LISTENING.search(line):
                self.port = int(m.group(2))
                listening.set()

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.target) as channel:
            request = health_pb2.HealthCheckRequest(service=service)
            return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._serving():
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("genloom serve never became ready:\n" + "".join(self.log[-30:]))
            time.sleep(0.2)

    def _serving(self) -> bool:
        try:
            return self.health() == SERVING
        except grpc.RpcError:  # a busy machine may answer slowly while models load: ask again
            return False

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown) without waiting."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait for exit (kill after `timeout`); returns the exit code."""
        if self.process is None:
            return 0
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

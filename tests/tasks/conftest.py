"""Task-service fixtures: genloom servers hosting tokenizer + inference (the session's shared `hf` engine on the
real default model) + tasks, in the test session's loop, reached over real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from genloom.services.inference.servicer import InferenceServicer
from genloom.services.inference.settings import InferenceSettings
from genloom.services.server.app import GenloomServer
from genloom.services.server.settings import ModelSettings, ServerSettings
from genloom.services.tasks.servicer import TaskServicer
from genloom.services.tasks.settings import TasksSettings
from genloom.services.tokenizer.servicer import TokenizerServicer
from genloom.services.tokenizer.settings import TokenizerSettings
from genloom.v1 import tasks_pb2_grpc

DEFAULT_MODEL = "smollm2-135m-instruct"
#: The small window tests use to force example dropping, chunking and truncation quickly.
SMALL_WINDOW = 512


@dataclass
class TaskStack:
    server: GenloomServer
    channel: grpc.aio.Channel
    stub: tasks_pb2_grpc.TaskServiceStub
    engine: Any
    data_root: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


async def start_stack(
    engine: Any,
    model_dir: Path,
    data_root: Path,
    window: int = 0,
    tokenizer_model: str = DEFAULT_MODEL,
    adapter_roots: str = "",
    **task_settings: Any,
) -> TaskStack:
    """`tokenizer_model`: what the tokenizer service serves as its default model (the inference service always
    serves `engine`): a directory with the same vocabulary but no chat template exercises plain-text prompts.
    `adapter_roots`: where LoadAdapter may read adapters from (GENLOOM_ADAPTER_ROOTS; none by default)."""
    models = ModelSettings(model=DEFAULT_MODEL, model_cache=model_dir.parent, max_model_len=window)
    tokenizer_models = ModelSettings(model=tokenizer_model, model_cache=model_dir.parent, max_model_len=window)
    services = [
        TokenizerServicer.from_settings(tokenizer_models, TokenizerSettings()),
        InferenceServicer(models, InferenceSettings(adapter_roots=adapter_roots), engine=engine),
        TaskServicer(TasksSettings(data_root=data_root, **task_settings)),
    ]
    server = GenloomServer(ServerSettings(port=0, shutdown_grace=1.0), services)
    await server.start()
    await server.wait_ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return TaskStack(server, channel, tasks_pb2_grpc.TaskServiceStub(channel), engine, data_root)


async def stop_stack(stack: TaskStack) -> None:
    await stack.channel.close()
    await stack.server.stop(1.0)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("task-data")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def tasks(hf_engine: Any, default_model_dir: Path, data_root: Path) -> AsyncIterator[TaskStack]:
    """The task service on the model's own context window."""
    stack = await start_stack(hf_engine, default_model_dir, data_root)
    yield stack
    await stop_stack(stack)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def small_tasks(hf_engine: Any, default_model_dir: Path, data_root: Path) -> AsyncIterator[TaskStack]:
    """The task service with the window capped at SMALL_WINDOW tokens."""
    stack = await start_stack(hf_engine, default_model_dir, data_root, window=SMALL_WINDOW)
    yield stack
    await stop_stack(stack)


def bad_request_fields(err: grpc.aio.AioRpcError) -> list[str]:
    """The google.rpc.BadRequest field names of an INVALID_ARGUMENT error."""
    from google.rpc import error_details_pb2, status_pb2

    fields: list[str] = []
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    fields += [v.field for v in bad.field_violations]
    return fields

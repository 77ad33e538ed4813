"""The inference service through real gRPC and the SDK, on the real default model, for each engine.

The server runs in the test session's event loop (engines are bound to the loop they started in), so tests use
`genloom.AsyncClient`; sync SDK calls run in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import genloom
from genloom.services.inference.engine import Engine
from genloom.services.inference.servicer import InferenceServicer
from genloom.services.inference.settings import InferenceSettings
from genloom.services.server.app import GenloomServer
from genloom.services.server.settings import ModelSettings, ServerSettings

DEFAULT_MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "Name three colours."}]
ENGINES = ["hf", "vllm", "openai"]


@pytest.fixture(scope="module")
def reference(default_model_dir: Path) -> tuple[Any, Any]:
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()
    return tokenizer, model


def reference_greedy(reference: tuple[Any, Any], messages: list[dict[str, str]], max_new_tokens: int) -> list[int]:
    tokenizer, model = reference
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return [int(t) for t in out[0, ids.shape[1] :]]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Engine:
    """The shared engine of each kind in turn (looked up here, outside the event loop, so that an async
    session fixture can still be set up)."""
    return request.getfixturevalue(f"{request.param}_engine")  # type: ignore[no-any-return]


@pytest_asyncio.fixture(scope="module")
async def service(
    engine: Engine, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Any]]:
    """A genloom server hosting the inference service on the shared engine; LoadAdapter may read adapters from the
    tests' temporary directories."""
    kind = engine.info().engine
    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    settings = InferenceSettings(adapter_roots=str(tmp_path_factory.getbasetemp()))
    servicer = InferenceServicer(models, settings, engine=engine)
    server = GenloomServer(ServerSettings(port=0, shutdown_grace=1.0), [servicer])
    await server.start()
    await server.wait_ready()
    client = genloom.AsyncClient(target=f"127.0.0.1:{server.port}", timeout=120)
    yield {"client": client, "engine": engine, "kind": kind, "servicer": servicer, "port": server.port}
    await client.close()
    await server.stop(1.0)


async def wait_idle(engine: Engine, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while engine.load() != (0, 0):
        assert asyncio.get_running_loop().time() < deadline, f"engine still busy: {engine.load()}"
        await asyncio.sleep(0.02)


async def test_greedy_generate_equals_transformers(service: dict[str, Any], reference: Any) -> None:
    client: genloom.AsyncClient = service["client"]
    result = await client.inference.generate(QUESTION, max_new_tokens=24, temperature=0)
    expected = reference_greedy(reference, QUESTION, 24)
    assert result.token_ids == expected
    assert result.text == reference[0].decode(expected, skip_special_tokens=True)
    assert result.model == DEFAULT_MODEL
    assert result.usage.completion_tokens == len(expected)
    assert result.finish_reason in ("length", "eos")


async def test_stream_text_equals_unary_text(service: dict[str, Any]) -> None:
    client: genloom.AsyncClient = service["client"]
    prompt = [{"role": "user", "content": "Write the word 世界 three times, then say café."}]
    unary = await client.inference.generate(prompt, max_new_tokens=32, temperature=0)
    stream = client.inference.stream(prompt, max_new_tokens=32, temperature=0)
    deltas = [d async for d in stream]
    assert stream.text == unary.text and "\ufffd" not in stream.text
    assert [t for d in deltas for t in d.token_ids] == unary.token_ids
    assert [d.token_offset for d in deltas if d.token_ids] == sorted({d.token_offset for d in deltas if d.token_ids})
    assert stream.finish is not None and stream.finish.usage == unary.usage
    assert stream.finish.finish_reason == unary.finish_reason


async def test_stop_sequences_are_removed(service: dict[str, Any]) -> None:
    client: genloom.AsyncClient = service["client"]
    free = await client.inference.generate(QUESTION, max_new_tokens=32, temperature=0)
    words = free.text.split()
    assert len(words) >= 3
    stop = words[2]
    stopped = await client.inference.generate(QUESTION, max_new_tokens=32, temperature=0, stop=[stop, "zzqx"])
    assert stopped.finish_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.text == free.text[: free.text.index(stop)]
    stream = client.inference.stream(QUESTION, max_new_tokens=32, temperature=0, stop=[stop])
    _ = [d async for d in stream]
    assert stream.text == stopped.text and stream.finish is not None
    assert stream.finish.finish_reason == "stop_sequence"


async def test_seeded_sampling_is_reproducible(service: dict[str, Any]) -> None:
    client: genloom.AsyncClient = service["client"]
    kwargs: dict[str, Any] = dict(max_new_tokens=16, temperature=1.0, top_p=0.95)
    first, second, other = await asyncio.gather(
        client.inference.generate(QUESTION, seed=7, **kwargs),
        client.inference.generate(QUESTION, seed=7, **kwargs),
        client.inference.generate(QUESTION, seed=8, **kwargs),
    )
    alone = await client.inference.generate(QUESTION, seed=7, **kwargs)
    assert first.token_ids == second.token_ids == alone.token_ids
    assert other.token_ids != first.token_ids


async def test_logprobs_are_returned(service: dict[str, Any]) -> None:
    client: genloom.AsyncClient = service["client"]
    result = await client.inference.generate(QUESTION, max_new_tokens=4, temperature=0, logprobs=3)
    assert len(result.logprobs) == len(result.token_ids)
    for entry, token_id in zip(result.logprobs, result.token_ids, strict=True):
        assert entry.token_id == token_id and entry.logprob <= 0
        assert len(entry.top) == 3 and entry.top[0][0] == token_id  # greedy picks the most likely
        assert [t[2] for t in entry.top] == sorted((t[2] for t in entry.top), reverse=True)


async def test_client_cancellation_aborts_in_engine(service: dict[str, Any]) -> None:
    client: genloom.AsyncClient = service["client"]
    stream = client.inference.stream(QUESTION, max_new_tokens=400, temperature=0, ignore_eos=True)
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    stream.close()
    await wait_idle(service["engine"])


async def test_deadline_aborts_in_engine(service: dict[str, Any]) -> None:
    client: genloom.AsyncClient = service["client"]
    with pytest.raises(genloom.DeadlineExceededError):
        await client.inference.generate(QUESTION, max_new_tokens=400, ignore_eos=True, timeout=0.5)
    await wait_idle(service["engine"])


async def test_abort_by_request_id(service: dict[str, Any]) -> None:
    client: genloom.AsyncClient = service["client"]
    request_id = f"abort-me-{service['kind']}"
    stream = client.inference.stream(QUESTION, max_new_tokens=400, ignore_eos=True, request_id=request_id)
    deltas = 0
    async for _ in stream:
        deltas += 1
        if deltas == 2:
            assert await client.inference.abort(request_id) is True
    assert stream.finish is not None and stream.finish.finish_reason == "abort"
    assert stream.finish.usage.completion_tokens < 400
    assert await client.inference.abort(request_id) is False
    await wait_idle(service["engine"])


async def test_score_ranks_the_obvious_candidate_first(service: dict[str, Any], reference: Any) -> None:
    client: genloom.AsyncClient = service["client"]
    scores = await client.inference.score(
        [("The capital of France is", [" Paris", " banana", " the city of Paris"]), ("2 + 2 =", [" 4", " 5"])],
        return_token_logprobs=True,
    )
    assert scores.results[0].best == 0 and scores.results[1].best == 0
    tokenizer, model = reference
    prompt = tokenizer("The capital of France is")["input_ids"]
    candidate = tokenizer(" the city of Paris", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + candidate])).logits[0].log_softmax(-1)
    expected = [float(logits[len(prompt) - 1 + i, t]) for i, t in enumerate(candidate)]
    got = scores.results[0].candidates[2]
    assert got.token_ids == candidate
    assert got.token_logprobs == pytest.approx(expected, abs=1e-3)
    assert got.sum_logprob == pytest.approx(sum(expected), abs=1e-3)
    assert got.mean_logprob == pytest.approx(sum(expected) / len(expected), abs=1e-3)
    assert scores.usage.prompt_tokens > 0


async def test_context_window_overflow_and_truncation(service: dict[str, Any], default_model_dir: Path) -> None:
    # A 256-token window (GENLOOM_MAX_MODEL_LEN) on the same engine keeps the prompts, and the test, short.
    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent, max_model_len=256)
    servicer = InferenceServicer(models, InferenceSettings(), engine=service["engine"])
    server = GenloomServer(ServerSettings(port=0), [servicer])
    await server.start()
    await server.wait_ready()
    try:
        async with genloom.AsyncClient(target=f"127.0.0.1:{server.port}") as client:
            long_text = " ".join(["word"] * 240)  # 240 tokens
            with pytest.raises(genloom.InvalidArgumentError) as err:
                await client.inference.generate(long_text, max_new_tokens=32)
            assert "240 prompt tokens + 32 max_new_tokens = 272" in err.value.message
            assert "context window of 256" in err.value.message
            left = await client.inference.generate(long_text, max_new_tokens=32, temperature=0, truncation="left")
            report = left.truncation
            assert (report.truncated, report.side, report.original_prompt_tokens) == (True, "left", 240)
            assert report.prompt_tokens == 224 and report.removed_tokens == 16
            assert left.usage.prompt_tokens == 224
            right = await client.inference.generate(long_text + " end", max_new_tokens=32, truncation="right")
            assert right.truncation.side == "right" and right.truncation.prompt_tokens == 224
            chat = (
                [{"role": "system", "content": "Be brief."}]
                + [{"role": role, "content": " ".join(["word"] * 80)} for role in ("user", "assistant", "user")]
                + [{"role": "user", "content": "Now answer."}]
            )
            with pytest.raises(genloom.InvalidArgumentError):
                await client.inference.generate(chat, max_new_tokens=32)
            fitted = await client.inference.generate(chat, max_new_tokens=32, truncation="left")
            assert fitted.truncation.removed_messages >= 1
            assert fitted.truncation.prompt_tokens + 32 <= 256
            with pytest.raises(genloom.InvalidArgumentError, match="RIGHT truncation"):
                await client.inference.generate(chat, max_new_tokens=32, truncation="right")
    finally:
        await server.stop(1.0)


async def test_bad_requests_get_clear_statuses(service: dict[str, Any]) -> None:
    client: genloom.AsyncClient = service["client"]
    with pytest.raises(genloom.InvalidArgumentError) as err:
        await client.inference.generate(QUESTION, temperature=3.0, top_p=1.5)
    assert {v.field for v in err.value.field_violations} == {"sampling.temperature", "sampling.top_p"}
    with pytest.raises(genloom.InvalidArgumentError):
        await client.inference.generate("")
    with pytest.raises(genloom.InvalidArgumentError):
        await client.inference.generate([1, 2, 10**7])
    with pytest.raises(genloom.NotFoundError):
        await client.inference.generate("hi", model="gpt-9")
    with pytest.raises(genloom.NotFoundError):
        await client.inference.generate("hi", adapter="nope")
    with pytest.raises(genloom.InvalidArgumentError):
        await client.inference.score([("prompt", [])])


async def test_duplicate_request_id_in_flight_is_already_exists(service: dict[str, Any]) -> None:
    client: genloom.AsyncClient = service["client"]
    request_id = f"dup-{service['kind']}"
    stream = client.inference.stream(QUESTION, max_new_tokens=300, ignore_eos=True, request_id=request_id)
    iterator = stream.__aiter__()
    await iterator.__anext__()
    with pytest.raises(genloom.AlreadyExistsError):
        await client.inference.generate(QUESTION, request_id=request_id, max_new_tokens=2)
    stream.close()
    await wait_idle(service["engine"])


async def test_models_and_model_info(service: dict[str, Any]) -> None:
    client: genloom.AsyncClient = service["client"]
    (model,) = await client.inference.models()
    window = min(8192, service["engine"].info().context_window)
    assert (model.name, model.is_default, model.engine, model.context_window) == (
        DEFAULT_MODEL,
        True,
        service["kind"],
        window,
    )
    info = await client.inference.model_info()
    assert info.engine == service["kind"] and info.dtype == "float32" and info.vocab_size == 49152
    assert info.ready and info.running_requests == 0


async def test_sync_client_streams_in_a_thread(service: dict[str, Any]) -> None:
    def run() -> tuple[str, str]:
        with genloom.Client(target=f"127.0.0.1:{service['port']}") as client:
            unary = client.inference.generate("Once upon a time", max_new_tokens=12, temperature=0)
            with client.inference.stream("Once upon a time", max_new_tokens=12, temperature=0) as stream:
                text = "".join(d.text for d in stream)
            return unary.text, text

    unary_text, streamed_text = await asyncio.to_thread(run)
    assert unary_text == streamed_text and unary_text


async def test_raw_grpc_stream_has_deltas_then_one_finish(service: dict[str, Any]) -> None:
    from genloom.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{service['port']}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateStreamRequest(
            prompt=inference_pb2.Prompt(
                conversation=common_pb2.Conversation(
                    messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Say hello.")]
                )
            ),
            sampling=inference_pb2.SamplingParams(max_new_tokens=8, temperature=0),
        )
        kinds = [m.WhichOneof("event") async for m in stub.GenerateStream(request)]
    assert kinds[-1] == "finish" and kinds.count("finish") == 1 and set(kinds[:-1]) <= {"delta"}


@pytest.fixture(scope="module")
def lora_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random LoRA adapter for the default model (non-zero B, so it changes outputs)."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    path = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(str(path))
    return path


async def test_adapters_load_change_outputs_and_bad_paths_are_refused(
    service: dict[str, Any], lora_dir: Path, tmp_path: Path
) -> None:
    client: genloom.AsyncClient = service["client"]
    name = f"test-lora-{service['kind']}"
    base = await client.inference.generate(QUESTION, max_new_tokens=12, temperature=0)
    info = await client.inference.load_adapter(name, str(lora_dir))
    assert (info.name, info.rank, info.loaded) == (name, 8, True)
    assert sorted(info.target_modules) == ["q_proj", "v_proj"]
    with pytest.raises(genloom.AlreadyExistsError):
        await client.inference.load_adapter(name, str(lora_dir))
    adapted = await client.inference.generate(QUESTION, max_new_tokens=12, temperature=0, adapter=name)
    assert adapted.adapter == name and adapted.token_ids != base.token_ids
    again = await client.inference.generate(QUESTION, max_new_tokens=12, temperature=0)
    assert again.token_ids == base.token_ids  # the base model is untouched
    assert [a.name for a in await client.inference.adapters()] == [name]

    with pytest.raises(genloom.InvalidArgumentError) as err:
        await client.inference.load_adapter("broken", str(tmp_path))  # a directory, but no adapter in it
    assert err.value.field_violations[0].field == "path"
    with pytest.raises(genloom.NotFoundError):
        await client.inference.load_adapter("broken", str(tmp_path / "missing"))
    still = await client.inference.generate(QUESTION, max_new_tokens=12, temperature=0)
    assert still.token_ids == base.token_ids  # a refused adapter did not harm the engine

    await client.inference.unload_adapter(name)
    assert await client.inference.adapters() == []
    with pytest.raises(genloom.NotFoundError):
        await client.inference.generate(QUESTION, adapter=name, max_new_tokens=2)


async def test_backpressure_refuses_with_retry_info(default_model_dir: Path) -> None:
    """A one-slot engine with room for one waiting request: the rest are refused, not queued forever."""
    from genloom.services.inference.engines.hf import HFEngine

    settings = InferenceSettings(engine="hf", max_batch_size=1, max_queued_requests=1)
    engine = HFEngine(default_model_dir, DEFAULT_MODEL, settings)
    await engine.start()
    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    server = GenloomServer(ServerSettings(port=0), [InferenceServicer(models, settings, engine=engine)])
    await server.start()
    await server.wait_ready()
    try:
        async with genloom.AsyncClient(target=f"127.0.0.1:{server.port}", max_retries=0) as client:

            def start() -> asyncio.Task[Any]:
                return asyncio.create_task(client.inference.generate(QUESTION, max_new_tokens=64, ignore_eos=True))

            async def until(load: tuple[int, int]) -> None:
                async with asyncio.timeout(30):
                    while engine.load() != load:
                        await asyncio.sleep(0.01)

            # One at a time, so that the second is admitted while the first already runs (waiting 0 < 1).
            calls = [start()]
            await until((1, 0))
            calls.append(start())
            await until((1, 1))  # one running, one waiting: the queue is full
            with pytest.raises(genloom.ResourceExhaustedError) as err:
                await client.inference.generate(QUESTION, max_new_tokens=4)
            assert err.value.retry_after is not None and err.value.retry_after > 0
            results = await asyncio.gather(*calls)
            assert all(r.usage.completion_tokens == 64 for r in results)
    finally:
        await server.stop(1.0)
        await engine.shutdown()


async def test_score_agrees_between_engines(hf_engine: Engine, vllm_engine: Engine, default_model_dir: Path) -> None:
    from genloom.services.inference.engine import ScoreQuery

    engines = [hf_engine, vllm_engine]
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    prompt = tokenizer("Review: the film was wonderful. Sentiment:")["input_ids"]
    candidates = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in (" positive", " negative", " meh")]
    hf_scores, vllm_scores = [await engine.score([ScoreQuery(prompt, candidates)]) for engine in engines]
    for hf_candidate, vllm_candidate in zip(hf_scores[0], vllm_scores[0], strict=True):
        assert hf_candidate == pytest.approx(vllm_candidate, abs=1e-3)


async def test_dead_engine_flips_health_and_answers_unavailable(default_model_dir: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from genloom.services.inference.engines.hf import HFEngine

    engine = HFEngine(default_model_dir, DEFAULT_MODEL, InferenceSettings(engine="hf"))
    await engine.start()
    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    server = GenloomServer(ServerSettings(port=0), [InferenceServicer(models, InferenceSettings(), engine=engine)])
    await server.start()
    await server.wait_ready()
    target = f"127.0.0.1:{server.port}"

    async def health() -> int:
        async with grpc.aio.insecure_channel(target) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return int(response.status)

    def device_failure() -> None:  # what a lost GPU looks like to the step thread; cannot happen for real here
        raise RuntimeError("simulated device failure")

    try:
        assert await health() == health_pb2.HealthCheckResponse.SERVING
        engine._decode = device_failure  # type: ignore[method-assign]
        async with genloom.AsyncClient(target=target, max_retries=0, timeout=20) as client:
            with pytest.raises(genloom.UnavailableError):
                await client.inference.generate(QUESTION, max_new_tokens=8)
            assert await health() == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(genloom.UnavailableError):  # at once, not a hang
                await client.inference.generate(QUESTION, max_new_tokens=8, timeout=5)
    finally:
        await server.stop(1.0)
        await engine.shutdown()


async def test_cli_generate(hf_engine: Engine, default_model_dir: Path) -> None:
    import os
    import sys

    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    server = GenloomServer(ServerSettings(port=0), [InferenceServicer(models, InferenceSettings(), engine=hf_engine)])
    await server.start()
    await server.wait_ready()
    target = f"127.0.0.1:{server.port}"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "genloom.cli", "--target", target, "generate",
            "What is the capital of France?", "--max-new-tokens", "16", "--stream",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "GENLOOM_API_KEY": ""},
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        async with genloom.AsyncClient(target=target) as client:
            unary = await client.inference.generate(
                [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16, temperature=0
            )
        assert out.decode().strip() == unary.text.strip()
        assert "generated tokens" in err.decode()
    finally:
        await server.stop(1.0)

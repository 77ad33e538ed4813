"""Fine-tuned model names ("ft:<base>:<suffix>:<job-id>") served hot by the inference, tokenizer and task services.

Everything is real: a PEFT LoRA adapter for the default model (random non-zero B, so it changes outputs) and a
fully fine-tuned copy of the default model (one layer's weights perturbed) in temp directories, registered in the
real Redis the way a fine-tuning worker registers a succeeded job, and the tokenizer, inference (the session's
shared `hf` engine; a full fine-tune gets an `hf` engine of its own) and task services on one genloom server reached
over gRPC.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import shutil
import socket
import string
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis
import torch

from genloom.services.inference.engine import Engine, EngineDeadError
from genloom.services.inference.engines import create_engine
from genloom.services.inference.servicer import InferenceServicer
from genloom.services.inference.settings import InferenceSettings
from genloom.services.models import finetuned
from genloom.services.models.finetuned import FineTunedModel
from genloom.services.models.registry import ModelSpec
from genloom.services.server.app import GenloomServer
from genloom.services.server.settings import ModelSettings, ServerSettings
from genloom.services.tokenizer.servicer import TokenizerServicer
from genloom.services.tokenizer.settings import TokenizerSettings
from genloom.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    tasks_pb2,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from tests.tasks.conftest import TaskStack, start_stack, stop_stack

DEFAULT_MODEL = "smollm2-135m-instruct"
PROMPT = inference_pb2.Prompt(
    conversation=common_pb2.Conversation(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Name three colours.")]
    )
)
GREEDY = inference_pb2.SamplingParams(max_new_tokens=12, temperature=0.0)
POS_NEG = [tasks_pb2.ClassLabel(name="positive"), tasks_pb2.ClassLabel(name="negative")]
REVIEWS = ["I love this film, it was wonderful and moving.", "Terrible acting, boring plot, a waste of time."]
MEETING = (
    "The quarterly planning meeting moved from Monday to Friday because the large conference room was booked. "
    "Everyone must bring a laptop."
)


def fresh_name(base: str = DEFAULT_MODEL) -> str:
    alphabet = string.digits + string.ascii_lowercase
    job_id = "ftjob-" + "".join(secrets.choice(alphabet) for _ in range(26))
    return finetuned.model_name(base, "test", job_id)


@pytest.fixture(scope="module")
def lora_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LoRA adapter for the default model: what a LoRA fine-tuning job leaves in its artifact store."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    path = tmp_path_factory.mktemp("ft-lora")
    peft_model.save_pretrained(str(path))
    return path


# A plain-text prompt as token ids, so transformers can be given exactly what the engine is given.
FULL_PROMPT_TEXT = "My favourite colours are"
FULL_NEW_TOKENS = 8


@dataclass(frozen=True)
class FullModel:
    path: Path
    prompt_ids: list[int]
    expected: list[int]  # transformers' own greedy continuation of prompt_ids with these weights


@pytest.fixture(scope="module")
def full_model(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FullModel:
    """What a full fine-tuning job leaves: a whole model directory (config, safetensors, tokenizer files) whose
    weights differ from the base model's (the last layer's MLP output projection perturbed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("ft-full")
    for item in default_model_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not item.name.startswith("."):
            shutil.copy(item, path / item.name)
    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        weight = model.model.layers[-1].mlp.down_proj.weight
        weight.add_(torch.randn_like(weight) * weight.std())
    model.save_pretrained(str(path))
    prompt_ids = list(AutoTokenizer.from_pretrained(str(path))(FULL_PROMPT_TEXT, add_special_tokens=False).input_ids)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=FULL_NEW_TOKENS,
            do_sample=False,
        )
    expected = out[0, len(prompt_ids) :].tolist()
    del model
    return FullModel(path, prompt_ids, expected)


Register = Callable[..., str]


@pytest.fixture(scope="module")
def register(lora_dir: Path) -> Iterator[Register]:
    """register(name=fresh, base_model=..., method=..., path=...) -> name, as a fine-tuning worker does on success;
    every key written is deleted afterwards."""
    client = redis.Redis.from_url(ModelSettings().redis_url)
    names: list[str] = []

    def register_model(
        name: str | None = None, *, base_model: str = DEFAULT_MODEL, method: str = "lora", path: Path | None = None
    ) -> str:
        name = name or fresh_name()
        _, _, job_id = finetuned.parse_name(name)
        names.append(name)
        finetuned.register(client, FineTunedModel(name, base_model, method, str(path or lora_dir), job_id))
        return name

    yield register_model
    if names:
        client.delete(*(finetuned.key(n) for n in names))
    client.close()


@pytest_asyncio.fixture(scope="module")
async def stack(
    hf_engine: Any, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TaskStack]:
    """Tokenizer + inference + tasks on one server (ft adapters it loads are removed from the shared engine when it
    stops)."""
    # LoadAdapter may read the by-hand adapter (lora_dir) from the test's temporary directories.
    stack = await start_stack(
        hf_engine,
        default_model_dir,
        tmp_path_factory.mktemp("ft-task-data"),
        adapter_roots=str(tmp_path_factory.getbasetemp()),
    )
    yield stack
    await stop_stack(stack)


def inference(stack: TaskStack) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(stack.channel)


def tokenizer(stack: TaskStack) -> tokenizer_pb2_grpc.TokenizerServiceStub:
    return tokenizer_pb2_grpc.TokenizerServiceStub(stack.channel)


def generate_request(model: str = "", adapter: str = "", max_new_tokens: int = 12) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=common_pb2.ModelRef(model=model, adapter=adapter),
        prompt=PROMPT,
        sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
    )


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code(), err.value.details() or ""


# -- inference ----------------------------------------------------------------------------------------------------


async def test_ft_name_is_served_hot_and_equals_its_adapter_loaded_by_hand(
    stack: TaskStack, register: Register, lora_dir: Path
) -> None:
    stub = inference(stack)
    name = fresh_name()
    code, details = await status_of(stub.Generate(generate_request(name)))
    assert code == grpc.StatusCode.NOT_FOUND and name in details  # its job has not succeeded yet

    register(name)  # the job succeeds: the same server serves it at once, no restart
    tuned = await stub.Generate(generate_request(name))
    assert tuned.model == common_pb2.ModelRef(model=name)
    base = await stub.Generate(generate_request())
    assert tuned.token_ids and tuned.token_ids != base.token_ids

    by_hand = f"by-hand-{finetuned.parse_name(name)[2]}"
    await stub.LoadAdapter(inference_pb2.LoadAdapterRequest(name=by_hand, path=str(lora_dir)))
    try:
        loaded = await stub.Generate(generate_request(adapter=by_hand))
    finally:
        await stub.UnloadAdapter(inference_pb2.UnloadAdapterRequest(name=by_hand))
    assert (loaded.token_ids, loaded.text) == (tuned.token_ids, tuned.text)

    # The name also works as ModelRef.adapter (as ListAdapters lists it), and streamed.
    as_adapter = await stub.Generate(generate_request(adapter=name))
    assert as_adapter.model == common_pb2.ModelRef(model=DEFAULT_MODEL, adapter=name)
    assert as_adapter.token_ids == tuned.token_ids
    stream_request = inference_pb2.GenerateStreamRequest(
        model=common_pb2.ModelRef(model=name), prompt=PROMPT, sampling=GREEDY
    )
    messages = [m async for m in stub.GenerateStream(stream_request)]
    assert "".join(m.delta.text for m in messages if m.HasField("delta")) == tuned.text
    assert messages[-1].finish.model.model == name

    adapters = {a.name: a for a in (await stub.ListAdapters(inference_pb2.ListAdaptersRequest())).adapters}
    info = adapters[name]
    assert info.source == inference_pb2.ADAPTER_SOURCE_FINE_TUNE and info.loaded and info.rank == 8
    assert info.job_id == finetuned.parse_name(name)[2] and info.base_model == DEFAULT_MODEL
    assert by_hand not in adapters
    listed = {m.name: m for m in (await stub.ListModels(inference_pb2.ListModelsRequest())).models}
    assert listed[name].kind == inference_pb2.MODEL_KIND_FINE_TUNED_ADAPTER
    assert listed[name].base_model == DEFAULT_MODEL and not listed[name].is_default
    described = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest(model=name))
    assert (described.name, described.kind, described.base_model) == (
        name,
        inference_pb2.MODEL_KIND_FINE_TUNED_ADAPTER,
        DEFAULT_MODEL,
    )


async def test_score_with_an_ft_name_uses_its_adapter(stack: TaskStack, register: Register) -> None:
    stub = inference(stack)
    name = register()
    items = [
        inference_pb2.ScoreItem(
            prompt=inference_pb2.Prompt(text="The capital of France is"), candidates=[" Paris", " London"]
        )
    ]
    tuned = await stub.Score(inference_pb2.ScoreRequest(model=common_pb2.ModelRef(model=name), items=items))
    base = await stub.Score(inference_pb2.ScoreRequest(items=items))
    assert tuned.model == common_pb2.ModelRef(model=name)
    tuned_scores = [c.sum_logprob for c in tuned.results[0].candidates]
    base_scores = [c.sum_logprob for c in base.results[0].candidates]
    assert all(math.isfinite(s) and s < 0 for s in tuned_scores)
    assert max(abs(t - b) for t, b in zip(tuned_scores, base_scores, strict=True)) > 1e-3


async def test_concurrent_first_requests_load_the_adapter_once(stack: TaskStack, register: Register) -> None:
    stub = inference(stack)
    name = register()
    # Without the load lock, the second load of the same adapter would fail in the engine.
    results = await asyncio.gather(*(stub.Generate(generate_request(name, max_new_tokens=4)) for _ in range(3)))
    assert len({tuple(r.token_ids) for r in results}) == 1
    adapters = (await stub.ListAdapters(inference_pb2.ListAdaptersRequest())).adapters
    assert [a.name for a in adapters].count(name) == 1


async def test_least_recently_used_ft_adapters_are_evicted_beyond_max_loras(
    stack: TaskStack, register: Register
) -> None:
    stub = inference(stack)
    for adapter in (await stub.ListAdapters(inference_pb2.ListAdaptersRequest())).adapters:
        await stub.UnloadAdapter(inference_pb2.UnloadAdapterRequest(name=adapter.name))
    limit = (await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())).max_loras
    names = [register() for _ in range(limit + 1)]

    async def loaded() -> set[str]:
        return {a.name for a in (await stub.ListAdapters(inference_pb2.ListAdaptersRequest())).adapters}

    for name in names:
        await stub.Generate(generate_request(name, max_new_tokens=1))
    assert await loaded() == set(names[1:])  # the first was used least recently
    again = await stub.Generate(generate_request(names[0], max_new_tokens=1))  # loaded again, on demand
    assert again.model.model == names[0]
    assert await loaded() == {names[0], *names[2:]}


async def test_bad_ft_names_get_clear_statuses(stack: TaskStack, register: Register, default_model_dir: Path) -> None:
    stub = inference(stack)
    unknown = fresh_name()
    code, details = await status_of(stub.Generate(generate_request(unknown)))
    assert code == grpc.StatusCode.NOT_FOUND and unknown in details
    score = inference_pb2.ScoreRequest(
        model=common_pb2.ModelRef(model=unknown),
        items=[inference_pb2.ScoreItem(prompt=inference_pb2.Prompt(text="Hi"), candidates=["!"])],
    )
    assert (await status_of(stub.Score(score)))[0] == grpc.StatusCode.NOT_FOUND

    # "ft:" is reserved: a name that breaks the format can never be registered, so the request is what is wrong.
    code, details = await status_of(stub.Generate(generate_request("ft:x")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "ft:<base>:<suffix>:<job-id>" in details

    name = register()
    code, details = await status_of(stub.Generate(generate_request(name, adapter="some-adapter")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "model.adapter" in details

    other_base = register(fresh_name("other-model"), base_model="other-model")
    code, details = await status_of(stub.Generate(generate_request(other_base)))
    assert code == grpc.StatusCode.NOT_FOUND and "'other-model'" in details

    # A full fine-tune is a model, not an adapter; and one whose directory is gone says so.
    full = register(method="full", path=default_model_dir)
    code, details = await status_of(stub.Generate(generate_request(full, adapter="some-adapter")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "model.adapter" in details
    code, details = await status_of(stub.Generate(generate_request(adapter=full)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not an adapter" in details
    gone = register(method="full", path=default_model_dir / "no-such-model")
    code, details = await status_of(stub.Generate(generate_request(gone)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no config.json" in details

    missing = register(path=default_model_dir / "no-such-adapter")
    code, details = await status_of(stub.Generate(generate_request(missing)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not a directory" in details

    base = await stub.Generate(generate_request())  # none of that harmed the engine
    assert base.model.model == DEFAULT_MODEL and base.token_ids


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_registry_is_unavailable(hf_engine: Any, default_model_dir: Path) -> None:
    models = ModelSettings(
        model=DEFAULT_MODEL, model_cache=default_model_dir.parent, redis_url=f"redis://127.0.0.1:{closed_port()}/0"
    )
    services = [
        TokenizerServicer.from_settings(models, TokenizerSettings()),
        InferenceServicer(models, InferenceSettings(), engine=hf_engine),
    ]
    server = GenloomServer(ServerSettings(port=0, shutdown_grace=1.0), services)
    await server.start()
    await server.wait_ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        name = fresh_name()
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        code, details = await status_of(stub.Generate(generate_request(name)))
        assert code == grpc.StatusCode.UNAVAILABLE and "GENLOOM_REDIS_URL" in details
        tok = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        code, _ = await status_of(tok.GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest(model=name)))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert (await stub.Generate(generate_request(max_new_tokens=2))).token_ids  # base models need no Redis
    finally:
        await channel.close()
        await server.stop(1.0)


# -- tokenizer ----------------------------------------------------------------------------------------------------


async def test_tokenizer_serves_an_ft_name_with_its_base_tokenizer(stack: TaskStack, register: Register) -> None:
    stub = tokenizer(stack)
    name = register()
    info = await stub.GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest(model=name))
    base = await stub.GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest())
    assert info.model == name
    assert (info.vocab_size, info.context_window, info.chat_template) == (
        base.vocab_size,
        base.context_window,
        base.chat_template,
    )
    inputs = [tokenizer_pb2.TokenizerInput(text="Fine-tuned models share their base model's vocabulary.")]
    tuned = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(model=name, inputs=inputs))
    plain = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(inputs=inputs))
    assert tuned.model == name and list(tuned.results[0].ids) == list(plain.results[0].ids)

    unknown = fresh_name()
    code, _ = await status_of(stub.Tokenize(tokenizer_pb2.TokenizeRequest(model=unknown, inputs=inputs)))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await status_of(stub.GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest(model="ft:x")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# -- tasks --------------------------------------------------------------------------------------------------------


async def test_tasks_run_on_an_ft_name(stack: TaskStack, register: Register) -> None:
    name = register()
    model = common_pb2.ModelRef(model=name)
    tuned = await stack.stub.Classify(tasks_pb2.ClassifyRequest(model=model, texts=REVIEWS, labels=POS_NEG))
    base = await stack.stub.Classify(tasks_pb2.ClassifyRequest(texts=REVIEWS, labels=POS_NEG))
    assert tuned.model.model == name
    for result in tuned.results:
        assert result.label in {"positive", "negative"}
        assert math.isclose(sum(p.probability for p in result.probabilities), 1.0, abs_tol=1e-6)
    tuned_p = [p.probability for r in tuned.results for p in r.probabilities]
    base_p = [p.probability for r in base.results for p in r.probabilities]
    assert max(abs(t - b) for t, b in zip(tuned_p, base_p, strict=True)) > 1e-4  # the adapter was used

    sampling = inference_pb2.SamplingParams(max_new_tokens=16, temperature=0.0)
    summary = await stack.stub.Summarize(
        tasks_pb2.SummarizeRequest(model=model, documents=[MEETING], sampling=sampling)
    )
    base_summary = await stack.stub.Summarize(tasks_pb2.SummarizeRequest(documents=[MEETING], sampling=sampling))
    assert summary.model.model == name and summary.results[0].summary
    assert summary.results[0].summary != base_summary.results[0].summary

    answer = await stack.stub.Answer(
        tasks_pb2.AnswerRequest(
            model=model,
            items=[tasks_pb2.AnswerItem(question="Which day is the meeting on?", context=MEETING)],
            sampling=sampling,
        )
    )
    assert answer.model.model == name and len(answer.results) == 1

    unknown = fresh_name()
    code, details = await status_of(
        stack.stub.Classify(
            tasks_pb2.ClassifyRequest(model=common_pb2.ModelRef(model=unknown), texts=REVIEWS, labels=POS_NEG)
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND and unknown in details


# -- fully fine-tuned models --------------------------------------------------------------------------------------


def full_request(full_model: FullModel, model: str = "", max_new_tokens: int = FULL_NEW_TOKENS) -> Any:
    return inference_pb2.GenerateRequest(
        model=common_pb2.ModelRef(model=model),
        prompt=inference_pb2.Prompt(token_ids=tokenizer_pb2.TokenIds(ids=full_model.prompt_ids)),
        sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
    )


async def full_models_listed(stub: inference_pb2_grpc.InferenceServiceStub) -> dict[str, inference_pb2.ModelSummary]:
    models = (await stub.ListModels(inference_pb2.ListModelsRequest())).models
    return {m.name: m for m in models if m.kind == inference_pb2.MODEL_KIND_FINE_TUNED_FULL}


async def test_full_ft_model_is_served_hot_by_an_engine_of_its_own(
    stack: TaskStack, register: Register, full_model: FullModel
) -> None:
    stub = inference(stack)
    name = fresh_name()
    code, _ = await status_of(stub.Generate(full_request(full_model, name)))
    assert code == grpc.StatusCode.NOT_FOUND  # its job has not succeeded yet

    register(name, method="full", path=full_model.path)  # the job succeeds: served at once, no restart
    described = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest(model=name))
    assert (described.kind, described.base_model, described.source) == (
        inference_pb2.MODEL_KIND_FINE_TUNED_FULL,
        DEFAULT_MODEL,
        f"fine-tuning job {finetuned.parse_name(name)[2]}",  # never the server's artifact directory
    )
    assert not described.ready and name not in await full_models_listed(stub)  # started on first use only

    tuned = await stub.Generate(full_request(full_model, name))
    base = await stub.Generate(full_request(full_model))
    assert tuned.model == common_pb2.ModelRef(model=name)
    assert list(tuned.token_ids) == full_model.expected[: len(tuned.token_ids)] and tuned.token_ids
    assert list(tuned.token_ids) != list(base.token_ids)

    stream_request = inference_pb2.GenerateStreamRequest(
        model=common_pb2.ModelRef(model=name),
        prompt=inference_pb2.Prompt(token_ids=tokenizer_pb2.TokenIds(ids=full_model.prompt_ids)),
        sampling=inference_pb2.SamplingParams(max_new_tokens=FULL_NEW_TOKENS, temperature=0.0),
    )
    messages = [m async for m in stub.GenerateStream(stream_request)]
    assert "".join(m.delta.text for m in messages if m.HasField("delta")) == tuned.text
    assert messages[-1].finish.model.model == name

    listed = await full_models_listed(stub)
    assert listed[name].base_model == DEFAULT_MODEL and listed[name].ready and not listed[name].is_default
    described = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest(model=name))
    assert described.ready and described.engine == inference_pb2.ENGINE_HF and not described.supports_lora
    base_described = await stub.GetModelInfo(inference_pb2.GetModelInfoRequest())
    assert described.name == name and described.vocab_size == base_described.vocab_size

    items = [
        inference_pb2.ScoreItem(
            prompt=inference_pb2.Prompt(text="The capital of France is"), candidates=[" Paris", " London"]
        )
    ]
    tuned_score = await stub.Score(inference_pb2.ScoreRequest(model=common_pb2.ModelRef(model=name), items=items))
    base_score = await stub.Score(inference_pb2.ScoreRequest(items=items))
    assert tuned_score.model == common_pb2.ModelRef(model=name)
    tuned_lp = [c.sum_logprob for c in tuned_score.results[0].candidates]
    base_lp = [c.sum_logprob for c in base_score.results[0].candidates]
    assert all(math.isfinite(lp) and lp < 0 for lp in tuned_lp)
    assert max(abs(t - b) for t, b in zip(tuned_lp, base_lp, strict=True)) > 1e-3

    # Tasks and the tokenizer accept the name too.
    classified = await stack.stub.Classify(
        tasks_pb2.ClassifyRequest(model=common_pb2.ModelRef(model=name), texts=REVIEWS, labels=POS_NEG)
    )
    base_classified = await stack.stub.Classify(tasks_pb2.ClassifyRequest(texts=REVIEWS, labels=POS_NEG))
    assert classified.model.model == name and all(r.label in {"positive", "negative"} for r in classified.results)
    tuned_p = [p.probability for r in classified.results for p in r.probabilities]
    base_p = [p.probability for r in base_classified.results for p in r.probabilities]
    assert max(abs(t - b) for t, b in zip(tuned_p, base_p, strict=True)) > 1e-4
    info = await tokenizer(stack).GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest(model=name))
    assert info.model == name


async def test_full_ft_engines_beyond_the_limit_are_evicted_least_recently_used(
    stack: TaskStack, register: Register, full_model: FullModel
) -> None:
    stub = inference(stack)  # the stack's servicer runs at most one (GENLOOM_MAX_FULL_MODELS=1)
    first, second = (register(method="full", path=full_model.path) for _ in range(2))
    await stub.Generate(full_request(full_model, first, max_new_tokens=1))
    assert first in await full_models_listed(stub)
    again = await stub.Generate(full_request(full_model, second))
    assert set(await full_models_listed(stub)) == {second}  # the first, idle, was shut down to make room
    assert list(again.token_ids) == full_model.expected[: len(again.token_ids)]

    # While a request runs on the second, it is not shut down: the first has to wait.
    long_request = inference_pb2.GenerateStreamRequest(
        model=common_pb2.ModelRef(model=second),
        prompt=inference_pb2.Prompt(token_ids=tokenizer_pb2.TokenIds(ids=full_model.prompt_ids)),
        sampling=inference_pb2.SamplingParams(max_new_tokens=400, temperature=0.0, ignore_eos=True),
    )
    call = stub.GenerateStream(long_request)
    await call.read()  # running (and pinned) now
    code, details = await status_of(stub.Generate(full_request(full_model, first, max_new_tokens=1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "GENLOOM_MAX_FULL_MODELS" in details
    call.cancel()

    for _ in range(50):  # the cancelled request lets go of its engine as its handler unwinds
        try:
            reloaded = await stub.Generate(full_request(full_model, first))
            break
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the first full model never came back after the request on the second was cancelled")
    assert reloaded.model.model == first and list(reloaded.token_ids) == list(again.token_ids)  # reloaded on demand
    assert set(await full_models_listed(stub)) == {first}


class CountingFactory:
    """The real engine factory, counting the engines it makes."""

    def __init__(self) -> None:
        self.made: list[Engine] = []

    def __call__(self, spec: ModelSpec, settings: InferenceSettings, window: int) -> Engine:
        engine = create_engine(spec, settings, window)
        self.made.append(engine)
        return engine


async def test_concurrent_first_requests_start_one_engine_and_close_stops_it(
    hf_engine: Any, default_model_dir: Path, register: Register, full_model: FullModel
) -> None:
    factory = CountingFactory()
    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    servicer = InferenceServicer(models, InferenceSettings(), engine_factory=factory, engine=hf_engine)
    server = GenloomServer(ServerSettings(port=0, shutdown_grace=1.0), [servicer])
    await server.start()
    await server.wait_ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        name = register(method="full", path=full_model.path)
        results = await asyncio.gather(*(stub.Generate(full_request(full_model, name, 2)) for _ in range(3)))
        assert len({tuple(r.token_ids) for r in results}) == 1
        assert len(factory.made) == 1 and factory.made[0] is not hf_engine
        assert factory.made[0].info().engine == "hf"  # the main engine's kind, whatever GENLOOM_ENGINE=auto picks
    finally:
        await channel.close()
        await server.stop(1.0)
    with pytest.raises(EngineDeadError):  # shut down with the server
        await factory.made[0].check_health()
    await hf_engine.check_health()  # the shared main engine was left running


async def test_no_full_models_when_the_limit_is_zero(
    hf_engine: Any, default_model_dir: Path, register: Register, full_model: FullModel
) -> None:
    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    servicer = InferenceServicer(models, InferenceSettings(max_full_models=0), engine=hf_engine)
    server = GenloomServer(ServerSettings(port=0, shutdown_grace=1.0), [servicer])
    await server.start()
    await server.wait_ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        name = register(method="full", path=full_model.path)
        code, details = await status_of(stub.Generate(full_request(full_model, name)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "GENLOOM_MAX_FULL_MODELS" in details
    finally:
        await channel.close()
        await server.stop(1.0)

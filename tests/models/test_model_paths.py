"""Model and adapter paths against real servers: one canonical name per directory, bounded caches, allowed roots
only (containment before existence), no OSError as INTERNAL, no server path in any message (issue 12, findings 3,
4 and 9)."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch

from genloom.services.finetune.servicer import FineTuningServicer
from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.inference.servicer import InferenceServicer
from genloom.services.inference.settings import InferenceSettings
from genloom.services.models.registry import ModelRegistry, ModelSpec
from genloom.services.server.app import GenloomServer
from genloom.services.server.errors import InvalidArgument, NotFound, PermissionDenied, quote
from genloom.services.server.settings import ModelSettings, ServerSettings, SettingsError
from genloom.services.tokenizer.servicer import TokenizerServicer
from genloom.services.tokenizer.settings import TokenizerSettings
from genloom.services.tokenizer.store import LoadedTokenizer, TokenizerStore, load_tokenizer
from genloom.v1 import (
    common_pb2,
    finetune_pb2,
    finetune_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from tests.conftest import DEFAULT_MODEL, ServerThread, start_server

MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json")
LONG = "a" * 300  # one name over the file system's 255-byte limit


@pytest.fixture(scope="module")
def model_root(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GENLOOM_MODEL_ROOTS: model directories m1..m3 (small tokenizers), `configured` (served as alias "tiny"),
    and `broken` (looks like a model: a config.json, but no tokenizer)."""
    root = tmp_path_factory.mktemp("model-root")
    for name in ("m1", "m2", "m3", "configured"):
        (root / name).mkdir()
        for file in MODEL_FILES:
            shutil.copy(small_model_dir / file, root / name / file)
    (root / "broken").mkdir()
    shutil.copy(small_model_dir / "config.json", root / "broken" / "config.json")
    return root


def model_settings(default_model_dir: Path, model_root: Path, **overrides: Any) -> ModelSettings:
    values: dict[str, Any] = dict(
        model=DEFAULT_MODEL,
        model_cache=default_model_dir.parent,
        models=f"tiny={model_root / 'configured'}",
        allow_model_paths=True,
        model_roots=str(model_root),
        max_cached_models=2,
    )
    values.update(overrides)
    return ModelSettings(**values)


@pytest.fixture(scope="module")
def paths_server(default_model_dir: Path, model_root: Path) -> Iterator[ServerThread]:
    """A tokenizer server that lets clients name model directories inside `model_root`."""
    models = model_settings(default_model_dir, model_root)
    server = start_server([TokenizerServicer.from_settings(models, TokenizerSettings())])
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(paths_server: ServerThread) -> Iterator[tokenizer_pb2_grpc.TokenizerServiceStub]:
    with grpc.insecure_channel(paths_server.target) as channel:
        yield tokenizer_pb2_grpc.TokenizerServiceStub(channel)


def info(stub: tokenizer_pb2_grpc.TokenizerServiceStub, model: str) -> tokenizer_pb2.GetTokenizerInfoResponse:
    return stub.GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest(model=model), timeout=60)


def listed(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> list[str]:
    return [t.model for t in stub.ListTokenizers(tokenizer_pb2.ListTokenizersRequest(), timeout=30).tokenizers]


def refused(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    return caught.value.code(), caught.value.details() or ""


# -- tokenizer: one name per directory, a bounded cache ----------------------------------------------------------


def test_every_spelling_of_a_directory_is_one_model(stub: Any, model_root: Path) -> None:
    # Finding 3: each spelling used to be loaded and cached (and listed) as a model of its own, for good.
    spellings = [str(model_root) + "/." * i + "/m1" for i in range(20)]
    spellings += ["./" * i + "m1/../m1" for i in range(1, 21)]
    assert {info(stub, s).model for s in spellings} == {"./m1"}
    names = listed(stub)
    assert "./m1" in names and len(names) == len(set(names))
    assert set(names) - {DEFAULT_MODEL, "tiny"} <= {"./m1", "./m2", "./m3"}  # one entry per directory
    assert info(stub, "./m1").context_window == 512


def test_a_configured_models_directory_is_served_under_its_configured_name(stub: Any, model_root: Path) -> None:
    for spelling in ("./configured", str(model_root / "configured"), "m1/../configured/."):
        assert info(stub, spelling).model == "tiny"
    assert listed(stub).count("tiny") == 1


def test_models_named_by_path_are_evicted_least_recently_used_configured_ones_never(stub: Any) -> None:
    for name in ("./m1", "./m2", "./m1", "./m3"):  # room for two: m2 is the least recently used
        info(stub, name)
    assert sorted(listed(stub)) == sorted([DEFAULT_MODEL, "tiny", "./m1", "./m3"])
    assert info(stub, "m2/.").model == "./m2"  # loaded again on demand
    assert sorted(listed(stub)) == sorted([DEFAULT_MODEL, "tiny", "./m2", "./m3"])


# -- tokenizer: containment before existence, no OSError, no server path -------------------------------------------


def test_outside_the_roots_is_denied_the_same_whether_or_not_it_exists(
    stub: Any, model_root: Path, default_model_dir: Path
) -> None:
    answers = set()
    for path in (str(default_model_dir), str(default_model_dir) + "-absent", "../m1", "../absent"):
        code, details = refused(stub.GetTokenizerInfo, tokenizer_pb2.GetTokenizerInfoRequest(model=path))
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        answers.add(details.replace(quote(path), "<path>"))
    assert answers == {"model: <path> is outside the directories this server allows (GENLOOM_MODEL_ROOTS)"}


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("/" + LONG, grpc.StatusCode.PERMISSION_DENIED),  # outside the roots: nothing is looked up
        ("./" + LONG, grpc.StatusCode.INVALID_ARGUMENT),  # inside: the name is too long
        ("m1/" + LONG + "/x", grpc.StatusCode.INVALID_ARGUMENT),
        (LONG, grpc.StatusCode.NOT_FOUND),  # no '/': a model name, and no such model
        ("./" + "x/" * 3000, grpc.StatusCode.INVALID_ARGUMENT),  # over any path length limit
        ("./absent", grpc.StatusCode.NOT_FOUND),
        ("./m1/tokenizer.json", grpc.StatusCode.INVALID_ARGUMENT),  # a file, not a model directory
        ("./broken", grpc.StatusCode.INVALID_ARGUMENT),  # a model directory whose tokenizer does not load
        (".", grpc.StatusCode.NOT_FOUND),  # the root itself: no model in it
    ],
)
def test_unusable_model_paths_are_client_errors_with_no_server_path(
    stub: Any, model_root: Path, model: str, code: grpc.StatusCode
) -> None:
    # Finding 4: an over-long name raised an uncaught OSError (INTERNAL).
    request = tokenizer_pb2.CountTokensRequest(model=model, inputs=[tokenizer_pb2.TokenizerInput(text="hi")])
    got, details = refused(stub.CountTokens, request)
    assert got == code, details
    assert str(model_root) not in details and len(details) < 500


def test_model_paths_are_off_by_default(tokenizer_server: ServerThread, model_root: Path) -> None:
    with grpc.insecure_channel(tokenizer_server.target) as channel:
        default = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        for model in ("/" + LONG, str(model_root / "m1"), "./m1"):
            code, details = refused(default.GetTokenizerInfo, tokenizer_pb2.GetTokenizerInfoRequest(model=model))
            assert code == grpc.StatusCode.NOT_FOUND and "GENLOOM_ALLOW_MODEL_PATHS is off" in details


def test_registry_refusals(default_model_dir: Path, model_root: Path) -> None:
    registry = ModelRegistry(model_settings(default_model_dir, model_root))
    with pytest.raises(PermissionDenied, match=r"^spec\.base_model: "):
        registry.resolve("/" + LONG, field="spec.base_model")
    with pytest.raises(InvalidArgument):
        registry.resolve("./" + LONG)
    assert registry.resolve("./m2/../m2").path == model_root / "m2"
    broken_alias = ModelRegistry(model_settings(default_model_dir, model_root, models=f"gone={model_root}/gone"))
    with pytest.raises(NotFound) as caught:
        broken_alias.resolve("gone")
    assert str(model_root) not in caught.value.message  # the operator's directory goes to the log only


# -- CreateJob's base model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("allow", [False, True])
def test_create_job_with_an_over_long_base_model_path(
    default_model_dir: Path, model_root: Path, tmp_path: Path, allow: bool
) -> None:
    models = model_settings(
        default_model_dir, model_root, allow_model_paths=allow, redis_url="redis://127.0.0.1:6379/11"
    )
    server = start_server([FineTuningServicer(models, FinetuneSettings(artifact_root=tmp_path, queue="paths-test"))])
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.target) as channel:
            ft = finetune_pb2_grpc.FineTuningServiceStub(channel)
            spec = finetune_pb2.JobSpec(
                base_model="/" + LONG,
                training_data=finetune_pb2.TrainingDataSource(jsonl=b'{"prompt": "a", "completion": "b"}\n'),
                suffix="paths",
            )
            code, details = refused(ft.CreateJob, finetune_pb2.CreateJobRequest(spec=spec))
    finally:
        server.stop()
    assert code == (grpc.StatusCode.PERMISSION_DENIED if allow else grpc.StatusCode.NOT_FOUND), details
    assert len(details) < 500


# -- LoadAdapter --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dirs(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(GENLOOM_ADAPTER_ROOTS with a LoRA adapter "lora" and an empty directory "empty", a valid adapter outside)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    root = tmp_path_factory.mktemp("adapter-root")
    outside = tmp_path_factory.mktemp("adapter-outside")
    peft_model.save_pretrained(str(root / "lora"))
    shutil.copytree(root / "lora", outside / "lora")
    (root / "empty").mkdir()
    return root, outside


@pytest_asyncio.fixture(scope="module")
async def adapter_servers(
    hf_engine: Any, default_model_dir: Path, adapter_dirs: tuple[Path, Path]
) -> AsyncIterator[dict[str, inference_pb2_grpc.InferenceServiceStub]]:
    """Inference on the shared hf engine: "default" with default settings, "roots" with the adapter root."""
    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    servers, channels, stubs = [], [], {}
    for key, settings in (
        ("default", InferenceSettings()),
        ("roots", InferenceSettings(adapter_roots=str(adapter_dirs[0]))),
    ):
        server = GenloomServer(
            ServerSettings(port=0, shutdown_grace=1.0), [InferenceServicer(models, settings, engine=hf_engine)]
        )
        await server.start()
        await server.wait_ready()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        servers.append(server)
        channels.append(channel)
        stubs[key] = inference_pb2_grpc.InferenceServiceStub(channel)
    yield stubs
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(1.0)


async def load_refused(stub: inference_pb2_grpc.InferenceServiceStub, path: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.LoadAdapter(inference_pb2.LoadAdapterRequest(name="refused", path=path), timeout=60)
    return caught.value.code(), caught.value.details() or ""


async def test_load_adapter_by_path_is_off_by_default(
    adapter_servers: dict[str, Any], adapter_dirs: tuple[Path, Path]
) -> None:
    root, outside = adapter_dirs
    answers = set()
    for path in (str(root / "lora"), str(outside / "lora"), "lora", "/absent", "/" + LONG):
        code, details = await load_refused(adapter_servers["default"], path)
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        answers.add(details)
    assert answers == {"path: paths on the server are not allowed here: set GENLOOM_ADAPTER_ROOTS"}


async def test_load_adapter_outside_the_roots_is_denied_the_same_whether_or_not_it_exists(
    adapter_servers: dict[str, Any], adapter_dirs: tuple[Path, Path]
) -> None:
    outside = adapter_dirs[1]
    answers = set()
    for path in (str(outside / "lora"), str(outside / "absent"), "../" + outside.name + "/lora", "/" + LONG):
        code, details = await load_refused(adapter_servers["roots"], path)
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        answers.add(details.replace(quote(path), "<path>"))
    assert answers == {"path: <path> is outside the directories this server allows (GENLOOM_ADAPTER_ROOTS)"}


@pytest.mark.parametrize(
    ("path", "code", "fragment"),
    [
        ("absent", grpc.StatusCode.NOT_FOUND, "'absent' does not exist"),
        ("./" + LONG, grpc.StatusCode.INVALID_ARGUMENT, "File name too long"),
        ("empty", grpc.StatusCode.INVALID_ARGUMENT, "adapter path 'empty' has no adapter_config.json"),
        ("lora/adapter_config.json", grpc.StatusCode.INVALID_ARGUMENT, "is not a directory"),
    ],
)
async def test_unusable_adapter_paths_name_the_clients_path_only(
    adapter_servers: dict[str, Any], adapter_dirs: tuple[Path, Path], path: str, code: grpc.StatusCode, fragment: str
) -> None:
    got, details = await load_refused(adapter_servers["roots"], path)
    assert got == code and fragment in details, details
    assert str(adapter_dirs[0]) not in details  # the root's location is never shown


async def test_relative_adapter_path_loads_from_the_first_root(adapter_servers: dict[str, Any]) -> None:
    stub = adapter_servers["roots"]
    loaded = await stub.LoadAdapter(inference_pb2.LoadAdapterRequest(name="rooted", path="./lora"), timeout=120)
    try:
        assert (loaded.adapter.name, loaded.adapter.rank) == ("rooted", 4)
        assert loaded.adapter.path == "./lora"  # as the client gave it: no server path in the answer
        listed = await stub.ListAdapters(inference_pb2.ListAdaptersRequest(), timeout=30)
        assert [(a.name, a.path) for a in listed.adapters] == [("rooted", "./lora")]
    finally:
        await stub.UnloadAdapter(inference_pb2.UnloadAdapterRequest(name="rooted"), timeout=60)


async def test_concurrent_first_requests_for_spellings_of_one_directory_load_it_once(
    default_model_dir: Path, model_root: Path
) -> None:
    loads: list[str] = []

    def counting_loader(spec: ModelSpec, max_model_len: int) -> LoadedTokenizer:
        loads.append(spec.name)
        return load_tokenizer(spec, max_model_len)

    store = TokenizerStore(ModelRegistry(model_settings(default_model_dir, model_root)), loader=counting_loader)
    try:
        spellings = [f"{model_root}{'/.' * i}/m2" for i in range(10)] + ["./m2", "m1/../m2"]
        loaded = await asyncio.gather(*(store.get(s) for s in spellings))
        assert {t.name for t in loaded} == {"./m2"} and loads == ["./m2"]
        with pytest.raises(InvalidArgument):  # a failed load leaves nothing behind, and is tried again
            await store.get("./broken")
        with pytest.raises(InvalidArgument):
            await store.get("broken/.")
        assert loads == ["./m2", "./broken", "./broken"]
        assert [t.name for t in store.loaded()] == ["./m2"]
    finally:
        await store.close()


async def test_callers_sharing_a_failed_load_each_see_their_own_spelling_and_field(
    default_model_dir: Path, model_root: Path
) -> None:
    # Review finding 12: the shared load built its refusal from the first caller's spelling and field, so every
    # concurrent caller was shown another client's input.
    resolved = 0
    release = threading.Event()

    class CountingRegistry(ModelRegistry):
        def resolve(self, name: str, field: str = "model") -> ModelSpec:
            nonlocal resolved
            spec = super().resolve(name, field)
            resolved += 1
            return spec

    def held_loader(spec: ModelSpec, max_model_len: int) -> LoadedTokenizer:
        release.wait(60)  # until every caller has joined this load
        return load_tokenizer(spec, max_model_len)

    store = TokenizerStore(CountingRegistry(model_settings(default_model_dir, model_root)), loader=held_loader)
    callers = [("./broken", "model"), ("broken/.", "spec.base_model"), (f"{model_root}/m1/../broken", "items[3].model")]
    try:
        tasks = [asyncio.create_task(store.get(spelling, field)) for spelling, field in callers]
        while resolved < len(callers):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # each resumes from its resolve and joins the load under way
        release.set()
        errors = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        release.set()
        await store.close()
    for (spelling, field), err in zip(callers, errors, strict=True):
        assert isinstance(err, InvalidArgument), err
        assert err.violations[0].field == field
        assert err.message == f"{field}: model path {quote(spelling)} holds no tokenizer this server can load"


# -- a default model configured as a directory is served under the directory's name (review finding 11) ----------


def test_a_default_model_directory_is_named_after_the_directory(default_model_dir: Path, model_root: Path) -> None:
    directory = model_root / "m1"
    for allow in (False, True):
        for spelling in (str(directory), str(directory) + "/", f"{model_root}/m2/../m1"):
            registry = ModelRegistry(
                model_settings(default_model_dir, model_root, model=spelling, allow_model_paths=allow)
            )
            assert registry.default_name == "m1" and registry.configured_names() == ["m1", "tiny"]
            for requested in ("", "m1", spelling):  # the operator's own spelling stays a way to ask for it
                spec = registry.resolve(requested)
                assert spec.name == "m1" and spec.path.resolve() == directory, requested
                assert registry.name_of(requested) == "m1"
            with pytest.raises(NotFound) as caught:
                registry.resolve("gpt-5")
            assert caught.value.message.endswith("known models: m1, smollm2-135m-instruct, tiny")
    # A configured name for the same directory wins; a name already taken by another model is the operator's to fix.
    named = ModelRegistry(model_settings(default_model_dir, model_root, model=str(model_root / "configured")))
    assert named.default_name == "tiny" and named.resolve("").name == "tiny"
    with pytest.raises(SettingsError, match=r"GENLOOM_MODEL=.* would be served as 'm1', which is already another"):
        ModelRegistry(model_settings(default_model_dir, model_root, model=str(directory), models=f"m1={model_root}/m2"))


@pytest.fixture(scope="module")
def served_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding "mymodel": the default model's files, linked (the shared hf engine serves its weights)."""
    directory = tmp_path_factory.mktemp("served-root") / "mymodel"
    directory.mkdir()
    for file in default_model_dir.iterdir():
        (directory / file.name).symlink_to(file)
    return directory


@pytest.mark.parametrize("allow", [False, True])
async def test_a_default_model_directory_is_served_by_name_never_by_path(
    hf_engine: Any, default_model_dir: Path, served_dir: Path, allow: bool
) -> None:
    # Review finding 11: GENLOOM_MODEL=/srv/.../mymodel made the path the model's name, shown by ListModels,
    # GetModelInfo, ListTokenizers and every NOT_FOUND ("this server serves '/srv/...'").
    root = served_dir.parent
    models = ModelSettings(
        model=str(served_dir),
        model_cache=default_model_dir.parent,
        allow_model_paths=allow,
        model_roots=str(root),
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
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        listed_models = (await inference.ListModels(inference_pb2.ListModelsRequest(), timeout=30)).models
        assert [(m.name, m.is_default) for m in listed_models] == [("mymodel", True)]
        tokenizers = (await tokenizer.ListTokenizers(tokenizer_pb2.ListTokenizersRequest(), timeout=30)).tokenizers
        assert [(t.model, t.is_default) for t in tokenizers] == [("mymodel", True)]
        # Every way to ask for it: the default, its name, GENLOOM_MODEL's own value, and (paths on) other spellings.
        spellings = ["", "mymodel", str(served_dir)] + (["./mymodel", f"{root}/./mymodel/"] if allow else [])
        for spelling in spellings:
            shown = await inference.GetModelInfo(inference_pb2.GetModelInfoRequest(model=spelling), timeout=30)
            assert (shown.name, shown.is_default) == ("mymodel", True), spelling
            got = await tokenizer.GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest(model=spelling), timeout=60)
            assert got.model == "mymodel", spelling
            generated = await inference.Generate(
                inference_pb2.GenerateRequest(
                    model=common_pb2.ModelRef(model=spelling),
                    prompt=inference_pb2.Prompt(text="Hello"),
                    sampling=inference_pb2.SamplingParams(max_new_tokens=1),
                ),
                timeout=120,
            )
            assert generated.model.model == "mymodel", spelling
        # Other names and paths are still refused, and no answer names the server's directory.
        refusals = [("other", grpc.StatusCode.NOT_FOUND)]
        if allow:  # a model directory outside the roots
            refusals.append((str(default_model_dir), grpc.StatusCode.PERMISSION_DENIED))
        else:  # any path but GENLOOM_MODEL's own value is a name this server does not serve
            refusals += [("./mymodel", grpc.StatusCode.NOT_FOUND), (f"{root}/./mymodel", grpc.StatusCode.NOT_FOUND)]
        for spelling, code in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await inference.GetModelInfo(inference_pb2.GetModelInfoRequest(model=spelling), timeout=30)
            details = caught.value.details() or ""
            assert caught.value.code() == code, details
            shown = details.replace(quote(spelling), "<model>")  # the client's own spelling may be echoed
            assert str(root) not in shown and "/mymodel" not in shown, details
            if code == grpc.StatusCode.NOT_FOUND:
                assert details.endswith("this server serves 'mymodel'"), details
    finally:
        await channel.close()
        await server.stop(1.0)

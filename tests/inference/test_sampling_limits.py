"""Sampling values an engine can't compute with are refused or made safe in one place (services/inference/
sampling.py), and the hf step loop survives a numerical failure in one row: regression tests for issue 12's
"one request kills inference for good" (temperature or repetition_penalty 1e-45 killed the step thread), the
unknown TruncationSide values Generate/Score accepted and Abort's unbounded request id.

Server tests run the real inference service on port 0 over the session's hf engine (the real default model).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.finetune.spec import check_job_spec
from genloom.services.inference.engine import EngineRequest, SamplingError, SamplingOptions
from genloom.services.inference.sampling import (
    MAX_STOP_TOKEN_IDS,
    SamplingLimits,
    check_sampling,
    check_vocabulary,
    effective_temperature,
    option_problems,
    sampling_options,
)
from genloom.services.inference.servicer import InferenceServicer
from genloom.services.inference.settings import InferenceSettings
from genloom.services.server.app import GenloomServer
from genloom.services.server.conversation import conversation_messages
from genloom.services.server.errors import InvalidArgument
from genloom.services.server.settings import ModelSettings, ServerSettings
from genloom.v1 import common_pb2, finetune_pb2, inference_pb2, inference_pb2_grpc

DEFAULT_MODEL = "smollm2-135m-instruct"
LIMITS = SamplingLimits(default_max_new_tokens=256, vocab_size=1000, max_logprobs=20, max_stop_sequences=16)
NAN, INF = math.nan, math.inf


def params(**fields: Any) -> inference_pb2.SamplingParams:
    return inference_pb2.SamplingParams(**fields)


def fields_of(violations: Any) -> list[str]:
    return [v.field for v in violations]


# -- the validator --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        *(("temperature", v) for v in (NAN, INF, -INF, -1e-45, -1.0, 2.5, 3.4e38)),
        *(("top_p", v) for v in (NAN, INF, -INF, -1e-45, -0.5, 1.5)),
        *(("repetition_penalty", v) for v in (NAN, INF, -INF, 1e-45, 1e-38, 0.005, -1.0, 2.5, 3.4e38)),
    ],
)
def test_unusable_values_are_refused_with_their_field(name: str, value: float) -> None:
    violations = check_sampling(params(**{name: value}), LIMITS)
    assert fields_of(violations) == [f"sampling.{name}"]
    assert len(violations[0].description) < 120  # a short number, whatever was sent
    with pytest.raises(InvalidArgument) as err:
        sampling_options(params(**{name: value}), LIMITS)
    assert fields_of(err.value.violations) == [f"sampling.{name}"]


@pytest.mark.parametrize(
    ("sent", "used"),
    [
        (1e-45, 0.0),  # the value that killed the hf engine: greedy now
        (5e-324, 0.0),  # a double subnormal: float32 makes it 0
        (1e-38, 0.0),
        (-0.0, 0.0),
        (9e-6, 0.0),
        (1e-5, 0.01),  # not below the threshold (compared as float32): sampled, at vLLM's floor
        (0.005, 0.01),
        (0.01, 0.01),
        (0.7, 0.7),
        (2.0, 2.0),
    ],
)
def test_temperature_as_every_engine_uses_it(sent: float, used: float) -> None:
    options = sampling_options(params(temperature=sent), LIMITS)
    assert options.temperature == pytest.approx(used, rel=1e-6)
    assert math.copysign(1.0, options.temperature) == 1.0
    assert options.greedy == (used == 0.0)


def test_defaults_negative_zero_and_boundaries() -> None:
    options = sampling_options(params(), LIMITS)
    assert (options.temperature, options.top_p, options.repetition_penalty) == (1.0, 1.0, 1.0)
    zeros = sampling_options(params(top_p=-0.0, repetition_penalty=-0.0), LIMITS)
    assert (zeros.top_p, zeros.repetition_penalty) == (1.0, 1.0)  # -0.0 is 0: the defaults
    edges = sampling_options(params(top_p=1e-45, repetition_penalty=0.01, top_k=1000, logprobs=20), LIMITS)
    assert edges.top_p > 0 and edges.repetition_penalty == pytest.approx(0.01)
    assert sampling_options(params(repetition_penalty=2.0, temperature=2.0), LIMITS).repetition_penalty == 2.0


def test_vocabulary_logprobs_and_lengths() -> None:
    bad = check_sampling(params(top_k=4294967295, stop_token_ids=[999, 1000], logprobs=21, min_new_tokens=257), LIMITS)
    assert fields_of(bad) == [
        "sampling.top_k",
        "sampling.stop_token_ids[1]",
        "sampling.logprobs",
        "sampling.min_new_tokens",
    ]
    assert check_sampling(params(max_new_tokens=300, min_new_tokens=257), LIMITS) == []
    assert fields_of(check_sampling(params(stop=["", "x" * 257, "ok"]), LIMITS)) == [
        "sampling.stop[0]",
        "sampling.stop[1]",
    ]
    # Without a vocabulary (the task service before it knows the model) those checks wait for it.
    assert check_sampling(params(top_k=4294967295, stop_token_ids=[10**6]), SamplingLimits()) == []


def test_field_prefix_and_every_violation_at_once() -> None:
    bad = check_sampling(
        params(temperature=NAN, top_p=-1, repetition_penalty=1e-45), LIMITS, "configurations[2].sampling"
    )
    assert fields_of(bad) == [
        "configurations[2].sampling.temperature",
        "configurations[2].sampling.top_p",
        "configurations[2].sampling.repetition_penalty",
    ]


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(temperature=NAN),
        SamplingOptions(temperature=-1.0),
        SamplingOptions(top_p=0.0),
        SamplingOptions(top_p=INF),
        SamplingOptions(repetition_penalty=1e-45),
        SamplingOptions(repetition_penalty=NAN),
        SamplingOptions(top_k=-1),
        SamplingOptions(top_k=1001),
        SamplingOptions(max_new_tokens=0),
        SamplingOptions(min_new_tokens=-1),
        SamplingOptions(logprobs=-1),
        SamplingOptions(seed=-1),
        SamplingOptions(seed=2**32),
        SamplingOptions(stop_token_ids=(-1,)),
    ],
)
def test_engines_refuse_options_built_in_process(options: SamplingOptions) -> None:
    assert option_problems(options, vocab_size=1000)


def test_engines_accept_sane_options() -> None:
    assert option_problems(SamplingOptions(), vocab_size=1000) == []
    assert option_problems(SamplingOptions(temperature=1e-45, seed=2**32 - 1, top_k=1000), vocab_size=1000) == []
    assert effective_temperature(1e-45) == 0.0


# -- a million entries: counts first, never a violation per entry over the limit ---------------------------------

MILLION = 1_000_000


def test_a_million_stop_token_ids_give_one_violation() -> None:
    """Over the limit only the count is reported: the entries are not looked at (before, one violation per
    out-of-vocabulary id was built: 1.3 s and ~340 MB for a 3 MB request)."""
    huge = params(stop_token_ids=[10**6] * MILLION)
    assert fields_of(check_sampling(huge, LIMITS)) == ["sampling.stop_token_ids"]
    assert check_vocabulary(huge, 1000) == []
    # At the limit every entry is still checked.
    at_limit = params(stop_token_ids=[10**6] * MAX_STOP_TOKEN_IDS)
    assert len(check_sampling(at_limit, LIMITS)) == MAX_STOP_TOKEN_IDS


def test_a_million_stop_sequences_give_one_violation() -> None:
    huge = params(stop=[""] * MILLION)
    assert fields_of(check_sampling(huge, LIMITS)) == ["sampling.stop"]
    # The task service leaves the count to the inference service, and checks no entry of an oversized list.
    assert check_sampling(huge, SamplingLimits(default_max_new_tokens=None)) == []
    assert fields_of(check_sampling(params(stop=["", "ok"]), SamplingLimits())) == ["sampling.stop[0]"]


def test_other_validators_bound_their_violations() -> None:
    """The same pattern elsewhere: a conversation's roles and a fine-tuning job's metadata."""
    conversation = common_pb2.Conversation(messages=[common_pb2.ChatMessage(content="x")] * 200_000)  # role unset
    with pytest.raises(InvalidArgument) as err:
        conversation_messages(conversation, "prompt.conversation")
    assert len(err.value.violations) == 20
    assert "(and 199980 more)" in err.value.message
    spec = finetune_pb2.JobSpec(metadata={f"{'k' * 70}{i}": "v" for i in range(100_000)})
    violations = [v for v in check_job_spec(spec, FinetuneSettings()) if v.field.startswith("spec.metadata")]
    assert [v.field for v in violations] == ["spec.metadata"]


# -- the real service -------------------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def served(hf_engine: Any, default_model_dir: Path) -> AsyncIterator[SimpleNamespace]:
    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    servicer = InferenceServicer(models, InferenceSettings(), engine=hf_engine)
    server = GenloomServer(ServerSettings(port=0, shutdown_grace=1.0), [servicer])
    await server.start()
    await server.wait_ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield SimpleNamespace(
        stub=inference_pb2_grpc.InferenceServiceStub(channel),
        health=health_pb2_grpc.HealthStub(channel),
        engine=hf_engine,
    )
    await channel.close()
    await server.stop(1.0)


def generate_request(text: str = "Hi", **sampling: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(prompt=inference_pb2.Prompt(text=text), sampling=params(**sampling))


def bad_request(err: grpc.aio.AioRpcError) -> list[str]:
    from google.rpc import error_details_pb2, status_pb2

    fields: list[str] = []
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    fields += [v.field for v in bad.field_violations]
    return fields


async def assert_still_serving(served: SimpleNamespace) -> None:
    """Health SERVING and a normal Generate answers: nothing a request did outlived it."""
    await served.engine.check_health()
    check = health_pb2.HealthCheckRequest(service="genloom.v1.InferenceService")
    assert (await served.health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
    response = await served.stub.Generate(generate_request(max_new_tokens=2, temperature=0))
    assert len(response.token_ids) >= 1


async def test_tiny_temperatures_decode_greedily(served: SimpleNamespace) -> None:
    greedy = await served.stub.Generate(generate_request(max_new_tokens=6, temperature=0, ignore_eos=True))
    for tiny in (1e-45, 1e-38, 5e-324, 9e-6):
        response = await served.stub.Generate(generate_request(max_new_tokens=6, temperature=tiny, ignore_eos=True))
        assert list(response.token_ids) == list(greedy.token_ids), tiny
        assert response.text == greedy.text
    await assert_still_serving(served)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("repetition_penalty", 1e-45),
        ("repetition_penalty", INF),
        ("temperature", NAN),
        ("temperature", INF),
        ("temperature", -INF),
        ("top_p", NAN),
        ("top_p", -1e-45),
    ],
)
async def test_unusable_sampling_is_invalid_argument(served: SimpleNamespace, name: str, value: float) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Generate(generate_request(max_new_tokens=2, **{name: value}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err.value) == [f"sampling.{name}"]
    stream = served.stub.GenerateStream(
        inference_pb2.GenerateStreamRequest(prompt=inference_pb2.Prompt(text="Hi"), sampling=params(**{name: value}))
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await assert_still_serving(served)


@pytest.mark.parametrize("side", [99, -1])
async def test_unknown_truncation_side_is_refused(served: SimpleNamespace, side: int) -> None:
    prompt = inference_pb2.Prompt(text="Hi")
    calls: list[Callable[[], Any]] = [
        lambda: served.stub.Generate(inference_pb2.GenerateRequest(prompt=prompt, truncation=side)),
        lambda: served.stub.Score(
            inference_pb2.ScoreRequest(
                items=[inference_pb2.ScoreItem(prompt=prompt, candidates=[" yes"])], truncation=side
            )
        ),
    ]

    async def stream() -> None:
        async for _ in served.stub.GenerateStream(inference_pb2.GenerateStreamRequest(prompt=prompt, truncation=side)):
            pass

    calls.append(stream)
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(err.value) == ["truncation"]
    ok = await served.stub.Generate(
        inference_pb2.GenerateRequest(
            prompt=prompt, truncation=common_pb2.TRUNCATION_SIDE_LEFT, sampling=params(max_new_tokens=1)
        )
    )
    assert len(ok.token_ids) == 1


async def test_abort_refuses_ids_no_generation_can_have(served: SimpleNamespace) -> None:
    for bad in ("a" * 1_000_000, "a" * 129, "no spaces", "ünicode"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await served.stub.Abort(inference_pb2.AbortRequest(request_id=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(err.value) == ["request_id"]
        assert len(err.value.details() or "") < 300  # the id is quoted, not echoed
    answer = await served.stub.Abort(inference_pb2.AbortRequest(request_id="a" * 128))
    assert answer.aborted is False


# -- the hf step loop under a numerical fault -------------------------------------------------------------------------


async def generate_pair(served: SimpleNamespace, poison_id: str) -> tuple[Any, BaseException | Any, Any]:
    """A healthy and a poisoned request in one batch, plus the healthy one alone for reference."""
    healthy = generate_request("Name three colours.", max_new_tokens=16, temperature=0, ignore_eos=True)
    alone = await served.stub.Generate(healthy)
    poisoned = generate_request("Hi", max_new_tokens=16, ignore_eos=True, seed=7)
    poisoned.request_id = poison_id
    healthy.request_id = f"healthy-{poison_id}"
    results = await asyncio.gather(
        served.stub.Generate(healthy), served.stub.Generate(poisoned), return_exceptions=True
    )
    return alone, results[1], results[0]


async def test_non_finite_logits_fail_that_request_alone(served: SimpleNamespace) -> None:
    """The model's logits for one row turn NaN mid-batch (injected by wrapping the real engine's sampling step):
    that request ends INTERNAL naming its id; its neighbour finishes with the tokens it gets alone."""
    engine = served.engine
    real = engine._sample_and_emit
    batch_sizes: list[int] = []

    def faulty(rows: list[Any], logits: torch.Tensor) -> torch.Tensor:
        for i, row in enumerate(rows):
            if row.request.request_id == "poison-logits" and row.num_generated >= 2:
                logits = logits.clone()
                logits[i] = math.nan
                batch_sizes.append(len(rows))
        return real(rows, logits)

    engine._sample_and_emit = faulty
    try:
        alone, poisoned, healthy = await generate_pair(served, "poison-logits")
    finally:
        del engine._sample_and_emit  # back to the class's method
    assert batch_sizes and batch_sizes[0] == 2, "the fault must hit a row that shares its batch"
    assert isinstance(poisoned, grpc.aio.AioRpcError)
    assert poisoned.code() == grpc.StatusCode.INTERNAL
    assert "poison-logits" in (poisoned.details() or "")
    assert not isinstance(healthy, BaseException), healthy
    assert list(healthy.token_ids) == list(alone.token_ids)
    await assert_still_serving(served)


async def test_scores_broken_by_parameters_fail_as_invalid_argument(served: SimpleNamespace) -> None:
    """A processor with a value validation refuses (repetition_penalty 1e-45), slipped into one request's row:
    that request alone ends INVALID_ARGUMENT, the step thread lives and the neighbour finishes."""
    engine = served.engine
    real = engine._prepare

    def prepare(req: Any) -> None:
        real(req)
        if req.request.request_id == "poison-params":
            req.processors.append(RepetitionPenaltyLogitsProcessor(1e-45))

    engine._prepare = prepare
    try:
        alone, poisoned, healthy = await generate_pair(served, "poison-params")
    finally:
        del engine._prepare
    assert isinstance(poisoned, grpc.aio.AioRpcError)
    assert poisoned.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(poisoned) == ["sampling"]  # a BadRequest naming the field, as every INVALID_ARGUMENT has
    assert "poison-params" in (poisoned.details() or "")
    assert not isinstance(healthy, BaseException), healthy
    assert list(healthy.token_ids) == list(alone.token_ids)
    await assert_still_serving(served)


# -- vLLM takes whatever passes ---------------------------------------------------------------------------------------

EXTREMES = [
    {"temperature": 1e-45},
    {"temperature": 1e-5},
    {"temperature": 2.0, "top_p": 1e-45},
    {"repetition_penalty": 0.01},
    {"repetition_penalty": 2.0, "temperature": 0.01},
    {"top_k": -1, "seed": 2**32 - 1},  # top_k -1 stands for "the vocabulary size" below
    {"logprobs": 20, "min_new_tokens": 4},
]


async def test_vllm_accepts_every_value_that_passes(vllm_engine: Any) -> None:
    """The extremes of every range run in vLLM without an error (before, vLLM sampled a tiny temperature at 0.01
    where hf decoded greedily, and took a repetition_penalty of 1e-45)."""
    from genloom.services.inference.engine import EngineRequest

    info = vllm_engine.info()
    limits = SamplingLimits(default_max_new_tokens=4, vocab_size=info.vocab_size, max_logprobs=20)
    prompt = list(range(100, 110))

    async def run(request_id: str, **fields: Any) -> list[int]:
        if fields.get("top_k") == -1:
            fields["top_k"] = info.vocab_size
        options = sampling_options(params(max_new_tokens=4, ignore_eos=True, **fields), limits)
        tokens: list[int] = []
        async for output in vllm_engine.generate(EngineRequest(request_id, prompt, options)):
            tokens += output.token_ids
        return tokens

    greedy = await run("greedy", temperature=0)
    assert await run("tiny", temperature=1e-45) == greedy
    for i, fields in enumerate(EXTREMES):
        assert len(await run(f"extreme-{i}", **fields)) == 4, fields


# -- huge repeated fields over the wire, and the engines' own refusals ------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("stop_token_ids", [10**6] * MILLION, "sampling.stop_token_ids"),
        ("stop", [""] * MILLION, "sampling.stop"),
    ],
)
async def test_a_million_entries_are_refused_at_once(
    served: SimpleNamespace, field: str, value: list[Any], expected: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Generate(generate_request(**{field: value}), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = bad_request(err.value)
    assert fields == [expected] and len(fields) <= 20
    assert len(err.value.details() or "") < 500
    await assert_still_serving(served)


async def test_the_hf_engine_refuses_sampling_with_a_sampling_error(hf_engine: Any) -> None:
    request = EngineRequest("engine-check", [1, 2, 3], SamplingOptions(repetition_penalty=1e-45))
    with pytest.raises(SamplingError):
        async for _ in hf_engine.generate(request):
            pass


@pytest.mark.parametrize(
    "fault",
    [
        lambda: torch.AcceleratorError("CUDA error: device-side assert triggered"),
        lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
    ],
)
async def test_a_device_error_in_prefill_kills_the_engine(
    default_model_dir: Path, fault: Callable[[], Exception]
) -> None:
    """A sticky device error (no GPU here: raised in place of the forward pass) must end the step thread, so that
    health goes NOT_SERVING and the pool restarts the engine; before, every later prefill failed INTERNAL while
    health said SERVING. A fresh engine: the session's shared one must survive."""
    from genloom.services.inference.engine import EngineDeadError
    from genloom.services.inference.engines.hf import HFEngine

    engine = HFEngine(default_model_dir, DEFAULT_MODEL, InferenceSettings(engine="hf"))
    await engine.start()
    try:

        def broken(rows: Any, **inputs: Any) -> Any:
            raise fault()

        engine._forward = broken
        request = EngineRequest("device-fault", [1, 2, 3], SamplingOptions(max_new_tokens=2))
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate(request):
                pass
        with pytest.raises(EngineDeadError):
            await engine.check_health()
    finally:
        await engine.shutdown()


async def test_a_device_error_while_scoring_kills_the_engine(default_model_dir: Path) -> None:
    """The same for Score, which runs as a command of the step thread: its caller learns the engine died (the
    pool then restarts it), instead of the engine serving on with a broken device."""
    from genloom.services.inference.engine import EngineDeadError, ScoreQuery
    from genloom.services.inference.engines.hf import HFEngine

    engine = HFEngine(default_model_dir, DEFAULT_MODEL, InferenceSettings(engine="hf"))
    await engine.start()
    try:

        def broken(rows: Any, **inputs: Any) -> Any:
            raise torch.AcceleratorError("CUDA error: device-side assert triggered")

        engine._forward = broken
        with pytest.raises(EngineDeadError):
            await engine.score([ScoreQuery([1, 2, 3], [[4], [5, 6]])])
        with pytest.raises(EngineDeadError):
            await engine.check_health()
    finally:
        await engine.shutdown()


async def test_an_adapter_the_engine_refuses_leaks_no_engine_text(
    hf_engine: Any, default_model_dir: Path, tmp_path: Path
) -> None:
    """An adapter that passes genloom's own checks but that PEFT can't apply (its target module is not in the
    model): LoadAdapter answers a fixed message naming the client's path, not the engine's exception text (which
    can name server paths); the log keeps it."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "lora"))
    config_file = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = ["no_such_proj"]
    config_file.write_text(json.dumps(config))

    models = ModelSettings(model=DEFAULT_MODEL, model_cache=default_model_dir.parent)
    servicer = InferenceServicer(models, InferenceSettings(adapter_roots=str(tmp_path)), engine=hf_engine)
    server = GenloomServer(ServerSettings(port=0, shutdown_grace=1.0), [servicer])
    await server.start()
    await server.wait_ready()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadAdapter(inference_pb2.LoadAdapterRequest(name="refused", path="lora"), timeout=60)
    finally:
        await server.stop(1.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err.value) == ["path"]
    details = err.value.details() or ""
    assert "'lora'" in details and "could not be loaded into the engine" in details
    assert "no_such_proj" not in details and str(tmp_path) not in details

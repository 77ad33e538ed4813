"""The `vllm` engine in-process on the real default model (fp32), checked against transformers.

All tests share the session's `vllm_engine` (conftest.py); each leaves it idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genloom.services.inference.engine import (
    AdapterError,
    Engine,
    EngineError,
    EngineOutput,
    EngineRequest,
    FinishReason,
    SamplingOptions,
    ScoreQuery,
)

pytestmark = pytest.mark.slow

CHATS = [
    "Name three colours.",
    "What is 2+2? Reply with just the number.",
    "Write a haiku about the sea.",
]
SHORT_ANSWER = "Is the sky blue? Answer yes or no."  # the model answers in a few tokens, then EOS
EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.fixture(scope="module")
def model(default_model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reference_greedy(model: Any, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return [int(t) for t in out[0, len(ids) :]]


def reference_logprobs(model: Any, ids: Sequence[int]) -> torch.Tensor:
    """log_softmax of the logits at every position of `ids` (row i predicts token i + 1)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([list(ids)])).logits[0].float(), dim=-1)


_counter = 0


async def generate(
    engine: Engine, ids: Sequence[int], *, adapter: str | None = None, **sampling: Any
) -> tuple[list[int], list[EngineOutput]]:
    global _counter
    _counter += 1
    sampling.setdefault("max_new_tokens", 24)
    sampling.setdefault("temperature", 0.0)
    request = EngineRequest(f"test-{_counter}", list(ids), SamplingOptions(**sampling), adapter=adapter)
    outputs = [output async for output in engine.generate(request)]
    assert outputs and outputs[-1].finish_reason is not None
    assert all(output.finish_reason is None for output in outputs[:-1])
    return [token for output in outputs for token in output.token_ids], outputs


async def wait_idle(engine: Engine, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while engine.load() != (0, 0):
        assert loop.time() < deadline, f"engine still busy: {engine.load()}"
        await asyncio.sleep(0.02)


def test_info(vllm_engine: Engine) -> None:
    info = vllm_engine.info()
    assert (info.engine, info.dtype, info.device) == ("vllm", "float32", "cpu")
    assert (info.context_window, info.vocab_size, info.eos_token_ids) == (8192, 49152, (EOS,))
    assert info.supports_lora and info.max_lora_rank == 64
    assert vllm_engine.load() == (0, 0)


async def test_greedy_equals_transformers_in_a_batch(vllm_engine: Engine, tokenizer: Any, model: Any) -> None:
    prompts = [chat_ids(tokenizer, question) for question in CHATS]
    # Submitted together, so vLLM decodes them in one batch.
    results = await asyncio.gather(*(generate(vllm_engine, ids, max_new_tokens=32) for ids in prompts))
    for ids, (tokens, outputs) in zip(prompts, results, strict=True):
        expected = reference_greedy(model, ids, 32)
        assert tokens == expected, tokenizer.decode(tokens)
        reason = FinishReason.EOS if expected[-1] == EOS else FinishReason.LENGTH
        assert outputs[-1].finish_reason is reason
    await wait_idle(vllm_engine)


async def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(vllm_engine: Engine, tokenizer: Any) -> None:
    ids, other = chat_ids(tokenizer, CHATS[0]), chat_ids(tokenizer, CHATS[2])
    sampled = {"temperature": 1.2, "ignore_eos": True}
    first, _ = await generate(vllm_engine, ids, seed=1234, **sampled)
    second, _ = await generate(vllm_engine, ids, seed=1234, **sampled)
    batch = await asyncio.gather(
        generate(vllm_engine, other, seed=5, **sampled),
        generate(vllm_engine, ids, seed=1234, **sampled),
        generate(vllm_engine, ids, seed=99, **sampled),
        generate(vllm_engine, other, **sampled),
    )
    assert first == second == batch[1][0]
    assert batch[2][0] != first  # another seed, another sample


async def test_each_sampling_parameter_has_an_effect(vllm_engine: Engine, tokenizer: Any) -> None:
    ids = chat_ids(tokenizer, CHATS[0])
    greedy, _ = await generate(vllm_engine, ids, ignore_eos=True)
    hot = {"temperature": 1.5, "seed": 1, "ignore_eos": True}
    sampled, _ = await generate(vllm_engine, ids, **hot)
    assert sampled != greedy
    top_k_1, _ = await generate(vllm_engine, ids, top_k=1, **hot)
    assert top_k_1 == greedy
    tiny_top_p, _ = await generate(vllm_engine, ids, top_p=0.01, **hot)
    assert tiny_top_p == greedy
    penalized, _ = await generate(vllm_engine, ids, repetition_penalty=1.5, ignore_eos=True)
    assert penalized != greedy

    # A stop token ends generation right after it, and is reported.
    k = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i])
    stopped, outputs = await generate(vllm_engine, ids, stop_token_ids=(greedy[k],))
    assert stopped == greedy[: k + 1]
    assert (outputs[-1].finish_reason, outputs[-1].stop_token_id) == (FinishReason.STOP_TOKEN, greedy[k])

    short = chat_ids(tokenizer, SHORT_ANSWER)
    answer, outputs = await generate(vllm_engine, short, max_new_tokens=16)
    assert answer[-1] == EOS and len(answer) < 8 and outputs[-1].finish_reason is FinishReason.EOS
    longer, _ = await generate(vllm_engine, short, max_new_tokens=16, min_new_tokens=8)
    assert len(longer) >= 8 and EOS not in longer[:8]
    endless, outputs = await generate(vllm_engine, short, max_new_tokens=12, ignore_eos=True)
    assert len(endless) == 12 and outputs[-1].finish_reason is FinishReason.LENGTH
    await wait_idle(vllm_engine)


async def test_logprobs_are_the_raw_distribution(vllm_engine: Engine, tokenizer: Any, model: Any) -> None:
    ids = chat_ids(tokenizer, CHATS[1])
    # Sampled with temperature, top-k and a penalty: the logprobs must still be those of the raw distribution.
    cases = [
        {"temperature": 0.0, "logprobs": 3},
        {"temperature": 1.5, "top_k": 50, "repetition_penalty": 1.3, "seed": 3, "logprobs": 2, "ignore_eos": True},
    ]
    for sampling in cases:
        # A score running in the same steps must not disturb the generation's top-N.
        (tokens, outputs), _ = await asyncio.gather(
            generate(vllm_engine, ids, max_new_tokens=12, **sampling),
            vllm_engine.score([ScoreQuery(ids, [[1, 2], [3]])]),
        )
        logprobs = [entry for output in outputs for entry in output.logprobs]
        assert [entry.token_id for entry in logprobs] == tokens
        reference = reference_logprobs(model, ids + tokens)
        for i, entry in enumerate(logprobs):
            row = reference[len(ids) - 1 + i]
            assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-3)
            top_values, top_ids = row.topk(sampling["logprobs"])
            assert [token for token, _ in entry.top] == top_ids.tolist()
            assert [value for _, value in entry.top] == pytest.approx(top_values.tolist(), abs=1e-3)
    _, outputs = await generate(vllm_engine, ids, max_new_tokens=4, logprobs=0)
    assert all(entry.top == () for output in outputs for entry in output.logprobs)


async def test_cancelling_the_consumer_frees_the_request(vllm_engine: Engine, tokenizer: Any) -> None:
    ids = chat_ids(tokenizer, CHATS[0])
    long = SamplingOptions(max_new_tokens=4000, temperature=0.0, ignore_eos=True)
    first_token = asyncio.Event()

    async def consume() -> None:
        async for _ in vllm_engine.generate(EngineRequest("cancel-me", ids, long)):
            first_token.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_token.wait(), 60)
    assert vllm_engine.load() == (1, 0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await wait_idle(vllm_engine)
    assert not await vllm_engine.abort("cancel-me")

    # Closing the iterator early (a consumer that stops reading) frees it too.
    stream = vllm_engine.generate(EngineRequest("close-me", ids, long))
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    await wait_idle(vllm_engine)


async def test_abort_ends_the_stream_with_abort(vllm_engine: Engine, tokenizer: Any) -> None:
    ids = chat_ids(tokenizer, CHATS[0])
    stream = vllm_engine.generate(EngineRequest("abort-me", ids, SamplingOptions(max_new_tokens=4000, ignore_eos=True)))
    first = await anext(stream)
    assert first.token_ids and first.finish_reason is None
    assert await vllm_engine.abort("abort-me")
    rest = [output async for output in stream]
    assert rest[-1].finish_reason is FinishReason.ABORT
    assert len(first.token_ids) + sum(len(output.token_ids) for output in rest) < 4000
    await wait_idle(vllm_engine)
    assert not await vllm_engine.abort("abort-me")
    assert not await vllm_engine.abort("never-started")

    # An abort that arrives while the request is still being handed to vLLM is not lost.
    outputs: list[EngineOutput] = []

    async def consume() -> None:
        request = EngineRequest("abort-early", ids, SamplingOptions(max_new_tokens=4000, ignore_eos=True))
        outputs.extend([output async for output in vllm_engine.generate(request)])

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    assert await vllm_engine.abort("abort-early")
    await asyncio.wait_for(task, 30)
    assert outputs[-1].finish_reason is FinishReason.ABORT
    assert sum(len(output.token_ids) for output in outputs) < 100


async def test_score_equals_transformers_and_ranks_the_obvious_candidate(
    vllm_engine: Engine, tokenizer: Any, model: Any
) -> None:
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    queries = [
        ScoreQuery(
            encode("The capital of France is"),
            [encode(" Paris"), encode(" banana"), encode(" a city"), encode(" a town")],  # " a" is shared
        ),
        ScoreQuery(encode("Two plus two equals"), [encode(" four"), encode(" seventeen bananas")]),
    ]
    scores = await vllm_engine.score(queries)
    assert [len(item) for item in scores] == [4, 2]
    for query, item in zip(queries, scores, strict=True):
        for continuation, token_logprobs in zip(query.continuations, item, strict=True):
            reference = reference_logprobs(model, [*query.prompt_token_ids, *continuation])
            start = len(query.prompt_token_ids) - 1
            expected = [float(reference[start + i, token]) for i, token in enumerate(continuation)]
            assert token_logprobs == pytest.approx(expected, abs=1e-3)
    paris, banana, *_ = (sum(candidate) for candidate in scores[0])
    assert paris > banana
    with pytest.raises(EngineError):
        await vllm_engine.score([ScoreQuery(encode("Hi"), [[]])])
    await wait_idle(vllm_engine)


@pytest.fixture(scope="module")
def random_adapter(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A rank-8 LoRA on q_proj/v_proj with random (not zero) B matrices, so it visibly changes the model."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tuned = peft.get_peft_model(base, config).eval()
    path = tmp_path_factory.mktemp("random-lora")
    tuned.save_pretrained(str(path))
    return path, tuned


async def test_lora_adapter_changes_outputs(vllm_engine: Engine, tokenizer: Any, random_adapter: Any) -> None:
    path, tuned = random_adapter
    ids = chat_ids(tokenizer, CHATS[0])
    await vllm_engine.add_adapter("random", str(path))
    try:
        base, _ = await generate(vllm_engine, ids, max_new_tokens=16)
        adapted, _ = await generate(vllm_engine, ids, max_new_tokens=16, adapter="random")
        assert adapted != base
        assert adapted == reference_greedy(tuned, ids, 16)
        prompt, continuation = ids[:-3], ids[-3:]
        (with_adapter,) = await vllm_engine.score([ScoreQuery(prompt, [continuation], adapter="random")])
        (without,) = await vllm_engine.score([ScoreQuery(prompt, [continuation])])
        assert with_adapter != without
    finally:
        await vllm_engine.remove_adapter("random")
    with pytest.raises(AdapterError):
        await generate(vllm_engine, ids, adapter="random")
    with pytest.raises(AdapterError):
        await vllm_engine.remove_adapter("random")
    await wait_idle(vllm_engine)


async def test_bad_adapters_are_refused_and_the_engine_keeps_serving(
    vllm_engine: Engine, tokenizer: Any, random_adapter: Any, tmp_path: Path
) -> None:
    path, _ = random_adapter
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    wide = tmp_path / "rank-too-high"
    wide.mkdir()
    config = json.loads((path / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "r": 128}))
    (wide / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())

    for bad in (tmp_path / "missing", no_weights, corrupt, wide):
        with pytest.raises(AdapterError):
            await vllm_engine.add_adapter("bad", str(bad))
    with pytest.raises(AdapterError):
        await generate(vllm_engine, [1, 2, 3], adapter="bad")

    # A directory deleted after loading is caught per request: vLLM would die reloading it from disk.
    doomed = tmp_path / "doomed"
    shutil.copytree(path, doomed)
    await vllm_engine.add_adapter("doomed", str(doomed))
    shutil.rmtree(doomed)
    with pytest.raises(AdapterError):
        await generate(vllm_engine, [1, 2, 3], adapter="doomed")
    await vllm_engine.remove_adapter("doomed")

    await vllm_engine.check_health()
    ids = chat_ids(tokenizer, SHORT_ANSWER)
    tokens, outputs = await generate(vllm_engine, ids, max_new_tokens=8)
    assert tokens[-1] == EOS and outputs[-1].finish_reason is FinishReason.EOS
    await wait_idle(vllm_engine)


async def test_a_refused_request_raises_engine_error_and_the_engine_keeps_serving(
    vllm_engine: Engine, tokenizer: Any
) -> None:
    too_long = [100] * (vllm_engine.info().context_window + 1)
    with pytest.raises(EngineError):
        await generate(vllm_engine, too_long, max_new_tokens=4)
    with pytest.raises(EngineError):
        await generate(vllm_engine, [1, 2, 3], top_p=1.5)
    await vllm_engine.check_health()
    tokens, _ = await generate(vllm_engine, chat_ids(tokenizer, SHORT_ANSWER), max_new_tokens=8)
    assert tokens[-1] == EOS
    await wait_idle(vllm_engine)

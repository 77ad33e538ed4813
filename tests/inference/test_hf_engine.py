"""The hf engine (HFEngine) in-process on the real default model: exactness against transformers, per-request
sampling inside a continuously changing batch, cancellation, abort, scoring, LoRA adapters, health.

One engine serves the module (its requests are short: 8-32 new tokens), checked against a plain transformers
model loaded next to it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genloom.services.inference.engine import (
    AdapterError,
    EngineDeadError,
    EngineOutput,
    EngineRequest,
    FinishReason,
    SamplingOptions,
    ScoreQuery,
)
from genloom.services.inference.engines.hf import HFEngine
from genloom.services.inference.settings import InferenceSettings

MODEL = "smollm2-135m-instruct"
MAX_BATCH = 8
# Mixed on purpose: plain text and chat-templated prompts of very different lengths.
TEXTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "Hello",
    "List three colours:\n1.",
    "The quick brown fox jumps over the lazy dog. The dog",
]
NEW_TOKENS = [24, 16, 32, 20, 28, 12]
HELLO = 3  # a chat prompt the model answers with EOS after a few tokens


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def model(default_model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer: Any) -> list[list[int]]:
    out = []
    for i, text in enumerate(TEXTS):
        if i % 2:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        else:
            out.append(tokenizer(text)["input_ids"])
    return out


def hf_generate(model: Any, prompt: Sequence[int], max_new_tokens: int, **kwargs: Any) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([list(prompt)]), do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def references(model: Any, prompts: list[list[int]]) -> list[list[int]]:
    """`model.generate(do_sample=False)` for every prompt."""
    return [hf_generate(model, p, n) for p, n in zip(prompts, NEW_TOKENS, strict=True)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(default_model_dir: Path) -> AsyncIterator[HFEngine]:
    engine = HFEngine(default_model_dir, MODEL, InferenceSettings(engine="hf", max_batch_size=MAX_BATCH, max_loras=2))
    await engine.start()
    yield engine
    await engine.shutdown()


_ids = iter(range(1_000_000))


def request(prompt: Sequence[int], adapter: str | None = None, **sampling: Any) -> EngineRequest:
    sampling.setdefault("temperature", 0.0)
    return EngineRequest(f"t{next(_ids)}", list(prompt), SamplingOptions(**sampling), adapter=adapter)


async def collect(engine: HFEngine, req: EngineRequest, delay: float = 0.0) -> list[EngineOutput]:
    await asyncio.sleep(delay)
    return [output async for output in engine.generate(req)]


def tokens(outputs: list[EngineOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_info(engine: HFEngine) -> None:
    info = engine.info()
    assert (info.engine, info.model, info.dtype, info.device) == ("hf", MODEL, "float32", "cpu")
    assert info.context_window == 8192
    assert info.eos_token_ids == (2,)
    assert info.vocab_size == 49152
    assert info.supports_lora and info.max_loras == 2
    await engine.check_health()


async def test_greedy_matches_generate_alone(
    engine: HFEngine, prompts: list[list[int]], references: list[list[int]]
) -> None:
    for prompt, n, expected in zip(prompts, NEW_TOKENS, references, strict=True):
        outputs = await collect(engine, request(prompt, max_new_tokens=n))
        assert tokens(outputs) == expected
        assert all(len(o.token_ids) == 1 for o in outputs)  # streamed token by token
        assert [o.finish_reason is not None for o in outputs].count(True) == 1
        assert outputs[-1].finish_reason is (FinishReason.EOS if expected[-1] == 2 else FinishReason.LENGTH)
    assert engine.load() == (0, 0)


async def test_greedy_matches_generate_in_a_changing_batch(
    engine: HFEngine, prompts: list[list[int]], references: list[list[int]]
) -> None:
    # Greedy requests join at staggered times and leave at different lengths, next to sampled requests with
    # other parameters (their processors must not leak into the greedy rows).
    greedy = [
        collect(engine, request(p, max_new_tokens=n), delay=0.12 * i)
        for i, (p, n) in enumerate(zip(prompts, NEW_TOKENS, strict=True))
    ]
    noise = [
        collect(engine, request(prompts[1], temperature=1.3, repetition_penalty=1.3, seed=5, max_new_tokens=30)),
        collect(engine, request(prompts[4], temperature=0.8, top_k=20, min_new_tokens=10, max_new_tokens=8), 0.3),
    ]
    results = await asyncio.gather(*greedy, *noise)
    for outputs, expected in zip(results, references, strict=False):
        assert tokens(outputs) == expected
    assert engine.load() == (0, 0)


async def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine: HFEngine, prompts: list[list[int]]) -> None:
    def sampled(seed: int) -> EngineRequest:
        return request(prompts[1], temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=24, ignore_eos=True)

    alone = tokens(await collect(engine, sampled(1234)))
    others = [collect(engine, request(p, max_new_tokens=20), delay=0.05 * i) for i, p in enumerate(prompts)]
    in_batch, other_seed, *_ = await asyncio.gather(
        collect(engine, sampled(1234), delay=0.2), collect(engine, sampled(4321)), *others
    )
    assert tokens(in_batch) == alone
    assert tokens(other_seed) != alone


async def test_temperature_top_k_and_top_p(
    engine: HFEngine, prompts: list[list[int]], references: list[list[int]]
) -> None:
    prompt, n, greedy = prompts[1], NEW_TOKENS[1], references[1]
    hot = request(prompt, temperature=1.8, seed=7, max_new_tokens=n)
    cold = request(prompt, temperature=0.01, seed=7, max_new_tokens=n)
    top_k_1 = request(prompt, temperature=1.8, top_k=1, seed=7, max_new_tokens=n)
    top_p_tiny = request(prompt, temperature=1.8, top_p=1e-6, seed=7, max_new_tokens=n)
    results = await asyncio.gather(*(collect(engine, r) for r in (hot, cold, top_k_1, top_p_tiny)))
    hot_tokens, cold_tokens, top_k_tokens, top_p_tokens = (tokens(r) for r in results)
    assert hot_tokens != greedy
    assert cold_tokens == greedy
    assert top_k_tokens == greedy
    assert top_p_tokens == greedy


async def test_repetition_penalty_matches_generate(
    engine: HFEngine, model: Any, prompts: list[list[int]], references: list[list[int]]
) -> None:
    prompt = prompts[5]
    outputs = await collect(engine, request(prompt, repetition_penalty=1.5, max_new_tokens=24))
    penalized = tokens(outputs)
    assert penalized != hf_generate(model, prompt, 24)
    assert penalized == hf_generate(model, prompt, 24, repetition_penalty=1.5)


async def test_min_new_tokens_delays_eos_and_ignore_eos_runs_to_length(
    engine: HFEngine, model: Any, prompts: list[list[int]], references: list[list[int]]
) -> None:
    prompt, natural = prompts[HELLO], references[HELLO]
    assert natural[-1] == 2 and len(natural) < 14  # the model stops early on its own
    delayed = await collect(engine, request(prompt, min_new_tokens=14, max_new_tokens=20))
    assert 2 not in tokens(delayed)[:14]
    assert tokens(delayed) == hf_generate(model, prompt, 20, min_new_tokens=14)
    endless = await collect(engine, request(prompt, ignore_eos=True, max_new_tokens=20))
    assert len(tokens(endless)) == 20
    assert tokens(endless)[: len(natural)] == natural  # ran through the EOS
    assert endless[-1].finish_reason is FinishReason.LENGTH


async def test_stop_token_ids(engine: HFEngine, prompts: list[list[int]], references: list[list[int]]) -> None:
    expected = references[2]
    position = next(i for i in range(4, len(expected)) if expected[i] not in expected[:i])
    stop = expected[position]
    outputs = await collect(engine, request(prompts[2], stop_token_ids=(stop, 49000), max_new_tokens=32))
    assert tokens(outputs) == expected[: position + 1]
    assert outputs[-1].finish_reason is FinishReason.STOP_TOKEN
    assert outputs[-1].stop_token_id == stop


async def test_logprobs_are_raw_log_softmax(engine: HFEngine, model: Any, prompts: list[list[int]]) -> None:
    prompt = prompts[0]
    # Sampled at a high temperature with a penalty: the reported numbers must still be the raw distribution's.
    outputs = await collect(
        engine, request(prompt, temperature=1.5, repetition_penalty=1.2, seed=3, logprobs=5, max_new_tokens=10)
    )
    generated = tokens(outputs)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]
    for step, output in enumerate(outputs):
        (lp,) = output.logprobs
        assert lp.token_id == generated[step]
        assert lp.logprob == pytest.approx(expected[step, lp.token_id].item(), abs=1e-4)
        assert len(lp.top) == 5
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        top_ids = expected[step].topk(5).indices.tolist()
        assert [t for t, _ in lp.top] == top_ids
        for token, value in lp.top:
            assert value == pytest.approx(expected[step, token].item(), abs=1e-4)
    # logprobs=0: the chosen token's only; None: nothing.
    (only_chosen,) = (await collect(engine, request(prompt, logprobs=0, max_new_tokens=1)))[0].logprobs
    assert only_chosen.top == () and only_chosen.logprob == pytest.approx(expected[0].max().item(), abs=1e-4)
    assert (await collect(engine, request(prompt, max_new_tokens=1)))[0].logprobs == []


async def test_cancelling_the_consumer_frees_the_slot(engine: HFEngine, prompts: list[list[int]]) -> None:
    started = asyncio.Event()

    async def consume(req: EngineRequest) -> None:
        async for _ in engine.generate(req):
            started.set()

    task = asyncio.create_task(consume(request(prompts[0], max_new_tokens=500, ignore_eos=True)))
    await asyncio.wait_for(started.wait(), 10)
    assert engine.load() == (1, 0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert engine.load() == (0, 0)  # at once, not at the next step
    await wait_for(lambda: len(engine._batch) == 0)  # and the step thread dropped the row

    # Closing the iterator (what the servicer does when the client goes away) frees it the same way.
    stream = engine.generate(request(prompts[1], max_new_tokens=500, ignore_eos=True))
    await anext(stream)
    assert engine.load() == (1, 0)
    await stream.aclose()
    assert engine.load() == (0, 0)
    await wait_for(lambda: len(engine._batch) == 0)


async def test_load_counts_running_and_waiting(engine: HFEngine, prompts: list[list[int]]) -> None:
    count = MAX_BATCH + 3
    streams = [engine.generate(request(prompts[i % 6], max_new_tokens=500, ignore_eos=True)) for i in range(count)]
    firsts = [asyncio.ensure_future(anext(s)) for s in streams]
    await wait_for(lambda: sum(f.done() for f in firsts) == MAX_BATCH, timeout=30)
    assert engine.load() == (MAX_BATCH, count - MAX_BATCH)
    for f in firsts:
        f.cancel()
    await asyncio.gather(*firsts, return_exceptions=True)
    for s in streams:
        await s.aclose()
    assert engine.load() == (0, 0)
    await wait_for(lambda: len(engine._batch) == 0 and not engine._waiting)


async def test_abort(engine: HFEngine, prompts: list[list[int]]) -> None:
    req = request(prompts[0], max_new_tokens=500, ignore_eos=True)
    stream = engine.generate(req)
    first = await anext(stream)
    assert first.token_ids
    assert await engine.abort(req.request_id)
    rest = [o async for o in stream]
    assert rest[-1].finish_reason is FinishReason.ABORT
    assert len(rest) < 20
    assert engine.load() == (0, 0)
    assert not await engine.abort(req.request_id)
    assert not await engine.abort("never-seen")


async def test_score_equals_a_direct_forward(engine: HFEngine, model: Any, tokenizer: Any) -> None:
    queries = [
        ScoreQuery(tokenizer("The capital of France is")["input_ids"], [[12366], [4118, 1007], [253, 411, 1314, 28]]),
        ScoreQuery(tokenizer("Review: I loved it. Sentiment:")["input_ids"], [[3264], [4633], [253, 5]]),
    ]
    scores = await engine.score(queries)
    for query, per_continuation in zip(queries, scores, strict=True):
        prompt = list(query.prompt_token_ids)
        for continuation, got in zip(query.continuations, per_continuation, strict=True):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(continuation)])).logits[0]
            logprobs = torch.log_softmax(logits.float(), -1)
            want = [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(continuation)]
            assert got == pytest.approx(want, abs=1e-4)


@pytest.fixture(scope="module")
def lora_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LoRA for the default model (random B too, so it really changes the outputs)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("lora")
    get_peft_model(base, config).save_pretrained(path)
    return path


async def test_lora_adapter_changes_only_its_requests(
    engine: HFEngine, default_model_dir: Path, lora_dir: Path, prompts: list[list[int]], references: list[list[int]]
) -> None:
    from peft import PeftModel

    with pytest.raises(AdapterError):
        await collect(engine, request(prompts[0], adapter="tiny", max_new_tokens=4))
    await engine.add_adapter("tiny", str(lora_dir))
    try:
        with pytest.raises(AdapterError):
            await engine.add_adapter("tiny", str(lora_dir))
        # Base and adapter requests share the batch.
        results = await asyncio.gather(
            *(collect(engine, request(p, max_new_tokens=12), 0.05 * i) for i, p in enumerate(prompts[:3])),
            *(
                collect(engine, request(p, adapter="tiny", max_new_tokens=12), 0.05 * i)
                for i, p in enumerate(prompts[:3])
            ),
        )
        base, adapted = results[:3], results[3:]
        for outputs, expected in zip(base, references, strict=False):
            assert tokens(outputs) == expected[:12]
        assert all(tokens(a) != r[:12] for a, r in zip(adapted, references, strict=False))

        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32), lora_dir
        ).eval()
        for prompt, outputs in zip(prompts, adapted, strict=False):
            assert tokens(outputs) == hf_generate(peft_model, prompt, 12)
        (score,) = await engine.score([ScoreQuery(prompts[0], [[28, 253]], adapter="tiny")])
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([[*prompts[0], 28, 253]])).logits[0]
        want = torch.log_softmax(logits, -1)[len(prompts[0]) - 1 : -1].gather(1, torch.tensor([[28], [253]]))
        assert score[0] == pytest.approx(want.squeeze(1).tolist(), abs=1e-4)
    finally:
        await engine.remove_adapter("tiny")
    with pytest.raises(AdapterError):
        await engine.remove_adapter("tiny")
    with pytest.raises(AdapterError):
        await collect(engine, request(prompts[0], adapter="tiny", max_new_tokens=4))
    assert tokens(await collect(engine, request(prompts[0], max_new_tokens=24))) == references[0]


async def test_bad_adapter_path_is_refused_without_harm(
    engine: HFEngine, tmp_path: Path, prompts: list[list[int]], references: list[list[int]]
) -> None:
    with pytest.raises(AdapterError):
        await engine.add_adapter("missing", str(tmp_path / "nope"))
    await engine.check_health()
    assert tokens(await collect(engine, request(prompts[0], max_new_tokens=24))) == references[0]


async def test_bad_requests_raise_on_first_iteration(engine: HFEngine, prompts: list[list[int]]) -> None:
    from genloom.services.inference.engine import EngineError

    for bad in (request([], max_new_tokens=4), request([10**9], max_new_tokens=4), request(prompts[0], top_p=0.0)):
        with pytest.raises(EngineError):
            await collect(engine, bad)
    await engine.check_health()


async def test_shutdown_aborts_streams(default_model_dir: Path, prompts: list[list[int]]) -> None:
    engine = HFEngine(default_model_dir, MODEL, InferenceSettings(engine="hf"))
    await engine.start()
    stream = engine.generate(request(prompts[0], max_new_tokens=500, ignore_eos=True))
    await anext(stream)
    await engine.shutdown()
    rest = [o async for o in stream]
    assert rest[-1].finish_reason is FinishReason.ABORT
    with pytest.raises(EngineDeadError):
        await engine.check_health()
    with pytest.raises(EngineDeadError):
        await collect(engine, request(prompts[0], max_new_tokens=2))


async def test_a_dead_step_thread_fails_requests_and_health(default_model_dir: Path, prompts: list[list[int]]) -> None:
    engine = HFEngine(default_model_dir, MODEL, InferenceSettings(engine="hf"))
    await engine.start()

    def broken() -> None:
        raise RuntimeError("simulated device failure")

    engine._decode = broken  # type: ignore[method-assign]
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(collect(engine, request(prompts[0], max_new_tokens=8)), 10)
    with pytest.raises(EngineDeadError):
        await engine.check_health()
    await engine.shutdown()

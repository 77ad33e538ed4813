"""TaskService end to end: real gRPC, the real default model (hf engine), the tokenizer and inference services
it calls over gRPC. A small window (512 tokens) makes example dropping, chunking and truncation quick."""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path
from typing import Any

import grpc
import pytest

from genloom.services.tasks.chunking import sentence_starts
from genloom.v1 import common_pb2, inference_pb2, tasks_pb2, tokenizer_pb2, tokenizer_pb2_grpc

from .conftest import SMALL_WINDOW, TaskStack, bad_request_fields, start_stack, stop_stack

POS_NEG = [tasks_pb2.ClassLabel(name="positive"), tasks_pb2.ClassLabel(name="negative")]
REVIEWS = ["I love this film, it was wonderful and moving.", "Terrible acting, boring plot, a waste of time."]
EXAMPLES = [
    tasks_pb2.ClassifyExample(text="An absolute delight from start to end.", labels=["positive"]),
    tasks_pb2.ClassifyExample(text="Dull and far too long.", labels=["negative"]),
    tasks_pb2.ClassifyExample(text="Great music and a clever story.", labels=["positive"]),
]
MEETING = (
    "The quarterly planning meeting moved from Monday to Friday because the large conference room was booked. "
    "Everyone must bring a laptop. The agenda covers the budget, hiring for the data team and the office move."
)
SUMMARY_EXAMPLES = [
    tasks_pb2.SummarizeExample(
        document="The bakery on Elm Street will close for two weeks in August for renovations. It reopens on "
        "September 1 with a larger kitchen.",
        summary="The Elm Street bakery closes for August renovations and reopens September 1.",
    ),
    tasks_pb2.SummarizeExample(
        document="Heavy rain flooded the main road overnight. The city closed it until the water drains and asks "
        "drivers to use the northern bypass.",
        summary="Flooding closed the main road; drivers should take the northern bypass.",
    ),
]


def long_document(sentences: int) -> str:
    towns = ["Weft", "Warp", "Shuttle", "Heddle", "Bobbin", "Spindle"]
    return " ".join(
        f"In year {1900 + i} the river Loom flooded the town of {towns[i % len(towns)]}, and {i + 3} bridges were "
        f"rebuilt by the guild of weavers."
        for i in range(sentences)
    )


async def count_tokens(stack: TaskStack, text: str) -> int:
    stub = tokenizer_pb2_grpc.TokenizerServiceStub(stack.channel)
    response = await stub.CountTokens(
        tokenizer_pb2.CountTokensRequest(inputs=[tokenizer_pb2.TokenizerInput(text=text)], add_special_tokens=False)
    )
    return response.counts[0]


async def wait_idle(engine: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while engine.load() != (0, 0):
        assert asyncio.get_running_loop().time() < deadline, f"engine still busy: {engine.load()}"
        await asyncio.sleep(0.02)


# -- Classify ---------------------------------------------------------------------------------------------------


async def test_classify_score_probabilities_sum_to_one_and_argmax_is_the_label(tasks: TaskStack) -> None:
    response = await tasks.stub.Classify(tasks_pb2.ClassifyRequest(texts=REVIEWS, labels=POS_NEG))
    assert response.model.model == "smollm2-135m-instruct"
    for result in response.results:
        probs = {p.label: p.probability for p in result.probabilities}
        assert [p.label for p in result.probabilities] == ["positive", "negative"]
        assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9)
        assert result.label == max(probs, key=probs.__getitem__) and list(result.labels) == [result.label]
        assert all(p.logprob < 0 and p.uncalibrated_probability == p.probability for p in result.probabilities)
        # softmax of the summed log-probabilities
        lp = [p.logprob for p in result.probabilities]
        assert math.isclose(probs["positive"], 1 / (1 + math.exp(lp[1] - lp[0])), rel_tol=1e-9)
        assert result.context.model_calls == 1 and result.context.chunks == 1 and result.context.max_new_tokens == 0
        assert result.usage.prompt_tokens == result.context.prompt_tokens
    assert [r.label for r in response.results] == ["positive", "negative"]
    assert response.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in response.results)


async def test_classify_strategies_use_the_examples_they_name(tasks: TaskStack) -> None:
    cases = [
        (tasks_pb2.PROMPT_STRATEGY_ZERO_SHOT, 0, 0),
        (tasks_pb2.PROMPT_STRATEGY_ONE_SHOT, 0, 1),
        (tasks_pb2.PROMPT_STRATEGY_FEW_SHOT, 0, 3),
        (tasks_pb2.PROMPT_STRATEGY_FEW_SHOT, 2, 2),
        (tasks_pb2.PROMPT_STRATEGY_UNSPECIFIED, 0, 3),
    ]
    tokens = []
    for strategy, max_examples, used in cases:
        response = await tasks.stub.Classify(
            tasks_pb2.ClassifyRequest(
                texts=REVIEWS[:1], labels=POS_NEG, examples=EXAMPLES, strategy=strategy, max_examples=max_examples
            )
        )
        context = response.results[0].context
        assert (context.examples_given, context.examples_used) == (3, used)
        tokens.append(context.prompt_tokens)
    assert tokens[0] < tokens[1] < tokens[3] < tokens[2] == tokens[4]


async def test_calibration_changes_the_probabilities(tasks: TaskStack) -> None:
    plain, calibrated = await asyncio.gather(
        tasks.stub.Classify(tasks_pb2.ClassifyRequest(texts=REVIEWS, labels=POS_NEG)),
        tasks.stub.Classify(tasks_pb2.ClassifyRequest(texts=REVIEWS, labels=POS_NEG, calibrate=True)),
    )
    for before, after in zip(plain.results, calibrated.results, strict=True):
        raw = [p.probability for p in before.probabilities]
        prior = [p.content_free_probability for p in after.probabilities]
        assert [p.uncalibrated_probability for p in after.probabilities] == pytest.approx(raw, abs=1e-6)
        assert all(0 < q < 1 for q in prior) and sum(prior) == pytest.approx(1.0)
        expected = [r / q for r, q in zip(raw, prior, strict=True)]
        expected = [e / sum(expected) for e in expected]
        assert [p.probability for p in after.probabilities] == pytest.approx(expected, abs=1e-6)
        assert [p.probability for p in after.probabilities] != pytest.approx(raw, abs=1e-4)
    # the three content-free prompts are scored once per request, not once per text
    assert sum(r.context.model_calls for r in calibrated.results) == len(REVIEWS) + 3


async def test_classify_multi_label_asks_each_label(tasks: TaskStack) -> None:
    labels = [tasks_pb2.ClassLabel(name=n) for n in ("food", "price", "service")]
    examples = [tasks_pb2.ClassifyExample(text="Tasty pasta but expensive.", labels=["food", "price"])]
    response = await tasks.stub.Classify(
        tasks_pb2.ClassifyRequest(
            texts=["The soup was cold and the waiter ignored us."],
            labels=labels,
            multi_label=True,
            examples=examples,
            threshold=0.3,
        )
    )
    result = response.results[0]
    probs = [p.probability for p in result.probabilities]
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert list(result.labels) == [
        p.label for p in sorted(result.probabilities, key=lambda p: -p.probability) if p.probability >= 0.3
    ]
    assert result.label == max(result.probabilities, key=lambda p: p.probability).label
    assert result.context.model_calls == 3 and result.context.examples_used == 1


async def test_classify_generate_maps_text_onto_labels(tasks: TaskStack) -> None:
    response = await tasks.stub.Classify(
        tasks_pb2.ClassifyRequest(
            texts=REVIEWS, labels=POS_NEG, examples=EXAMPLES, method=tasks_pb2.CLASSIFY_METHOD_GENERATE
        )
    )
    for result in response.results:
        assert result.generated_text
        assert result.label in ("positive", "negative")
        assert [p.probability for p in result.probabilities] == [
            1.0 if p.label == result.label else 0.0 for p in result.probabilities
        ]
        assert result.usage.completion_tokens > 0 and result.context.max_new_tokens > 0


async def test_classify_truncates_only_when_asked(small_tasks: TaskStack) -> None:
    text = long_document(40)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await small_tasks.stub.Classify(tasks_pb2.ClassifyRequest(texts=[text], labels=POS_NEG))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncation" in (err.value.details() or "")
    assert bad_request_fields(err.value) == ["texts[0]"]
    response = await small_tasks.stub.Classify(
        tasks_pb2.ClassifyRequest(texts=[text], labels=POS_NEG, truncation=common_pb2.TRUNCATION_SIDE_LEFT)
    )
    context = response.results[0].context
    assert context.truncated and context.truncation_side == common_pb2.TRUNCATION_SIDE_LEFT
    assert context.removed_tokens > 0 and context.prompt_tokens <= SMALL_WINDOW
    assert context.input_tokens == await count_tokens(small_tasks, text)


# -- Summarize --------------------------------------------------------------------------------------------------


async def test_summarize_each_strategy(tasks: TaskStack) -> None:
    for strategy, used in (
        (tasks_pb2.PROMPT_STRATEGY_ZERO_SHOT, 0),
        (tasks_pb2.PROMPT_STRATEGY_ONE_SHOT, 1),
        (tasks_pb2.PROMPT_STRATEGY_FEW_SHOT, 2),
    ):
        response = await tasks.stub.Summarize(
            tasks_pb2.SummarizeRequest(
                documents=[MEETING],
                strategy=strategy,
                examples=SUMMARY_EXAMPLES,
                target_length=tasks_pb2.SummaryLength(unit=tasks_pb2.SUMMARY_LENGTH_UNIT_WORDS, value=20),
                sampling=inference_pb2.SamplingParams(max_new_tokens=40),
            )
        )
        result = response.results[0]
        assert result.summary and result.summary == result.summary.strip()
        assert result.context.examples_used == used and result.context.chunks == 1
        assert result.context.input_tokens == await count_tokens(tasks, MEETING)
        assert result.usage.prompt_tokens == result.context.prompt_tokens and result.context.model_calls == 1
        assert 0 < result.usage.completion_tokens <= 40


async def test_summarize_bullets_and_batch(tasks: TaskStack) -> None:
    response = await tasks.stub.Summarize(
        tasks_pb2.SummarizeRequest(
            documents=[MEETING, SUMMARY_EXAMPLES[0].document],
            format=tasks_pb2.SUMMARY_FORMAT_BULLETS,
            sampling=inference_pb2.SamplingParams(max_new_tokens=48),
        )
    )
    assert len(response.results) == 2 and all(r.summary for r in response.results)
    assert response.usage.total_tokens == sum(r.usage.total_tokens for r in response.results)


async def test_summarize_stream_joins_to_the_unary_summary(tasks: TaskStack) -> None:
    request = dict(document=MEETING, sampling=inference_pb2.SamplingParams(max_new_tokens=32))
    unary = await tasks.stub.Summarize(
        tasks_pb2.SummarizeRequest(documents=[MEETING], sampling=request["sampling"])  # type: ignore[arg-type]
    )
    messages = [m async for m in tasks.stub.SummarizeStream(tasks_pb2.SummarizeStreamRequest(**request))]
    assert not any(m.HasField("progress") for m in messages)  # progress only for chunked documents
    assert messages[-1].HasField("finish") and all(m.HasField("delta") for m in messages[:-1])
    assert "".join(m.delta.text for m in messages[:-1]) == unary.results[0].summary
    assert messages[-1].finish.usage == unary.results[0].usage


async def test_document_three_times_the_window_is_summarized_by_chunks(small_tasks: TaskStack) -> None:
    document = long_document(60)
    tokens = await count_tokens(small_tasks, document)
    assert tokens >= 3 * SMALL_WINDOW
    sampling = inference_pb2.SamplingParams(max_new_tokens=48)
    response = await small_tasks.stub.Summarize(tasks_pb2.SummarizeRequest(documents=[document], sampling=sampling))
    result = response.results[0]
    context = result.context
    assert result.summary
    assert context.input_tokens == tokens and context.chunks >= 4 and 64 <= context.chunk_tokens < SMALL_WINDOW
    assert context.max_prompt_tokens + 48 <= SMALL_WINDOW and context.prompt_tokens + 48 <= SMALL_WINDOW
    # every chunk summarized, then any reduce passes, then the final summary
    assert context.model_calls >= context.chunks + 1
    assert (context.reduce_rounds == 0) == (context.model_calls == context.chunks + 1)
    assert result.usage.prompt_tokens > tokens  # every chunk was read (with overlap), plus the reduce prompts

    stream = small_tasks.stub.SummarizeStream(tasks_pb2.SummarizeStreamRequest(document=document, sampling=sampling))
    messages = [m async for m in stream]
    progress = [m.progress for m in messages if m.HasField("progress")]
    assert progress[0].stage == tasks_pb2.SUMMARIZE_STAGE_MAP and progress[0].total == context.chunks
    assert [p.done for p in progress if p.stage == tasks_pb2.SUMMARIZE_STAGE_MAP] == list(range(context.chunks + 1))
    assert progress[-1].stage == tasks_pb2.SUMMARIZE_STAGE_FINAL
    text = "".join(m.delta.text for m in messages if m.HasField("delta"))
    assert text == result.summary  # greedy: the stream's final summary is the unary one
    assert messages[-1].finish.context == context


def word_offsets(text: str) -> list[tuple[int, int]]:
    """One "token" per space-separated word."""
    offsets, pos = [], 0
    for word in text.split(" "):
        offsets.append((pos, pos + len(word)))
        pos += len(word) + 1
    return offsets


def test_chunks_start_and_end_on_sentence_boundaries() -> None:
    from genloom.services.tasks.chunking import split_chunks

    text = long_document(12)  # sentences of 21 words
    chunks = split_chunks(text, word_offsets(text), chunk_tokens=64, overlap_tokens=16)
    starts = set(sentence_starts(text))
    assert chunks[0].start == 0 and chunks[-1].end == len(text) and len(chunks) > 3
    for prev, nxt in itertools.pairwise(chunks):
        assert prev.tokens <= 64 and prev.end in starts
        assert nxt.start in starts and nxt.start < prev.end  # overlapping by a whole sentence
        assert text[nxt.start : prev.end].count(" ") < 32  # by at most half a chunk


def test_a_sentence_longer_than_a_chunk_is_cut_by_tokens() -> None:
    from genloom.services.tasks.chunking import split_chunks

    text = " ".join(f"w{i}" for i in range(100)) + "."
    chunks = split_chunks(text, word_offsets(text), chunk_tokens=30, overlap_tokens=5)
    assert [c.tokens for c in chunks] == [30, 30, 30, 25]
    assert [c.start for c in chunks[1:]] == [text.index(f"w{i} ") for i in (25, 50, 75)]
    assert "".join(c.text(text)[: c.end - c.start] for c in chunks[:1]) == text[: chunks[0].end]


async def test_examples_that_do_not_fit_are_dropped(small_tasks: TaskStack) -> None:
    big = [
        tasks_pb2.SummarizeExample(document=long_document(4), summary=f"Summary number {i} of the floods.")
        for i in range(6)
    ]
    response = await small_tasks.stub.Summarize(
        tasks_pb2.SummarizeRequest(
            documents=[MEETING], examples=big, sampling=inference_pb2.SamplingParams(max_new_tokens=32)
        )
    )
    context = response.results[0].context
    assert context.examples_given == 6 and 0 < context.examples_used < 6
    assert context.prompt_tokens + 32 <= SMALL_WINDOW
    # one more example would not have fitted: each costs at least its document's tokens
    assert context.prompt_tokens + 32 + await count_tokens(small_tasks, big[0].document) > SMALL_WINDOW


async def test_chunking_disabled_truncates_or_rejects(small_tasks: TaskStack) -> None:
    document = long_document(30)
    no_chunks = tasks_pb2.ChunkingOptions(disabled=True)
    sampling = inference_pb2.SamplingParams(max_new_tokens=16)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await small_tasks.stub.Summarize(
            tasks_pb2.SummarizeRequest(documents=["short.", document], chunking=no_chunks, sampling=sampling)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(err.value) == ["documents[1]"]
    response = await small_tasks.stub.Summarize(
        tasks_pb2.SummarizeRequest(
            documents=[document], chunking=no_chunks, truncation=common_pb2.TRUNCATION_SIDE_RIGHT, sampling=sampling
        )
    )
    context = response.results[0].context
    assert context.truncated and context.removed_tokens > 0 and context.chunks == 1
    assert context.prompt_tokens + 16 <= SMALL_WINDOW


# -- Answer -----------------------------------------------------------------------------------------------------


async def test_answer_closed_book_and_from_context(tasks: TaskStack) -> None:
    response = await tasks.stub.Answer(
        tasks_pb2.AnswerRequest(
            items=[
                tasks_pb2.AnswerItem(question="What is the capital of France?"),
                tasks_pb2.AnswerItem(question="Which day is the meeting on?", context=MEETING),
            ],
            sampling=inference_pb2.SamplingParams(max_new_tokens=24),
        )
    )
    closed, grounded = response.results
    assert "paris" in closed.answer.lower()
    assert not closed.HasField("support") and closed.context.chunks == 0
    assert "friday" in grounded.answer.lower()
    assert grounded.support.text == MEETING and (grounded.support.start, grounded.support.end) == (0, len(MEETING))
    for result in response.results:
        assert result.score <= 0 and not result.unanswerable and result.usage.completion_tokens > 0


async def test_answer_few_shot(tasks: TaskStack) -> None:
    examples = [
        tasks_pb2.AnswerExample(question="Who wrote Hamlet?", answer="William Shakespeare"),
        tasks_pb2.AnswerExample(question="What is 2 + 2?", answer="4"),
    ]
    response = await tasks.stub.Answer(
        tasks_pb2.AnswerRequest(
            items=[tasks_pb2.AnswerItem(question="What is the capital of Italy?")],
            examples=examples,
            sampling=inference_pb2.SamplingParams(max_new_tokens=16),
        )
    )
    result = response.results[0]
    assert result.context.examples_used == 2 and "rome" in result.answer.lower()


async def test_answer_long_context_keeps_the_best_chunk(small_tasks: TaskStack) -> None:
    filler = long_document(30)
    context = f"{filler} The secret password of the weavers' guild is marigold. {filler}"
    response = await small_tasks.stub.Answer(
        tasks_pb2.AnswerRequest(
            items=[
                tasks_pb2.AnswerItem(question="What is the secret password of the weavers' guild?", context=context)
            ],
            sampling=inference_pb2.SamplingParams(max_new_tokens=16),
        )
    )
    result = response.results[0]
    assert result.context.chunks > 2 and result.context.model_calls == result.context.chunks
    support = result.support
    assert context[support.start : support.end] == support.text
    assert "marigold" in support.text and "marigold" in result.answer.lower()


async def test_unanswerable_is_a_flag_not_an_answer(tasks: TaskStack) -> None:
    # Examples and an instruction that make the marker near certain: this checks the flag's plumbing (marker ->
    # flag, empty answer, no support), not the model's judgement.
    examples = [
        tasks_pb2.AnswerExample(question=q, context="The cat slept on the mat.", unanswerable=True)
        for q in ("Who won the election?", "What is the price of gold?", "When does the train leave?")
    ]
    response = await tasks.stub.Answer(
        tasks_pb2.AnswerRequest(
            items=[tasks_pb2.AnswerItem(question="Who won the match?", context="The cat slept on the mat.")],
            allow_unanswerable=True,
            examples=examples,
            instruction="Whatever the question, reply with exactly one word: UNANSWERABLE.",
            sampling=inference_pb2.SamplingParams(max_new_tokens=8),
        )
    )
    result = response.results[0]
    assert result.unanswerable and result.answer == "" and not result.HasField("support")


async def test_models_without_a_chat_template_get_plain_prompts(
    hf_engine: Any, default_model_dir: Path, small_model_dir: Path, data_root: Path
) -> None:
    # The tokenizer serves a copy of the default model's tokenizer without its chat template (same vocabulary, a
    # 512-token window), so the task service renders "Answer:"-cued plain text for the same weights.
    stack = await start_stack(hf_engine, default_model_dir, data_root, tokenizer_model=str(small_model_dir))
    try:
        classified = await stack.stub.Classify(
            tasks_pb2.ClassifyRequest(texts=REVIEWS, labels=POS_NEG, examples=EXAMPLES[:2])
        )
        for result in classified.results:
            assert math.isclose(sum(p.probability for p in result.probabilities), 1.0, abs_tol=1e-9)
            assert result.context.examples_used == 2 and result.context.context_window == SMALL_WINDOW
        summary = await stack.stub.Summarize(
            tasks_pb2.SummarizeRequest(documents=[MEETING], sampling=inference_pb2.SamplingParams(max_new_tokens=48))
        )
        text = summary.results[0].summary
        assert text and "\n\n" not in text  # a blank line ends a plain-text reply
        answered = await stack.stub.Answer(
            tasks_pb2.AnswerRequest(
                items=[tasks_pb2.AnswerItem(question="Which day is the meeting on?", context=MEETING)],
                sampling=inference_pb2.SamplingParams(max_new_tokens=16),
            )
        )
        assert answered.results[0].answer and "\n" not in answered.results[0].answer
    finally:
        await stop_stack(stack)


# -- Errors, deadlines, cancellation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (tasks_pb2.ClassifyRequest(texts=[""], labels=POS_NEG), ["texts[0]"]),
        (tasks_pb2.ClassifyRequest(texts=["x"], labels=[]), ["labels"]),
        (tasks_pb2.ClassifyRequest(texts=["x"], labels=[POS_NEG[0], POS_NEG[0]]), ["labels[1].name"]),
        (
            tasks_pb2.ClassifyRequest(
                texts=["x"], labels=POS_NEG, examples=[tasks_pb2.ClassifyExample(text="y", labels=["neutral"])]
            ),
            ["examples[0].labels[0]"],
        ),
        (tasks_pb2.ClassifyRequest(texts=["x"] * 65, labels=POS_NEG), ["texts"]),
        (
            tasks_pb2.ClassifyRequest(
                texts=["x"], labels=POS_NEG, calibrate=True, method=tasks_pb2.CLASSIFY_METHOD_GENERATE
            ),
            ["calibrate"],
        ),
        (
            tasks_pb2.ClassifyRequest(texts=["x"], labels=POS_NEG, strategy=tasks_pb2.PROMPT_STRATEGY_FEW_SHOT),
            ["examples"],
        ),
        (tasks_pb2.SummarizeRequest(documents=[]), ["documents"]),
        (
            tasks_pb2.SummarizeRequest(documents=["x"], chunking=tasks_pb2.ChunkingOptions(chunk_tokens=10)),
            ["chunking.chunk_tokens"],
        ),
        (
            tasks_pb2.SummarizeRequest(
                documents=["x"],
                target_length=tasks_pb2.SummaryLength(unit=tasks_pb2.SUMMARY_LENGTH_UNIT_WORDS, value=0),
            ),
            ["target_length.value"],
        ),
        (tasks_pb2.AnswerRequest(items=[tasks_pb2.AnswerItem(question=" ")]), ["items[0].question"]),
        (
            tasks_pb2.AnswerRequest(
                items=[tasks_pb2.AnswerItem(question="q")], examples=[tasks_pb2.AnswerExample(question="q2")]
            ),
            ["examples[0].answer"],
        ),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    tasks: TaskStack, request_: Any, fields: list[str]
) -> None:
    method = {
        tasks_pb2.ClassifyRequest: tasks.stub.Classify,
        tasks_pb2.SummarizeRequest: tasks.stub.Summarize,
        tasks_pb2.AnswerRequest: tasks.stub.Answer,
    }[type(request_)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(err.value) == fields


async def test_upstream_errors_keep_their_meaning(tasks: TaskStack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.stub.Classify(
            tasks_pb2.ClassifyRequest(texts=["x"], labels=POS_NEG, model=common_pb2.ModelRef(model="no-such-model"))
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tasks.stub.Summarize(
            tasks_pb2.SummarizeRequest(documents=["x"], sampling=inference_pb2.SamplingParams(temperature=5.0))
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in (err.value.details() or "")


async def test_unreachable_inference_is_unavailable(hf_engine: Any, default_model_dir: Path, data_root: Path) -> None:
    stack = await start_stack(hf_engine, default_model_dir, data_root, inference_target="127.0.0.1:9")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.stub.Classify(tasks_pb2.ClassifyRequest(texts=["x"], labels=POS_NEG), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "inference" in (err.value.details() or "")
    finally:
        await stop_stack(stack)


async def test_deadline_and_cancellation_reach_the_engine(small_tasks: TaskStack) -> None:
    document = long_document(60)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await small_tasks.stub.Summarize(tasks_pb2.SummarizeRequest(documents=[document]), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_idle(small_tasks.engine)

    call = small_tasks.stub.Summarize(tasks_pb2.SummarizeRequest(documents=[document]))
    await asyncio.sleep(0.5)
    assert small_tasks.engine.load() != (0, 0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await wait_idle(small_tasks.engine)

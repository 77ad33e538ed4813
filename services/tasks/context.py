"""Per-request state shared by a task's inputs: the model's facts, cached example costs, the inference-call
budget, the token tally; and the context-window policy (fit examples, truncate, chunk) every task uses."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from genloom.services.server.errors import InvalidArgument
from genloom.services.tasks.chunking import Chunk, split_chunks
from genloom.services.tasks.prompts import PromptSpec
from genloom.services.tasks.settings import TasksSettings
from genloom.services.tasks.upstream import ModelFacts, Upstream
from genloom.v1 import common_pb2, inference_pb2, tasks_pb2, tokenizer_pb2

#: Tokens kept free below the window when sizing chunks: a chunk's text re-tokenized inside a prompt can take a
#: token or two more than its slice of the whole document did.
CHUNK_MARGIN = 16
MIN_CHUNK_TOKENS = 64
DEFAULT_OVERLAP = 64

T = TypeVar("T")


@dataclass
class Tally:
    """Tokens and calls spent on one input."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    max_prompt: int = 0

    def add(self, prompt: int, completion: int = 0) -> None:
        """One inference call (a generation, or one scored prompt) with a `prompt`-token prompt."""
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.calls += 1
        self.max_prompt = max(self.max_prompt, prompt)

    def usage(self) -> common_pb2.Usage:
        return common_pb2.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


@dataclass
class Fitted:
    """A prompt that fits: its spec (with the examples used) and token ids."""

    spec: PromptSpec
    ids: list[int]

    @property
    def examples_used(self) -> int:
        return len(self.spec.used)


@dataclass
class Measured:
    """A prompt without examples and its input, tokenized: the starting point of every fitting decision."""

    base: PromptSpec
    base_ids: list[int]
    input_text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]

    @property
    def input_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class StrategyChoice:
    strategy: int  # a resolved PromptStrategy (never UNSPECIFIED)
    max_examples: int  # 0 = no limit


def resolve_strategy(strategy: int, examples: int, max_examples: int, field_name: str) -> StrategyChoice:
    if strategy == tasks_pb2.PROMPT_STRATEGY_UNSPECIFIED:
        strategy = (
            tasks_pb2.PROMPT_STRATEGY_ZERO_SHOT
            if examples == 0
            else tasks_pb2.PROMPT_STRATEGY_ONE_SHOT
            if examples == 1
            else tasks_pb2.PROMPT_STRATEGY_FEW_SHOT
        )
    if strategy in (tasks_pb2.PROMPT_STRATEGY_ONE_SHOT, tasks_pb2.PROMPT_STRATEGY_FEW_SHOT) and examples == 0:
        raise InvalidArgument.field(field_name, f"{tasks_pb2.PromptStrategy.Name(strategy)} needs at least one example")
    return StrategyChoice(strategy, max_examples)


@dataclass
class TaskContext:
    """What one task RPC shares across its inputs."""

    upstream: Upstream
    settings: TasksSettings
    model: common_pb2.ModelRef
    facts: ModelFacts
    strategy: StrategyChoice
    semaphore: asyncio.Semaphore
    resolved_model: common_pb2.ModelRef | None = None
    _cache: dict[Any, asyncio.Future[Any]] = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return self.facts.has_chat_template

    @property
    def window(self) -> int:
        return self.facts.context_window

    @property
    def tokenizer_model(self) -> str:
        return self.model.model

    async def once(self, key: Any, compute: Callable[[], Awaitable[T]]) -> T:
        """`compute()` once per key for the whole request, even when inputs ask concurrently."""
        future = self._cache.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._cache[key] = future
            try:
                future.set_result(await compute())
            except BaseException as err:
                del self._cache[key]
                future.set_exception(err)
                future.exception()  # retrieved: waiters re-raise it, nobody logs it as unhandled
                raise
        result: T = await future
        return result

    # -- upstream calls with the request's budget ------------------------------------------------------------------

    async def tokenize(self, specs: Sequence[PromptSpec], texts: Sequence[str] = ()) -> list[Any]:
        inputs = [s.tokenizer_input(self.chat) for s in specs] + [tokenizer_pb2.TokenizerInput(text=t) for t in texts]
        return await self.upstream.tokenize(self.tokenizer_model, inputs, offsets=bool(texts))

    async def generate(self, request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateResponse:
        async with self.semaphore:
            response = await self.upstream.generate(request)
        self.note_model(response.model)
        return response

    async def score(self, request: inference_pb2.ScoreRequest) -> inference_pb2.ScoreResponse:
        async with self.semaphore:
            response = await self.upstream.score(request)
        self.note_model(response.model)
        return response

    def note_model(self, model: common_pb2.ModelRef) -> None:
        if self.resolved_model is None:
            self.resolved_model = common_pb2.ModelRef()
            self.resolved_model.CopyFrom(model)

    def model_ref(self) -> common_pb2.ModelRef:
        if self.resolved_model is not None:
            return self.resolved_model
        return common_pb2.ModelRef(model=self.facts.name, adapter=self.model.adapter)

    # -- the context-window policy --------------------------------------------------------------------------------

    async def example_costs(self, key: Any, spec: PromptSpec) -> list[int]:
        """Tokens each example adds to `spec` (measured once per request and key with an empty query)."""
        if self.strategy.strategy == tasks_pb2.PROMPT_STRATEGY_ZERO_SHOT or not spec.examples:
            return []

        async def measure() -> list[int]:
            empty = spec.with_query("")
            specs = [empty.with_examples(())] + [empty.with_examples((i,)) for i in range(len(spec.examples))]
            counts = await self.upstream.count(self.tokenizer_model, [s.tokenizer_input(self.chat) for s in specs])
            return [c - counts[0] for c in counts[1:]]

        return await self.once(("costs", key), measure)

    def choose_examples(self, costs: Sequence[int], room: int) -> list[int]:
        """Indices of the examples the strategy uses within `room` tokens: in order, skipping any that do not
        fit; one for ONE_SHOT, up to max_examples for FEW_SHOT."""
        s = self.strategy
        if s.strategy == tasks_pb2.PROMPT_STRATEGY_ZERO_SHOT:
            return []
        limit = 1 if s.strategy == tasks_pb2.PROMPT_STRATEGY_ONE_SHOT else (s.max_examples or len(costs))
        chosen: list[int] = []
        used = 0
        for i, cost in enumerate(costs):
            if len(chosen) >= limit:
                break
            if used + cost <= room:
                chosen.append(i)
                used += cost
        return chosen

    async def measure(self, spec: PromptSpec, input_text: str) -> Measured:
        base = spec.with_examples(())
        prompt, text = await self.tokenize([base], [input_text])
        return Measured(base, list(prompt.ids), input_text, list(text.ids), [(o.start, o.end) for o in text.offsets])

    async def fit(self, key: Any, measured: Measured, reserve: int) -> Fitted | None:
        """The prompt with as many examples as fit next to the input and `reserve` generated tokens; None when
        the input does not fit even alone."""
        base_tokens = len(measured.base_ids)
        if base_tokens + reserve > self.window:
            return None
        costs = await self.example_costs(key, measured.base)
        chosen = self.choose_examples(costs, self.window - reserve - base_tokens)
        return await self.verify(measured.base, measured.base_ids, chosen, reserve)

    async def verify(self, base: PromptSpec, base_ids: list[int], chosen: list[int], reserve: int) -> Fitted:
        """Tokenize the prompt with `chosen` examples; drop examples from the end while it does not fit (costs
        measured one by one need not add up exactly under every chat template)."""
        while chosen:
            spec = base.with_examples(chosen)
            (result,) = await self.tokenize([spec])
            if result.count + reserve <= self.window:
                return Fitted(spec, list(result.ids))
            chosen = chosen[:-1]
        return Fitted(base, base_ids)

    async def truncate(
        self, spec_for: Callable[[str], PromptSpec], measured: Measured, reserve: int, side: int, field_name: str
    ) -> tuple[Fitted, str, int]:
        """Drop input tokens from `side` until the prompt (without examples) fits. Returns the prompt, the kept
        text and the number of input tokens removed."""
        if side == 0:
            raise InvalidArgument.field(
                field_name,
                f"the input is {measured.input_tokens} tokens and its prompt {len(measured.base_ids)} tokens, which "
                f"with {reserve} tokens for the reply exceeds the {self.window}-token context window; set "
                "`truncation` (or enable chunking where the task offers it)",
            )
        excess = len(measured.base_ids) + reserve - self.window
        for _ in range(4):
            keep = measured.input_tokens - excess
            if keep <= 0:
                raise InvalidArgument.field(
                    field_name,
                    f"even an empty input does not fit: the prompt without it and {reserve} reply tokens exceed the "
                    f"{self.window}-token context window",
                )
            offsets = measured.offsets
            if side == common_pb2.TRUNCATION_SIDE_RIGHT:
                text = measured.input_text[: offsets[keep - 1][1]] if keep else ""
            else:
                text = measured.input_text[offsets[measured.input_tokens - keep][0] :]
            spec = spec_for(text)
            (result,) = await self.tokenize([spec])
            over = result.count + reserve - self.window
            if over <= 0:
                return Fitted(spec, list(result.ids)), text, measured.input_tokens - keep
            excess += over
        raise InvalidArgument.field(field_name, "the input could not be truncated to fit the context window")

    async def plan_chunks(
        self, key: Any, measured: Measured, reserve: int, options: tasks_pb2.ChunkingOptions, field_name: str
    ) -> tuple[list[int], list[Chunk], int]:
        """Examples for chunk prompts and the chunks of an input too long for one prompt. Examples may take at
        most half of the room next to the instruction and the reply; the chunks get the rest."""
        overhead = len(measured.base_ids) - measured.input_tokens
        avail = self.window - reserve - overhead - CHUNK_MARGIN
        costs = await self.example_costs(key, measured.base)
        chosen = self.choose_examples(costs, avail - max(MIN_CHUNK_TOKENS, avail // 2))
        auto = avail - sum(costs[i] for i in chosen)
        size = min(options.chunk_tokens, auto) if options.chunk_tokens else auto
        if size < MIN_CHUNK_TOKENS:
            raise InvalidArgument.field(
                field_name,
                f"the input ({measured.input_tokens} tokens) needs chunking, but the {self.window}-token window "
                f"leaves only {max(size, 0)} tokens per chunk next to the instruction and {reserve} reply tokens; "
                "lower max_new_tokens",
            )
        if options.HasField("overlap_tokens"):
            overlap = options.overlap_tokens
            if overlap * 2 >= size:
                raise InvalidArgument.field(
                    "chunking.overlap_tokens", f"{overlap} must be less than half the chunk size ({size} tokens)"
                )
        else:
            overlap = min(DEFAULT_OVERLAP, (size - 1) // 4)
        chunks = split_chunks(measured.input_text, measured.offsets, size, overlap)
        limit = options.max_chunks or self.settings.max_chunks
        if len(chunks) > limit:
            raise InvalidArgument.field(
                field_name,
                f"the input ({measured.input_tokens} tokens) would need {len(chunks)} chunks of {size} tokens; the "
                f"limit is {limit} (chunking.max_chunks / GENLOOM_TASKS_MAX_CHUNKS)",
            )
        return chosen, chunks, size

    async def fit_chunk(self, spec: PromptSpec, chosen: list[int], reserve: int) -> Fitted:
        """A chunk's prompt with the planned examples, checked; examples are dropped if it still overflows."""
        (base,) = await self.tokenize([spec.with_examples(())])
        if base.count + reserve > self.window:  # only if the margin was not enough: a bug worth reporting
            raise InvalidArgument(
                f"a chunk's prompt ({base.count} tokens) does not fit the {self.window}-token window; "
                "set a smaller chunking.chunk_tokens"
            )
        return await self.verify(spec.with_examples(()), list(base.ids), chosen, reserve)


def softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def sampling_for(
    params: inference_pb2.SamplingParams, max_new_tokens: int, stops: Sequence[str] = (), logprobs: bool = False
) -> inference_pb2.SamplingParams:
    """The caller's sampling parameters with the task defaults: greedy unless a temperature is given, the task's
    max_new_tokens when the caller left it 0, the task's stop sequences added, logprobs only when the task
    needs them."""
    out = inference_pb2.SamplingParams()
    out.CopyFrom(params)
    if not out.HasField("temperature"):
        out.temperature = 0.0
    out.max_new_tokens = max_new_tokens
    out.ClearField("logprobs")
    if logprobs:
        out.logprobs = 0
    for stop in stops:
        if stop not in out.stop:
            out.stop.append(stop)
    return out


def generate_request(
    ctx: TaskContext, ids: list[int], sampling: inference_pb2.SamplingParams
) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=ctx.model, prompt=inference_pb2.Prompt(token_ids=tokenizer_pb2.TokenIds(ids=ids)), sampling=sampling
    )

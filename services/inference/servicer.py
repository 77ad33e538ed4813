"""InferenceService: validates requests, renders prompts, checks the context window, and translates between
protobuf and the engine protocol. Text (detokenization, stop sequences) is assembled here, the same for every
engine.

Fine-tuned models: a request may name "ft:<base>:<suffix>:<job-id>" (as ModelRef.model, or as ModelRef.adapter).
The name is looked up in the fine-tuned model registry (Redis) on first use; a LoRA result is validated like a
LoadAdapter directory and loaded into the engine under its own name, so a job's model is servable as soon as the
job succeeds, without a restart. Adapters loaded this way are evicted least-recently-used when the engine's
adapter slots (GENLOOM_MAX_LORAS) are full; an adapter is pinned while a request runs with it, so eviction never
pulls it from under a generation.

A fully fine-tuned result (a whole model directory) can't be an adapter: on first use it gets an engine of its own,
of the main engine's kind and settings, with the base model's context window. At most GENLOOM_MAX_FULL_MODELS such
engines run at once; to start another, the least recently used one no request is using is shut down, the same
pinning rule as for adapters. The extra engines are not part of health: one that dies is dropped and started again
by the next request that names its model, while the server keeps serving its base model.

The main engine's lifecycle (start, health checks, restart after a death, crash-loop give-up) is the serving pool's
(pool.py); requests take the engine from it, and adapters are loaded again into a restarted engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

from genloom.services.models.finetuned import FineTunedModel, FineTunedModelResolver, is_fine_tuned
from genloom.services.inference.adapters import AdapterSpec, inspect_adapter, resolve_adapter_path
from genloom.services.inference.engine import (
    AdapterError,
    Engine,
    EngineDeadError,
    EngineError,
    EngineInfo,
    EngineOutput,
    EngineOverloadedError,
    EngineRequest,
    FinishReason,
    RequestFailedError,
    SamplingError,
    SamplingOptions,
    ScoreQuery,
)
from genloom.services.inference.pool import RETRY_AFTER_DEATH_S, ServingPool
from genloom.services.inference.sampling import SamplingLimits, sampling_options
from genloom.services.inference.settings import InferenceSettings
from genloom.services.inference.text import TextAssembler
from genloom.services.models.registry import BUILTIN_MODELS, ModelRegistry, ModelSpec, looks_like_path
from genloom.services.server.conversation import conversation_messages
from genloom.services.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    quote,
)
from genloom.services.server.interceptors import request_id_var
from genloom.services.server.settings import ModelSettings
from genloom.services.tokenizer.store import LoadedTokenizer, load_tokenizer
from genloom.v1 import common_pb2, inference_pb2, inference_pb2_grpc

logger = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# When to retry a request the engine had no memory for: soon (others finish and free theirs).
OVERLOADED_RETRY_AFTER_S = 1.0
FINISH_TO_PB = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: inference_pb2.FINISH_REASON_EOS,
    FinishReason.STOP_TOKEN: inference_pb2.FINISH_REASON_STOP_TOKEN,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
}
ENGINE_TO_PB = {"vllm": inference_pb2.ENGINE_VLLM, "hf": inference_pb2.ENGINE_HF, "openai": inference_pb2.ENGINE_OPENAI}

EngineFactory = Callable[[ModelSpec, InferenceSettings, int], Engine]


def create_engine(spec: ModelSpec, settings: InferenceSettings, max_model_len: int) -> Engine:
    """The engine GENLOOM_ENGINE names (auto: vllm when importable, else hf)."""
    import importlib.util

    kind = settings.engine
    if kind == "auto":
        kind = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if kind == "vllm":
        from genloom.services.inference.engines.vllm import VLLMEngine

        return VLLMEngine(spec.path, spec.name, settings, max_model_len)
    if kind == "hf":
        from genloom.services.inference.engines.hf import HFEngine

        return HFEngine(spec.path, spec.name, settings, max_model_len)
    from genloom.services.inference.engines.openai import OpenAIEngine

    return OpenAIEngine(spec.path, spec.name, settings, max_model_len)


@dataclass(eq=False)
class LoadedAdapter:
    name: str  # what requests name it by (an "ft:" name for a fine-tuned model)
    spec: AdapterSpec
    loaded_at: datetime
    # The name the engine knows it by: the LoadAdapter name, or for a fine-tuned model one derived from its job id
    # (engines key adapters by name and PEFT refuses '.' in one, which an ft name may contain).
    engine_name: str = ""
    job_id: str = ""  # the fine-tuning job that produced it; "" for LoadAdapter adapters
    users: int = 0  # requests running with it now: a fine-tuned adapter is only evicted when this is 0
    last_used: float = 0.0  # monotonic; the least recently used fine-tuned adapter is evicted first

    def __post_init__(self) -> None:
        self.engine_name = self.engine_name or self.name
        self.last_used = self.last_used or time.monotonic()

    @property
    def fine_tuned(self) -> bool:
        return bool(self.job_id)


@dataclass(eq=False)
class FullModelEngine:
    """A fully fine-tuned model served by an engine of its own (started on first use, evicted least recently used)."""

    model: FineTunedModel
    engine: Engine
    tokenizer: LoadedTokenizer
    loaded_at: datetime
    users: int = 0  # requests running on it now: it is only shut down to make room when this is 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class ResolvedModel:
    """A request's model: what its response echoes, the engine and tokenizer that serve it, and the adapter or
    full-model engine it runs with (pinned until the request ends)."""

    echo: common_pb2.ModelRef
    engine: Engine
    tokenizer: LoadedTokenizer
    adapter: LoadedAdapter | None = None
    full: FullModelEngine | None = None

    @property
    def engine_adapter(self) -> str | None:
        return self.adapter.engine_name if self.adapter is not None else None


@dataclass
class PreparedPrompt:
    token_ids: list[int]
    report: inference_pb2.TruncationReport


@dataclass
class Generation:
    """A validated generation, ready for the engine."""

    request_id: str
    engine_request: EngineRequest
    assembler: TextAssembler
    prompt: PreparedPrompt
    model: common_pb2.ModelRef
    received: float
    engine: Engine
    tokenizer: LoadedTokenizer


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    name = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name

    def __init__(
        self,
        models: ModelSettings,
        settings: InferenceSettings | None = None,
        engine_factory: EngineFactory = create_engine,
        engine: Engine | None = None,
    ) -> None:
        """`engine`: an already started engine to serve instead of creating one (it is then not shut down by
        close(): its owner does that)."""
        self.models = models
        self.settings = settings or InferenceSettings()
        self._registry = ModelRegistry(models)
        self._engine_factory = engine_factory
        self._given_engine = engine
        self._pool: ServingPool | None = None  # the main engine's lifecycle (restarts after a death): pool.py
        self.tokenizer: LoadedTokenizer | None = None
        self.model_name = self._registry.default_name
        self._model_dir: Path | None = None
        self._fine_tuned = FineTunedModelResolver(models.redis_url)
        self._serves_base: dict[str, bool] = {}
        self._hidden_size = 0
        self._adapters: dict[str, LoadedAdapter] = {}
        self._adapter_lock = asyncio.Lock()
        self._full_models: dict[str, FullModelEngine] = {}  # by ft name; at most settings.max_full_models
        self._full_lock = asyncio.Lock()  # one engine start at a time: concurrent first requests start it once
        self._in_flight: dict[str, Engine] = {}  # request id -> the engine running it (for Abort)
        self._report_health: Callable[[bool], Awaitable[None]] | None = None

    # -- Service protocol ---------------------------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self, server)

    def bind_health(self, report: Callable[[bool], Awaitable[None]]) -> None:
        self._report_health = report

    @property
    def engine(self) -> Engine | None:
        """The main engine (while it restarts: the dead one, until its replacement is ready)."""
        return self._pool.engine if self._pool is not None else None

    async def start(self) -> None:
        spec = await asyncio.to_thread(self._registry.resolve, self.models.model)
        self.model_name = spec.name
        self._model_dir = spec.path
        self.tokenizer = await asyncio.to_thread(load_tokenizer, spec, self.models.max_model_len)
        self._hidden_size = _hidden_size(spec.path)
        window = self.tokenizer.context_window

        async def report(serving: bool) -> None:
            if self._report_health is not None:
                await self._report_health(serving)

        self._pool = ServingPool(
            self.settings,
            lambda: self._engine_factory(spec, self.settings, window),
            given=self._given_engine,
            restore=self._restore_adapters,
            watch=self._check_full_models,
            report_health=report,
        )
        engine = await self._pool.start()
        # The engine may allow less than the model config says (a remote server's max_model_len).
        engine_window = engine.info().context_window
        if engine_window and engine_window < self.tokenizer.context_window:
            self.tokenizer.context_window = engine_window
        logger.info("inference engine %s ready for %s", engine.info().engine, spec.name)

    async def close(self) -> None:
        try:
            for full in list(self._full_models.values()):
                await self._stop_full_model(full)
            engine = self.engine
            if self._pool is not None:
                await self._pool.close()  # shuts the engine down unless it was given
            if engine is not None and self._given_engine is not None:
                # A shared engine outlives this servicer: take out the fine-tuned adapters it loaded into it.
                for adapter in [a for a in self._adapters.values() if a.fine_tuned]:
                    with contextlib.suppress(EngineError):
                        await engine.remove_adapter(adapter.engine_name)
                    self._adapters.pop(adapter.name, None)
        finally:
            await self._fine_tuned.close()  # its Redis connections, whatever failed above

    async def _check_full_models(self) -> None:
        """Run by the pool's health checks: drop full-model engines that died (see _engine_failed)."""
        for full in list(self._full_models.values()):
            try:
                await full.engine.check_health()
            except EngineDeadError:
                await self._engine_failed(full.engine)

    async def _restore_adapters(self, engine: Engine) -> None:
        """Load every adapter the dead engine had into its replacement (run by the pool before the new engine is
        handed out). One that no longer loads (its directory was removed) is dropped from the table, with the
        reason logged: requests naming it get NOT_FOUND instead of failing the restart."""
        async with self._adapter_lock:
            for adapter in list(self._adapters.values()):
                try:
                    await engine.add_adapter(adapter.engine_name, str(adapter.spec.path))
                except AdapterError as err:
                    logger.error("adapter %s did not load into the restarted engine; unloaded: %s", adapter.name, err)
                    del self._adapters[adapter.name]
            if self._adapters:
                logger.info("%d adapters loaded again into the restarted engine", len(self._adapters))

    async def _engine_failed(self, engine: Engine, reason: str = "EngineDeadError in a call") -> None:
        """`engine` raised EngineDeadError: the main engine goes to the pool (which restarts it, or flips health);
        a full model's engine is dropped (and shut down), so the next request naming its model starts a fresh
        one."""
        if self._pool is not None and engine is self._pool.engine:
            await self._pool.died(engine, reason)
            return
        for full in list(self._full_models.values()):
            if full.engine is engine:
                logger.error("the engine serving %s died; it is started again on its next request", full.model.name)
                await self._stop_full_model(full)

    @staticmethod
    def _time_remaining(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return remaining if remaining is not None and remaining < 1e9 else None

    # -- RPCs -----------------------------------------------------------------------------------------------------

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        received = time.monotonic()
        async with self._resolved(request.model, context) as model:
            generation = self._prepare(request, model, received)
            response = inference_pb2.GenerateResponse(request_id=generation.request_id, model=generation.model)
            async for event in self._run(generation, context):
                if isinstance(event, inference_pb2.GenerateDelta):
                    response.token_ids.extend(event.token_ids)
                    response.logprobs.extend(event.logprobs)
                else:
                    response.text = generation.assembler.text
                    response.finish_reason = event.finish_reason
                    response.stop_sequence = event.stop_sequence
                    if event.HasField("stop_token_id"):
                        response.stop_token_id = event.stop_token_id
                    response.usage.CopyFrom(event.usage)
                    response.truncation.CopyFrom(event.truncation)
                    response.timing.CopyFrom(event.timing)
        return response

    async def GenerateStream(
        self, request: inference_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        received = time.monotonic()
        async with self._resolved(request.model, context) as model:
            generation = self._prepare(request, model, received)
            async for event in self._run(generation, context):
                if isinstance(event, inference_pb2.GenerateDelta):
                    yield inference_pb2.GenerateStreamResponse(request_id=generation.request_id, delta=event)
                else:
                    yield inference_pb2.GenerateStreamResponse(request_id=generation.request_id, finish=event)

    async def Score(
        self, request: inference_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ScoreResponse:
        async with self._resolved(request.model, context) as model:
            return await self._score(request, model, context)

    async def _score(
        self, request: inference_pb2.ScoreRequest, model: ResolvedModel, context: grpc.aio.ServicerContext | None = None
    ) -> inference_pb2.ScoreResponse:
        engine, tok = model.engine, model.tokenizer
        s = self.settings
        _check_truncation(request.truncation)
        if not request.items:
            raise InvalidArgument.field("items", "must contain at least one item")
        if len(request.items) > s.score_max_items:
            raise InvalidArgument.field(
                "items", f"has {len(request.items)} items; the limit is {s.score_max_items} (GENLOOM_SCORE_MAX_ITEMS)"
            )
        total = sum(len(item.candidates) for item in request.items)
        if total > s.score_max_candidates:
            raise InvalidArgument.field(
                "items",
                f"has {total} candidates in all; the limit is {s.score_max_candidates} (GENLOOM_SCORE_MAX_CANDIDATES)",
            )
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        queries: list[ScoreQuery] = []
        prompts: list[PreparedPrompt] = []
        candidate_ids: list[list[list[int]]] = []
        for i, item in enumerate(request.items):
            field = f"items[{i}]"
            if not item.candidates:
                raise InvalidArgument.field(f"{field}.candidates", "must contain at least one candidate")
            empty = [j for j, c in enumerate(item.candidates) if not c]
            if empty:
                raise InvalidArgument.field(f"{field}.candidates[{empty[0]}]", "candidates must not be empty")
            encoded = [enc.ids for enc in tok.encode(list(item.candidates), False)]
            longest = max(len(ids) for ids in encoded)
            prompt = self._prompt(
                item.prompt, f"{field}.prompt", tok, add_special, request.truncation, reserve=longest, for_score=True
            )
            prompts.append(prompt)
            candidate_ids.append(encoded)
            queries.append(ScoreQuery(prompt.token_ids, encoded, adapter=model.engine_adapter))
        scores = await self._engine_score(engine, queries, model, context)
        response = inference_pb2.ScoreResponse(model=model.echo)
        prefilled = 0
        for prompt, ids_per_candidate, item_scores in zip(prompts, candidate_ids, scores, strict=True):
            result = response.results.add(prompt_tokens=len(prompt.token_ids), truncation=prompt.report)
            for ids, logprobs in zip(ids_per_candidate, item_scores, strict=True):
                total_lp = float(sum(logprobs))
                candidate = result.candidates.add(
                    sum_logprob=total_lp, mean_logprob=total_lp / len(ids), token_count=len(ids), token_ids=ids
                )
                if request.return_token_logprobs:
                    candidate.token_logprobs.extend(logprobs)
                prefilled += len(prompt.token_ids) + len(ids)
        response.usage.CopyFrom(common_pb2.Usage(prompt_tokens=prefilled, total_tokens=prefilled))
        return response

    async def _engine_score(
        self,
        engine: Engine,
        queries: list[ScoreQuery],
        model: ResolvedModel,
        context: grpc.aio.ServicerContext | None,
    ) -> list[list[list[float]]]:
        """Score on `engine`; when the main engine dies under the call (nothing was returned yet), once more on its
        replacement once the pool has restarted it."""
        for attempt in range(2):
            try:
                return await engine.score(queries)
            except EngineDeadError as err:
                await self._engine_failed(engine, str(err))
                if attempt or model.full is not None or not self._replacing(engine):
                    raise _died_while("scoring") from None
                engine = await self._acquire(context)
            except EngineError as err:
                # A refusal is about what the items ask for (e.g. a remote server's 4xx).
                raise _request_error(err, request_id_var.get(), field="items") from None
        raise AssertionError("unreachable")

    async def Abort(
        self, request: inference_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.AbortResponse:
        self._ready()
        if not request.request_id:
            raise InvalidArgument.field("request_id", "is required")
        if not REQUEST_ID.match(request.request_id):
            # No generation can have such an id (see _prepare); refusing it also keeps a huge id out of the logs.
            raise InvalidArgument.field(
                "request_id", f"{quote(request.request_id)} is not 1 to 128 characters from [A-Za-z0-9._:-]"
            )
        engine = self._in_flight.get(request.request_id)  # the main engine, or a full fine-tuned model's
        if engine is None:
            return inference_pb2.AbortResponse(aborted=False)
        return inference_pb2.AbortResponse(aborted=await engine.abort(request.request_id))

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        engine, tok = self._ready()
        info = engine.info()
        engine_kind = ENGINE_TO_PB.get(info.engine, inference_pb2.ENGINE_UNSPECIFIED)
        models = [
            inference_pb2.ModelSummary(
                name=self.model_name,
                is_default=True,
                kind=inference_pb2.MODEL_KIND_BASE,
                context_window=tok.context_window,
                engine=engine_kind,
                ready=self._serving,
            )
        ]
        # Fine-tuned models this server has loaded (others are registered in Redis and loaded on first use).
        fine_tuned = [
            inference_pb2.ModelSummary(
                name=adapter.name,
                kind=inference_pb2.MODEL_KIND_FINE_TUNED_ADAPTER,
                base_model=self.model_name,
                context_window=tok.context_window,
                engine=engine_kind,
                ready=self._serving,
            )
            for adapter in self._adapters.values()
            if adapter.fine_tuned
        ]
        fine_tuned.extend(
            inference_pb2.ModelSummary(
                name=full.model.name,
                kind=inference_pb2.MODEL_KIND_FINE_TUNED_FULL,
                base_model=self.model_name,
                context_window=full.tokenizer.context_window,
                engine=ENGINE_TO_PB.get(full.engine.info().engine, inference_pb2.ENGINE_UNSPECIFIED),
                ready=True,
            )
            for full in self._full_models.values()
        )
        models.extend(sorted(fine_tuned, key=lambda m: m.name))
        return inference_pb2.ListModelsResponse(models=models)

    async def GetModelInfo(
        self, request: inference_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GetModelInfoResponse:
        engine, tok = self._ready()
        fine_tuned: FineTunedModel | None = None
        kind = inference_pb2.MODEL_KIND_BASE
        ready = self._serving
        if is_fine_tuned(request.model):
            fine_tuned = await self._fine_tuned.resolve(request.model, "model")
            await self._check_fine_tuned(fine_tuned, "model", engine)
            kind = inference_pb2.MODEL_KIND_FINE_TUNED_ADAPTER
        else:
            await self._check_model(request.model, "model")
        if fine_tuned is not None and fine_tuned.method == "full":
            kind = inference_pb2.MODEL_KIND_FINE_TUNED_FULL
            # Described without starting its engine: until a request starts one, the main engine's kind and
            # settings say what it will be, and it is not ready.
            full = self._full_models.get(fine_tuned.name)
            ready = full is not None
            if full is not None:
                engine, tok = full.engine, full.tokenizer
        info = engine.info()
        full_model = kind == inference_pb2.MODEL_KIND_FINE_TUNED_FULL
        running, waiting = (0, 0) if full_model and not ready else engine.load()
        s = self.settings
        adapters = list(self._adapters.values())
        if fine_tuned is not None:
            adapters = [a for a in adapters if a.name == fine_tuned.name]
        return inference_pb2.GetModelInfoResponse(
            name=fine_tuned.name if fine_tuned else self.model_name,
            is_default=fine_tuned is None,
            kind=kind,
            base_model=self.model_name if fine_tuned else "",
            source=_shown_source(info, fine_tuned),
            engine=ENGINE_TO_PB.get(info.engine, inference_pb2.ENGINE_UNSPECIFIED),
            engine_version=info.engine_version,
            dtype=info.dtype,
            device=info.device,
            context_window=tok.context_window,
            vocab_size=tok.vocab_size,
            has_chat_template=bool(tok.chat_template),
            supports_lora=info.supports_lora and not full_model,
            max_lora_rank=info.max_lora_rank if info.supports_lora and not full_model else 0,
            max_loras=info.max_loras if info.supports_lora and not full_model else 0,
            adapters=[self._adapter_pb(a) for a in adapters],
            default_max_new_tokens=s.default_max_new_tokens,
            max_logprobs=s.max_logprobs,
            max_stop_sequences=s.max_stop_sequences,
            max_score_candidates=s.score_max_candidates,
            max_queued_requests=s.max_queued_requests,
            running_requests=running,
            waiting_requests=waiting,
            ready=ready,
        )

    async def LoadAdapter(
        self, request: inference_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.LoadAdapterResponse:
        engine = await self._acquire(context)
        name = request.name
        if not REQUEST_ID.match(name) or ":" in name:
            raise InvalidArgument.field(
                "name", "1 to 128 characters from [A-Za-z0-9._-] (':' is reserved for fine-tuned models)"
            )
        if not request.path:
            raise InvalidArgument.field("path", "is required: a PEFT LoRA adapter directory on the server")
        if request.base_model:
            await self._check_model(request.base_model, "base_model")
        if not engine.info().supports_lora:
            raise InvalidArgument("this server's engine does not serve LoRA adapters (GENLOOM_ENABLE_LORA)")
        # Inside GENLOOM_ADAPTER_ROOTS, containment before existence; messages name the client's string only.
        directory = await asyncio.to_thread(resolve_adapter_path, request.path, self.settings.adapter_roots)
        label = f"adapter path {quote(request.path)}"
        async with self._adapter_lock:
            if name in self._adapters and not request.replace:
                raise AlreadyExists(f"adapter {quote(name)} is already loaded; set replace to swap it")
            try:
                spec = await asyncio.to_thread(
                    inspect_adapter,
                    directory,
                    hidden_size=self._hidden_size,
                    max_rank=engine.info().max_lora_rank,
                    label=label,
                )
            except AdapterError as err:
                # Our own checks name the directory by the client's spelling (label) only.
                message = str(err)
                raise InvalidArgument(message, [FieldViolation("path", message)]) from None
            spec = dataclasses.replace(spec, shown_path=request.path)
            try:
                if name in self._adapters:
                    await engine.remove_adapter(name)
                    del self._adapters[name]
                else:
                    await self._make_room(engine)
                await engine.add_adapter(name, str(spec.path))
            except AdapterError as err:
                # An engine's (PEFT's, vLLM's, a remote server's) text can name server paths: the log keeps it.
                logger.warning("adapter %s from %s refused by the engine: %s", name, directory, err)
                message = f"{label} could not be loaded into the engine (the server log has the details)"
                raise InvalidArgument(message, [FieldViolation("path", message)]) from None
            except EngineDeadError as err:
                await self._engine_failed(engine, str(err))
                raise _died_while("loading the adapter") from None
            loaded = LoadedAdapter(name, spec, datetime.now(timezone.utc))
            self._adapters[name] = loaded
        logger.info("adapter %s loaded from %s (rank %d)", name, spec.path, spec.rank)
        return inference_pb2.LoadAdapterResponse(adapter=self._adapter_pb(loaded))

    async def UnloadAdapter(
        self, request: inference_pb2.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.UnloadAdapterResponse:
        engine = await self._acquire(context)
        async with self._adapter_lock:
            loaded = self._adapters.get(request.name)
            if loaded is None:
                raise NotFound(f"no adapter named {quote(request.name)} is loaded")
            try:
                await engine.remove_adapter(loaded.engine_name)
            except EngineDeadError as err:
                await self._engine_failed(engine, str(err))
                raise _died_while("unloading the adapter") from None
            del self._adapters[request.name]
        pb = self._adapter_pb(loaded)
        pb.loaded = False
        return inference_pb2.UnloadAdapterResponse(adapter=pb)

    async def ListAdapters(
        self, request: inference_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListAdaptersResponse:
        self._ready()
        if request.base_model:
            await self._check_model(request.base_model, "base_model")
        return inference_pb2.ListAdaptersResponse(adapters=[self._adapter_pb(a) for a in self._adapters.values()])

    # -- generation -----------------------------------------------------------------------------------------------

    def _prepare(self, request: Any, model: ResolvedModel, received: float) -> Generation:
        """Validate a Generate/GenerateStream request and turn it into an engine request."""
        engine, tok = model.engine, model.tokenizer
        request_id = request.request_id or uuid.uuid4().hex
        if not REQUEST_ID.match(request_id):
            raise InvalidArgument.field("request_id", "1 to 128 characters from [A-Za-z0-9._:-]")
        if request_id in self._in_flight:
            raise AlreadyExists(f"request {quote(request_id)} is already in flight")
        _check_truncation(request.truncation)
        sampling, stop, skip_special = self._sampling(request.sampling, tok)
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        prompt = self._prompt(
            request.prompt, "prompt", tok, add_special, request.truncation, reserve=sampling.max_new_tokens
        )
        _, waiting = engine.load()
        if waiting >= self.settings.max_queued_requests:
            raise ResourceExhausted(
                f"{waiting} requests are waiting for the engine (limit {self.settings.max_queued_requests}); "
                "retry later",
                retry_after=1.0,
            )
        assembler = TextAssembler(
            tok.hf, stop, skip_special_tokens=skip_special, min_new_tokens=sampling.min_new_tokens
        )
        engine_request = EngineRequest(request_id, prompt.token_ids, sampling, adapter=model.engine_adapter)
        return Generation(request_id, engine_request, assembler, prompt, model.echo, received, engine, tok)

    async def _outputs(self, g: Generation, context: grpc.aio.ServicerContext | None) -> AsyncIterator[EngineOutput]:
        """The engine's outputs for `g`. When the main engine dies before the request produced anything (it was
        still queued), the request runs again, once, on the engine the pool restarts; a request that was already
        generating ends with EngineDeadError (UNAVAILABLE + RetryInfo for its caller)."""
        engine = g.engine
        for attempt in range(2):
            self._in_flight[g.request_id] = engine
            stream = engine.generate(g.engine_request)
            produced = False
            try:
                async for output in stream:
                    produced = True
                    yield output
                return
            except EngineDeadError as err:
                await self._engine_failed(engine, str(err))
                if produced or attempt or not self._replacing(engine):
                    raise
                logger.info("request %s waits for the restarted engine", g.request_id)
                engine = await self._acquire(context)
            finally:
                await stream.aclose()

    async def _run(
        self, g: Generation, context: grpc.aio.ServicerContext | None = None
    ) -> AsyncIterator[inference_pb2.GenerateDelta | inference_pb2.GenerateFinish]:
        """Drive one generation: deltas as text becomes final, then the finish. Cancelling the caller (client
        cancel, deadline) closes the engine stream, which aborts the request in the engine."""
        engine, tok = g.engine, g.tokenizer
        self._in_flight[g.request_id] = engine
        first_token_at: float | None = None
        offset = 0
        last: EngineOutput | None = None
        stream = self._outputs(g, context)
        try:
            async for output in stream:
                if first_token_at is None and output.token_ids:
                    first_token_at = time.monotonic()
                text = g.assembler.push(output.token_ids)
                delta = inference_pb2.GenerateDelta(token_ids=output.token_ids, text=text, token_offset=offset)
                if g.engine_request.sampling.logprobs is not None:
                    delta.logprobs.extend(_logprobs_pb(output, tok))
                offset += len(output.token_ids)
                if output.token_ids or text:
                    yield delta
                last = output
                if output.finish_reason is not None or g.assembler.stop_sequence is not None:
                    break
        except EngineDeadError:
            # _outputs has told the pool (about the engine the request last ran on, which may not be g.engine).
            raise _died_while("generating") from None
        except EngineError as err:
            # A refusal other than sampling is about the prompt (e.g. a remote server's 4xx): the engine checked
            # nothing else.
            raise _request_error(err, g.request_id, field="prompt") from None
        finally:
            await stream.aclose()  # aborts the request in the engine if it is still running
            self._in_flight.pop(g.request_id, None)
        tail = g.assembler.finish()
        if tail:
            yield inference_pb2.GenerateDelta(text=tail, token_offset=offset)
        finished = time.monotonic()
        finish = inference_pb2.GenerateFinish(
            model=g.model,
            usage=common_pb2.Usage(
                prompt_tokens=len(g.prompt.token_ids),
                completion_tokens=offset,
                total_tokens=len(g.prompt.token_ids) + offset,
            ),
            truncation=g.prompt.report,
            timing=inference_pb2.GenerationTiming(
                time_to_first_token_s=(first_token_at or finished) - g.received,
                total_s=finished - g.received,
            ),
        )
        if g.assembler.stop_sequence is not None:
            finish.finish_reason = inference_pb2.FINISH_REASON_STOP_SEQUENCE
            finish.stop_sequence = g.assembler.stop_sequence
        elif last is not None and last.finish_reason is not None:
            finish.finish_reason = FINISH_TO_PB[last.finish_reason]
            if last.finish_reason is FinishReason.STOP_TOKEN and last.stop_token_id is not None:
                finish.stop_token_id = last.stop_token_id
        else:
            finish.finish_reason = inference_pb2.FINISH_REASON_ABORT
        yield finish

    # -- validation helpers ---------------------------------------------------------------------------------------

    def _ready(self) -> tuple[Engine, LoadedTokenizer]:
        """The main engine and tokenizer, to describe (whatever the engine's health: see `_serving`); calls that
        run something on the engine take it from `_acquire`."""
        if self._pool is None or self.tokenizer is None:
            raise Unavailable("the inference engine is still starting; retry shortly", retry_after=1.0)
        return self._pool.current(), self.tokenizer

    async def _acquire(self, context: grpc.aio.ServicerContext | None) -> Engine:
        """The main engine to run a call on; while the pool restarts it, waits (bounded by the call's deadline
        and GENLOOM_ENGINE_RESTART_WAIT), else UNAVAILABLE with RetryInfo."""
        if self._pool is None or self.tokenizer is None:
            raise Unavailable("the inference engine is still starting; retry shortly", retry_after=1.0)
        return await self._pool.acquire(self._time_remaining(context) if context is not None else None)

    @property
    def _serving(self) -> bool:
        return self._pool is not None and self._pool.serving

    def _replacing(self, engine: Engine) -> bool:
        return self._pool is not None and self._pool.will_replace(engine)

    async def _check_model(self, name: str, field: str) -> None:
        if not name or name == self.model_name:
            return
        # Another spelling of the served model (GENLOOM_MODEL's own value; with GENLOOM_ALLOW_MODEL_PATHS, a path
        # to its directory): a path lookup, so off the event loop; refused paths are refused as the tokenizer does.
        if looks_like_path(name) and await asyncio.to_thread(self._registry.name_of, name, field) == self.model_name:
            return
        raise NotFound(f"{field}: model {quote(name)} is not served here; this server serves {quote(self.model_name)}")

    @asynccontextmanager
    async def _resolved(
        self, ref: common_pb2.ModelRef, context: grpc.aio.ServicerContext | None = None
    ) -> AsyncIterator[ResolvedModel]:
        """The request's model, its adapter or full-model engine pinned (not evictable) until the block ends. A
        fine-tuned name is looked up and its adapter loaded, or its engine started, on first use."""
        engine = await self._acquire(context)
        tok = self._ready()[1]
        if is_fine_tuned(ref.model):
            if ref.adapter:
                raise InvalidArgument.field(
                    "model.adapter",
                    f"must be empty when model.model names a fine-tuned model ({quote(ref.model)} already is a base "
                    "model plus its own adapter, or a whole model of its own)",
                )
            echo = common_pb2.ModelRef(model=ref.model)
            full = await self._full_model(ref.model, "model.model", engine)
            if full is not None:
                resolved = ResolvedModel(echo, full.engine, full.tokenizer, full=full)
            else:
                resolved = ResolvedModel(
                    echo, engine, tok, adapter=await self._fine_tuned_adapter(ref.model, "model.model", engine)
                )
        elif is_fine_tuned(ref.adapter):
            await self._check_model(ref.model, "model.model")
            resolved = ResolvedModel(
                common_pb2.ModelRef(model=self.model_name, adapter=ref.adapter),
                engine,
                tok,
                adapter=await self._fine_tuned_adapter(ref.adapter, "model.adapter", engine),
            )
        else:
            await self._check_model(ref.model, "model.model")
            adapter = self._adapters.get(ref.adapter) if ref.adapter else None
            if ref.adapter and adapter is None:
                raise NotFound(f"model.adapter: no adapter named {quote(ref.adapter)} is loaded (see ListAdapters)")
            if adapter is not None:
                self._pin(adapter)
            resolved = ResolvedModel(
                common_pb2.ModelRef(model=self.model_name, adapter=ref.adapter), engine, tok, adapter=adapter
            )
        try:
            yield resolved
        finally:
            if resolved.adapter is not None:
                resolved.adapter.users -= 1
            if resolved.full is not None:
                resolved.full.users -= 1

    @staticmethod
    def _pin(adapter: LoadedAdapter) -> None:
        adapter.users += 1
        adapter.last_used = time.monotonic()

    async def _fine_tuned_adapter(self, name: str, field: str, engine: Engine) -> LoadedAdapter:
        """The fine-tuned model `name`'s adapter, loaded into the engine if it is not yet, and pinned."""
        loaded = self._adapters.get(name)
        if loaded is not None:  # the common case: no Redis, no lock
            self._pin(loaded)
            return loaded
        model = await self._fine_tuned.resolve(name, field)
        if model.method == "full":
            raise InvalidArgument.field(
                field,
                f"{quote(name)} is a fully fine-tuned model, not an adapter: name it as model.model, without an "
                "adapter",
            )
        await self._check_fine_tuned(model, field, engine)
        async with self._adapter_lock:  # concurrent first requests load it once
            loaded = self._adapters.get(name)
            if loaded is None:
                loaded = await self._load_fine_tuned(model, engine)
            self._pin(loaded)
        return loaded

    async def _check_fine_tuned(self, model: FineTunedModel, field: str, engine: Engine) -> None:
        """Refuse a registered model this server can't serve, saying what would serve it."""
        if not await self._serves(model.base_model):
            raise NotFound(
                f"{field}: fine-tuned model {model.name!r} is based on {model.base_model!r}, but this server serves "
                f"{self.model_name!r}; send it to a server whose GENLOOM_MODEL is {model.base_model!r}"
            )
        if model.method == "full":
            # A whole fine-tuned model needs an engine (and memory) of its own.
            if self.settings.max_full_models < 1:
                raise FailedPrecondition(
                    f"{field}: {model.name!r} is a fully fine-tuned model and this server serves none "
                    "(GENLOOM_MAX_FULL_MODELS=0); raise GENLOOM_MAX_FULL_MODELS, or serve its directory as a model of "
                    f"its own (its result directory in GENLOOM_MODELS, or GENLOOM_MODEL)"
                )
            if engine.info().engine == "openai":
                raise FailedPrecondition(
                    f"{field}: {model.name!r} is a fully fine-tuned model, and a remote engine (GENLOOM_ENGINE=openai) "
                    f"can't load a local model directory; serve its result directory with the remote server"
                )
            return
        if model.method != "lora":
            raise FailedPrecondition(f"{field}: {model.name!r} is registered with an unknown method {model.method!r}")
        if not engine.info().supports_lora:
            raise FailedPrecondition(
                f"{field}: {model.name!r} is a LoRA fine-tune and this server does not serve LoRA adapters; "
                "start it with GENLOOM_ENABLE_LORA=true (the hf engine also needs the peft package)"
            )

    async def _full_model(self, name: str, field: str, engine: Engine) -> FullModelEngine | None:
        """The engine serving the fully fine-tuned model `name`, started if it is not yet, and pinned; None when
        `name` is a LoRA fine-tune."""
        full = self._full_models.get(name)
        if full is not None:
            # One that died since the last health check is dropped here and started afresh, not handed out.
            try:
                await full.engine.check_health()
            except EngineDeadError as err:
                await self._engine_failed(full.engine, str(err))
            full = self._full_models.get(name)  # again: the check awaited
        if full is None:
            if name in self._adapters:
                return None
            model = await self._fine_tuned.resolve(name, field)
            if model.method != "full":
                return None
            await self._check_fine_tuned(model, field, engine)
            async with self._full_lock:  # concurrent first requests start it once
                full = self._full_models.get(name)
                if full is None:
                    full = await self._start_full_model(model)
        # No await between the lookup (or the start) and the pin: eviction sees users > 0 and leaves it alone.
        full.users += 1
        full.last_used = time.monotonic()
        return full

    async def _start_full_model(self, model: FineTunedModel) -> FullModelEngine:
        """Start an engine for a fully fine-tuned model directory (under the full-model lock): the main engine's
        kind and settings, the base model's context window, and the directory's own tokenizer (a full fine-tune
        keeps its base's vocabulary, but the directory is what the weights were saved with)."""
        assert self.engine is not None and self.tokenizer is not None
        path = Path(model.path)
        if not await asyncio.to_thread((path / "config.json").is_file):
            logger.warning("fine-tuned model %s: %s has no config.json", model.name, path)
            raise FailedPrecondition(
                f"fine-tuned model {quote(model.name)} can't be served: its directory is not a model (no config.json)"
            )
        spec = ModelSpec(model.name, path)
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, spec, self.models.max_model_len)
        except Exception:
            # The loader's text names server paths: the log has it, the client a plain reason.
            logger.exception("the tokenizer of fine-tuned model %s does not load", model.name)
            raise FailedPrecondition(
                f"fine-tuned model {quote(model.name)} can't be served: its tokenizer does not load"
            ) from None
        if tokenizer.vocab_size != self.tokenizer.vocab_size:
            logger.warning(
                "fine-tuned model %s has a vocabulary of %d tokens, its base %s one of %d",
                model.name,
                tokenizer.vocab_size,
                self.model_name,
                self.tokenizer.vocab_size,
            )
        await self._make_full_room()
        window = self.tokenizer.context_window
        # Same kind as the main engine (not GENLOOM_ENGINE=auto's pick: an engine given from outside may differ);
        # no LoRA: adapters apply to the base model, not to a full fine-tune.
        settings = dataclasses.replace(self.settings, engine=self.engine.info().engine, enable_lora=False)
        engine = self._engine_factory(spec, settings, window)
        try:
            await engine.start()
        except Exception:
            logger.exception("the engine for fine-tuned model %s did not start", model.name)
            with contextlib.suppress(Exception):
                await engine.shutdown()
            raise FailedPrecondition(
                f"fine-tuned model {quote(model.name)} can't be served: its engine did not start (see the server log)"
            ) from None
        engine_window = engine.info().context_window
        tokenizer.context_window = min(window, tokenizer.context_window, engine_window or window)
        full = FullModelEngine(model, engine, tokenizer, datetime.now(timezone.utc))
        self._full_models[model.name] = full
        logger.info("fully fine-tuned model %s started from %s", model.name, path)
        return full

    async def _make_full_room(self) -> None:
        """Make room for one more full-model engine (under the full-model lock): shut down the least recently used
        one no request is using."""
        limit = self.settings.max_full_models
        while len(self._full_models) >= limit:
            idle = [f for f in self._full_models.values() if f.users == 0]
            if not idle:
                raise ResourceExhausted(
                    f"all {limit} fully fine-tuned model engines (GENLOOM_MAX_FULL_MODELS) are serving requests; "
                    "retry shortly",
                    retry_after=1.0,
                )
            victim = min(idle, key=lambda f: f.last_used)
            await self._stop_full_model(victim)
            logger.info("fully fine-tuned model %s shut down (least recently used)", victim.model.name)

    async def _stop_full_model(self, full: FullModelEngine) -> None:
        """Take `full` out of the table (a request arriving meanwhile starts a fresh engine) and shut it down."""
        if self._full_models.get(full.model.name) is not full:
            return  # already taken out by someone else, who shuts it down
        del self._full_models[full.model.name]
        try:
            await full.engine.shutdown()
        except Exception:
            logger.exception("shutting down the engine of fine-tuned model %s failed", full.model.name)

    async def _serves(self, base_model: str) -> bool:
        """Whether `base_model` is the model this server serves: its name, or another name for its directory."""
        if base_model == self.model_name:
            return True
        known = self._serves_base.get(base_model)
        if known is None and base_model in BUILTIN_MODELS:
            known = False  # resolving a built-in model would convert it, only to find another directory
        if known is None:
            try:
                spec = await asyncio.to_thread(self._registry.resolve, base_model)
            except ServiceError:  # unknown here, or a model path this server may not read
                known = False
            else:
                known = self._model_dir is not None and spec.path.resolve() == self._model_dir.resolve()
            self._serves_base[base_model] = known
        return known

    async def _load_fine_tuned(self, model: FineTunedModel, engine: Engine) -> LoadedAdapter:
        """Validate and load a registered LoRA adapter (under the adapter lock)."""
        try:
            spec = await asyncio.to_thread(
                inspect_adapter, model.path, hidden_size=self._hidden_size, max_rank=engine.info().max_lora_rank
            )
        except AdapterError as err:
            raise FailedPrecondition(f"fine-tuned model {model.name!r} can't be served: {err}") from None
        await self._make_room(engine)
        digest = hashlib.sha256(model.name.encode()).hexdigest()[:12]
        loaded = LoadedAdapter(
            model.name, spec, datetime.now(timezone.utc), engine_name=f"ft:{model.job_id}:{digest}", job_id=model.job_id
        )
        try:
            await engine.add_adapter(loaded.engine_name, str(spec.path))
        except EngineDeadError as err:
            await self._engine_failed(engine, str(err))
            raise Unavailable("the inference engine is not available", retry_after=RETRY_AFTER_DEATH_S) from None
        except AdapterError as err:
            # The engine's text may name the adapter's directory (a server path): the log keeps it.
            logger.warning("fine-tuned model %s did not load into the engine: %s", model.name, err)
            raise FailedPrecondition(
                f"fine-tuned model {quote(model.name)} can't be loaded into the engine (see the server log)"
            ) from None
        self._adapters[model.name] = loaded
        logger.info("fine-tuned model %s loaded from %s (rank %d)", model.name, spec.path, spec.rank)
        return loaded

    async def _make_room(self, engine: Engine) -> None:
        """Free an adapter slot for one more adapter (under the adapter lock): evict the least recently used
        fine-tuned adapter no request is using. LoadAdapter adapters are never evicted: someone loaded them on
        purpose, and a later request naming one could not bring it back."""
        limit = engine.info().max_loras
        while limit and len(self._adapters) >= limit:
            idle = [a for a in self._adapters.values() if a.fine_tuned and a.users == 0]
            if not idle:
                if any(a.fine_tuned for a in self._adapters.values()):
                    raise ResourceExhausted(
                        f"all {limit} adapter slots (GENLOOM_MAX_LORAS) hold adapters that requests are using; "
                        "retry shortly",
                        retry_after=1.0,
                    )
                raise FailedPrecondition(
                    f"all {limit} adapter slots (GENLOOM_MAX_LORAS) hold adapters loaded with LoadAdapter; unload "
                    "one (UnloadAdapter) or raise GENLOOM_MAX_LORAS"
                )
            victim = min(idle, key=lambda a: a.last_used)
            # Out of the table first: a request arriving meanwhile goes to the (locked) loading path, not to an
            # adapter on its way out of the engine.
            del self._adapters[victim.name]
            try:
                await engine.remove_adapter(victim.engine_name)
            except EngineDeadError as err:
                await self._engine_failed(engine, str(err))
                raise Unavailable("the inference engine is not available", retry_after=RETRY_AFTER_DEATH_S) from None
            except AdapterError:
                pass  # already gone from the engine: the slot is free either way
            logger.info("fine-tuned model %s evicted from the engine (least recently used)", victim.name)

    def _sampling(
        self, params: inference_pb2.SamplingParams, tok: LoadedTokenizer
    ) -> tuple[SamplingOptions, list[str], bool]:
        s = self.settings
        limits = SamplingLimits(
            default_max_new_tokens=s.default_max_new_tokens,
            vocab_size=tok.vocab_size,
            max_logprobs=s.max_logprobs,
            max_stop_sequences=s.max_stop_sequences,
        )
        options = sampling_options(params, limits)
        skip_special = params.skip_special_tokens if params.HasField("skip_special_tokens") else True
        return options, list(params.stop), skip_special

    def _prompt(
        self,
        prompt: inference_pb2.Prompt,
        field: str,
        tok: LoadedTokenizer,
        add_special_tokens: bool,
        truncation: int,
        *,
        reserve: int,
        for_score: bool = False,
    ) -> PreparedPrompt:
        """Prompt -> ids that fit the context window with `reserve` tokens to spare (or a clear error)."""
        window = tok.context_window
        kind = prompt.WhichOneof("prompt")
        removed_messages = 0
        original = 0
        if kind == "text":
            if not prompt.text:
                raise InvalidArgument.field(f"{field}.text", "must not be empty")
            ids = tok.encode([prompt.text], add_special_tokens)[0].ids
        elif kind == "token_ids":
            ids = list(prompt.token_ids.ids)
            if not ids:
                raise InvalidArgument.field(f"{field}.token_ids", "must contain at least one id")
            bad = [i for i, t in enumerate(ids) if t >= tok.vocab_size]
            if bad:
                raise InvalidArgument.field(
                    f"{field}.token_ids.ids[{bad[0]}]",
                    f"token id {ids[bad[0]]} is outside the vocabulary (size {tok.vocab_size})",
                )
        elif kind == "conversation":
            messages = conversation_messages(prompt.conversation, f"{field}.conversation")
            ids, removed_messages, original = self._fit_conversation(messages, field, tok, truncation, window - reserve)
        else:
            raise InvalidArgument.field(field, "set text, conversation or token_ids")
        report = inference_pb2.TruncationReport(
            context_window=window, max_new_tokens=0 if for_score else reserve, original_prompt_tokens=len(ids)
        )
        if removed_messages:
            report.truncated = True
            report.side = common_pb2.TRUNCATION_SIDE_LEFT
            report.removed_messages = removed_messages
            report.original_prompt_tokens = original
        if len(ids) + reserve > window:
            what = "candidate tokens" if for_score else "max_new_tokens"
            if truncation == common_pb2.TRUNCATION_SIDE_UNSPECIFIED or kind == "conversation":
                raise InvalidArgument(
                    f"{field}: {len(ids)} prompt tokens + {reserve} {what} = {len(ids) + reserve}, over the model's "
                    f"context window of {window} tokens; shorten the prompt, lower {what}, or set truncation",
                    [FieldViolation(field, f"{len(ids)} + {reserve} > {window} tokens")],
                )
            keep = window - reserve
            if keep < 1:
                raise InvalidArgument.field(
                    "sampling.max_new_tokens" if not for_score else field,
                    f"{reserve} leaves no room for a prompt in {window} tokens",
                )
            report.truncated = True
            report.side = truncation
            report.original_prompt_tokens = len(ids)
            ids = ids[-keep:] if truncation == common_pb2.TRUNCATION_SIDE_LEFT else ids[:keep]
        report.prompt_tokens = len(ids)
        report.removed_tokens = report.original_prompt_tokens - len(ids)
        return PreparedPrompt(ids, report)

    def _fit_conversation(
        self, messages: list[dict[str, str]], field: str, tok: LoadedTokenizer, truncation: int, budget: int
    ) -> tuple[list[int], int, int]:
        """Render a conversation; with LEFT truncation drop the oldest non-system messages until it fits.
        Returns (ids, messages removed, tokens before removal)."""

        def render(msgs: list[dict[str, str]]) -> list[int]:
            return list(tok.encode([tok.render_chat(msgs, True)], False)[0].ids)

        ids = render(messages)
        original = len(ids)
        if len(ids) <= budget or truncation == common_pb2.TRUNCATION_SIDE_UNSPECIFIED:
            return ids, 0, original
        if truncation == common_pb2.TRUNCATION_SIDE_RIGHT:
            raise InvalidArgument.field("truncation", "RIGHT truncation is not allowed for conversations: use LEFT")
        system = 0
        while system < len(messages) and messages[system]["role"] == "system":
            system += 1
        removed = 0
        kept = list(messages)
        while len(ids) > budget and len(kept) - system > 1:
            del kept[system]
            removed += 1
            ids = render(kept)
        if len(ids) > budget:
            raise InvalidArgument.field(
                f"{field}.conversation", f"the last message alone needs {len(ids)} tokens; only {budget} are available"
            )
        return ids, removed, original

    def _adapter_pb(self, adapter: LoadedAdapter) -> inference_pb2.AdapterInfo:
        source = inference_pb2.ADAPTER_SOURCE_FINE_TUNE if adapter.fine_tuned else inference_pb2.ADAPTER_SOURCE_LOADED
        pb = inference_pb2.AdapterInfo(
            name=adapter.name,
            path=adapter.spec.shown_path,
            base_model=self.model_name,
            rank=adapter.spec.rank,
            alpha=adapter.spec.alpha,
            target_modules=adapter.spec.target_modules,
            source=source,
            job_id=adapter.job_id,
            loaded=True,
        )
        pb.loaded_at.FromDatetime(adapter.loaded_at)
        return pb


def _check_truncation(value: int) -> None:
    """An unknown TruncationSide (99, -1: proto3 enums are open) is refused, as the task service does."""
    if value not in common_pb2.TruncationSide.values():
        raise InvalidArgument.field("truncation", f"{value} is not a valid TruncationSide")


def _logprobs_pb(output: EngineOutput, tok: LoadedTokenizer) -> list[inference_pb2.TokenLogprob]:
    result = []
    for lp in output.logprobs:
        entry = inference_pb2.TokenLogprob(
            token_id=lp.token_id, token=tok.hf.convert_ids_to_tokens(lp.token_id) or "", logprob=lp.logprob
        )
        for token_id, value in lp.top:
            entry.top_logprobs.add(token_id=token_id, token=tok.hf.convert_ids_to_tokens(token_id) or "", logprob=value)
        result.append(entry)
    return result


def _hidden_size(model_dir: Path) -> int:
    import json

    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config", config)
    return int(config.get("hidden_size") or config.get("n_embd") or 0)


def _died_while(doing: str) -> Unavailable:
    """For a call whose engine died under it: retry soon (the pool is restarting the engine, and calls wait)."""
    return Unavailable(f"the inference engine died while {doing}; retry shortly", retry_after=RETRY_AFTER_DEATH_S)


def _request_error(err: EngineError, request_id: str, *, field: str) -> ServiceError:
    """The status of a request the engine failed while it serves on (EngineDeadError is handled by the caller)."""
    if isinstance(err, AdapterError):
        return NotFound(str(err))
    if isinstance(err, RequestFailedError):
        logger.error("request %s failed in the engine: %s", request_id, err)
        # The base class is INTERNAL: not the caller's fault, and the engine serves on.
        return ServiceError(
            f"internal error in request {request_id}; the server log has the details (retrying may work)"
        )
    if isinstance(err, EngineOverloadedError):
        return ResourceExhausted(str(err), retry_after=OVERLOADED_RETRY_AFTER_S)
    if isinstance(err, SamplingError):
        return InvalidArgument.field("sampling", str(err))
    return InvalidArgument.field(field, str(err))


def _shown_source(info: EngineInfo, fine_tuned: FineTunedModel | None) -> str:
    """GetModelInfo's `source` as clients may see it: never a server path. A local model is named by its
    directory's name, a fine-tuned one by its job, a remote one by the remote server's model id."""
    if fine_tuned is not None:
        return f"fine-tuning job {fine_tuned.job_id}"
    if info.engine == "openai":
        return info.source
    return Path(info.source).name

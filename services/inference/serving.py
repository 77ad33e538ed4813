"""The serving core of the inference service: which engine and adapter serve a request's model, with no gRPC in
sight (the servicer converts protos and calls this; tests can drive it directly).

It holds the main engine's serving pool (pool.py: start, health checks, restarts), the base model's tokenizer, the
adapters loaded into the engine, and the engines of fully fine-tuned models (full_models.py).

Fine-tuned models: a request may name "ft:<base>:<suffix>:<job-id>" (as ModelRef.model, or as ModelRef.adapter).
The name is looked up in the fine-tuned model registry (Redis) on first use; a LoRA result is validated like a
LoadAdapter directory and loaded into the engine under its own name, so a job's model is servable as soon as the
job succeeds, without a restart. Adapters loaded this way are evicted least-recently-used when the engine's
adapter slots (GENLOOM_MAX_LORAS) are full; an adapter is pinned while a request runs with it, so eviction never
pulls it from under a generation. A fully fine-tuned result gets an engine of its own (full_models.py), pinned the
same way. Requests take the main engine from the pool, and adapters are loaded again into a restarted engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from genloom.services.inference.adapters import AdapterSpec, inspect_adapter, resolve_adapter_path
from genloom.services.inference.engine import (
    AdapterError,
    Engine,
    EngineDeadError,
    EngineError,
    EngineOutput,
    EngineRequest,
    ScoreQuery,
)
from genloom.services.inference.engines import create_engine
from genloom.services.inference.errors import died_while, request_error
from genloom.services.inference.full_models import EngineFactory, FullModelEngine, FullModelEngines
from genloom.services.inference.pool import RETRY_AFTER_DEATH_S, ServingPool
from genloom.services.inference.settings import InferenceSettings
from genloom.services.models.finetuned import FineTunedModel, FineTunedModelResolver, is_fine_tuned
from genloom.services.models.registry import BUILTIN_MODELS, ModelRegistry, looks_like_path
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
from genloom.v1 import common_pb2

logger = logging.getLogger(__name__)

# The seconds a call may still take (its deadline), asked when it has to wait for a restarting engine; None: no
# deadline.
TimeLeft = Callable[[], float | None]


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
class ModelDescription:
    """What GetModelInfo describes: the engine and tokenizer serving a model (for a full fine-tune not started yet:
    the main engine's), whether it can serve now, and its adapters."""

    engine: Engine
    tokenizer: LoadedTokenizer
    fine_tuned: FineTunedModel | None
    full: bool  # a fully fine-tuned model
    ready: bool
    adapters: list[LoadedAdapter]


class ServedModels:
    """The models this server serves and the engines serving them."""

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
        self.pool: ServingPool | None = None  # the main engine's lifecycle (restarts after a death): pool.py
        self.tokenizer: LoadedTokenizer | None = None
        self.model_name = self._registry.default_name
        self._model_dir: Path | None = None
        self.fine_tuned = FineTunedModelResolver(models.redis_url)
        self._serves_base: dict[str, bool] = {}
        self._hidden_size = 0
        self.adapters: dict[str, LoadedAdapter] = {}
        self._adapter_lock = asyncio.Lock()
        self.full_models = FullModelEngines(self.settings, engine_factory, models.max_model_len)
        self.in_flight: dict[str, Engine] = {}  # request id -> the engine running it (for Abort)
        self._report_health: Callable[[bool], Awaitable[None]] | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def bind_health(self, report: Callable[[bool], Awaitable[None]]) -> None:
        self._report_health = report

    @property
    def engine(self) -> Engine | None:
        """The main engine (while it restarts: the dead one, until its replacement is ready)."""
        return self.pool.engine if self.pool is not None else None

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

        self.pool = ServingPool(
            self.settings,
            lambda: self._engine_factory(spec, self.settings, window),
            given=self._given_engine,
            restore=self._restore_adapters,
            watch=self.full_models.check_health,
            report_health=report,
        )
        engine = await self.pool.start()
        # The engine may allow less than the model config says (a remote server's max_model_len).
        engine_window = engine.info().context_window
        if engine_window and engine_window < self.tokenizer.context_window:
            self.tokenizer.context_window = engine_window
        logger.info("inference engine %s ready for %s", engine.info().engine, spec.name)

    async def close(self) -> None:
        try:
            await self.full_models.stop_all()
            engine = self.engine
            if self.pool is not None:
                await self.pool.close()  # shuts the engine down unless it was given
            if engine is not None and self._given_engine is not None:
                # A shared engine outlives this servicer: take out the fine-tuned adapters it loaded into it.
                for adapter in [a for a in self.adapters.values() if a.fine_tuned]:
                    with contextlib.suppress(EngineError):
                        await engine.remove_adapter(adapter.engine_name)
                    self.adapters.pop(adapter.name, None)
        finally:
            await self.fine_tuned.close()  # its Redis connections, whatever failed above

    async def _restore_adapters(self, engine: Engine) -> None:
        """Load every adapter the dead engine had into its replacement (run by the pool before the new engine is
        handed out). One that no longer loads (its directory was removed) is dropped from the table, with the
        reason logged: requests naming it get NOT_FOUND instead of failing the restart."""
        async with self._adapter_lock:
            for adapter in list(self.adapters.values()):
                try:
                    await engine.add_adapter(adapter.engine_name, str(adapter.spec.path))
                except AdapterError as err:
                    logger.error("adapter %s did not load into the restarted engine; unloaded: %s", adapter.name, err)
                    del self.adapters[adapter.name]
            if self.adapters:
                logger.info("%d adapters loaded again into the restarted engine", len(self.adapters))

    async def engine_failed(self, engine: Engine, reason: str = "EngineDeadError in a call") -> None:
        """`engine` raised EngineDeadError: the main engine goes to the pool (which restarts it, or flips health);
        a full model's engine is dropped (and shut down), so the next request naming its model starts a fresh
        one."""
        if self.pool is not None and engine is self.pool.engine:
            await self.pool.died(engine, reason)
            return
        await self.full_models.died(engine)

    def ready(self) -> tuple[Engine, LoadedTokenizer]:
        """The main engine and tokenizer, to describe (whatever the engine's health: see `serving`); calls that
        run something on the engine take it from `acquire`."""
        if self.pool is None or self.tokenizer is None:
            raise Unavailable("the inference engine is still starting; retry shortly", retry_after=1.0)
        return self.pool.current(), self.tokenizer

    async def acquire(self, time_left: TimeLeft | None) -> Engine:
        """The main engine to run a call on; while the pool restarts it, waits (bounded by the call's deadline
        and GENLOOM_ENGINE_RESTART_WAIT), else UNAVAILABLE with RetryInfo."""
        if self.pool is None or self.tokenizer is None:
            raise Unavailable("the inference engine is still starting; retry shortly", retry_after=1.0)
        return await self.pool.acquire(time_left() if time_left is not None else None)

    @property
    def serving(self) -> bool:
        return self.pool is not None and self.pool.serving

    def replacing(self, engine: Engine) -> bool:
        return self.pool is not None and self.pool.will_replace(engine)

    # -- running requests -------------------------------------------------------------------------------------------

    async def outputs(
        self, engine: Engine, request: EngineRequest, time_left: TimeLeft | None
    ) -> AsyncGenerator[EngineOutput, None]:
        """The engine's outputs for `request`, which is in flight (abortable) until they end. When the main engine
        dies before the request produced anything (it was still queued), the request runs again, once, on the engine
        the pool restarts; a request that was already generating ends with EngineDeadError (UNAVAILABLE + RetryInfo
        for its caller)."""
        request_id = request.request_id
        try:
            for attempt in range(2):
                self.in_flight[request_id] = engine
                stream = engine.generate(request)
                produced = False
                try:
                    async for output in stream:
                        produced = True
                        yield output
                    return
                except EngineDeadError as err:
                    await self.engine_failed(engine, str(err))
                    if produced or attempt or not self.replacing(engine):
                        raise
                    logger.info("request %s waits for the restarted engine", request_id)
                    engine = await self.acquire(time_left)
                finally:
                    await stream.aclose()
        finally:
            self.in_flight.pop(request_id, None)

    async def score(
        self, engine: Engine, queries: list[ScoreQuery], model: ResolvedModel, time_left: TimeLeft | None
    ) -> list[list[list[float]]]:
        """Score on `engine`; when the main engine dies under the call (nothing was returned yet), once more on its
        replacement once the pool has restarted it."""
        for attempt in range(2):
            try:
                return await engine.score(queries)
            except EngineDeadError as err:
                await self.engine_failed(engine, str(err))
                if attempt or model.full is not None or not self.replacing(engine):
                    raise died_while("scoring") from None
                engine = await self.acquire(time_left)
            except EngineError as err:
                # A refusal is about what the items ask for (e.g. a remote server's 4xx).
                raise request_error(err, request_id_var.get(), field="items") from None
        raise AssertionError("unreachable")

    # -- models -----------------------------------------------------------------------------------------------------

    async def check_model(self, name: str, field: str) -> None:
        if not name or name == self.model_name:
            return
        # Another spelling of the served model (GENLOOM_MODEL's own value; with GENLOOM_ALLOW_MODEL_PATHS, a path
        # to its directory): a path lookup, so off the event loop; refused paths are refused as the tokenizer does.
        if looks_like_path(name) and await asyncio.to_thread(self._registry.name_of, name, field) == self.model_name:
            return
        raise NotFound(f"{field}: model {quote(name)} is not served here; this server serves {quote(self.model_name)}")

    @asynccontextmanager
    async def resolved(
        self, ref: common_pb2.ModelRef, time_left: TimeLeft | None = None
    ) -> AsyncIterator[ResolvedModel]:
        """The request's model, its adapter or full-model engine pinned (not evictable) until the block ends. A
        fine-tuned name is looked up and its adapter loaded, or its engine started, on first use."""
        engine = await self.acquire(time_left)
        tok = self.ready()[1]
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
            await self.check_model(ref.model, "model.model")
            resolved = ResolvedModel(
                common_pb2.ModelRef(model=self.model_name, adapter=ref.adapter),
                engine,
                tok,
                adapter=await self._fine_tuned_adapter(ref.adapter, "model.adapter", engine),
            )
        else:
            await self.check_model(ref.model, "model.model")
            adapter = self.adapters.get(ref.adapter) if ref.adapter else None
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

    async def describe(self, name: str) -> ModelDescription:
        """What GetModelInfo says about `name` (the served model, or a fine-tuned one this server can serve)."""
        engine, tok = self.ready()
        fine_tuned: FineTunedModel | None = None
        ready = self.serving
        if is_fine_tuned(name):
            fine_tuned = await self.fine_tuned.resolve(name, "model")
            await self._check_fine_tuned(fine_tuned, "model", engine)
        else:
            await self.check_model(name, "model")
        full_model = fine_tuned is not None and fine_tuned.method == "full"
        if fine_tuned is not None and full_model:
            # Described without starting its engine: until a request starts one, the main engine's kind and
            # settings say what it will be, and it is not ready.
            full = self.full_models.get(fine_tuned.name)
            ready = full is not None
            if full is not None:
                engine, tok = full.engine, full.tokenizer
        adapters = list(self.adapters.values())
        if fine_tuned is not None:
            adapters = [a for a in adapters if a.name == fine_tuned.name]
        return ModelDescription(engine, tok, fine_tuned, full_model, ready, adapters)

    @staticmethod
    def _pin(adapter: LoadedAdapter) -> None:
        adapter.users += 1
        adapter.last_used = time.monotonic()

    async def _fine_tuned_adapter(self, name: str, field: str, engine: Engine) -> LoadedAdapter:
        """The fine-tuned model `name`'s adapter, loaded into the engine if it is not yet, and pinned."""
        loaded = self.adapters.get(name)
        if loaded is not None:  # the common case: no Redis, no lock
            self._pin(loaded)
            return loaded
        model = await self.fine_tuned.resolve(name, field)
        if model.method == "full":
            raise InvalidArgument.field(
                field,
                f"{quote(name)} is a fully fine-tuned model, not an adapter: name it as model.model, without an "
                "adapter",
            )
        await self._check_fine_tuned(model, field, engine)
        async with self._adapter_lock:  # concurrent first requests load it once
            loaded = self.adapters.get(name)
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
        full = self.full_models.get(name)
        if full is not None:
            # One that died since the last health check is dropped here and started afresh, not handed out.
            try:
                await full.engine.check_health()
            except EngineDeadError as err:
                await self.engine_failed(full.engine, str(err))
            full = self.full_models.get(name)  # again: the check awaited
        if full is None:
            if name in self.adapters:
                return None
            model = await self.fine_tuned.resolve(name, field)
            if model.method != "full":
                return None
            await self._check_fine_tuned(model, field, engine)
            async with self.full_models.lock:  # concurrent first requests start it once
                full = self.full_models.get(name)
                if full is None:
                    assert self.engine is not None and self.tokenizer is not None
                    full = await self.full_models.start(model, self.engine, self.tokenizer, self.model_name)
        # No await between the lookup (or the start) and the pin: eviction sees users > 0 and leaves it alone.
        full.users += 1
        full.last_used = time.monotonic()
        return full

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

    # -- adapters ---------------------------------------------------------------------------------------------------

    async def load_adapter(self, engine: Engine, name: str, path: str, *, replace: bool) -> LoadedAdapter:
        """LoadAdapter's work once its request is checked: the directory `path` (as the client gave it) loaded into
        `engine` as `name`."""
        if not engine.info().supports_lora:
            raise InvalidArgument("this server's engine does not serve LoRA adapters (GENLOOM_ENABLE_LORA)")
        # Inside GENLOOM_ADAPTER_ROOTS, containment before existence; messages name the client's string only.
        directory = await asyncio.to_thread(resolve_adapter_path, path, self.settings.adapter_roots)
        label = f"adapter path {quote(path)}"
        async with self._adapter_lock:
            if name in self.adapters and not replace:
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
            spec = dataclasses.replace(spec, shown_path=path)
            try:
                if name in self.adapters:
                    await engine.remove_adapter(name)
                    del self.adapters[name]
                else:
                    await self._make_room(engine)
                await engine.add_adapter(name, str(spec.path))
            except AdapterError as err:
                # An engine's (PEFT's, vLLM's, a remote server's) text can name server paths: the log keeps it.
                logger.warning("adapter %s from %s refused by the engine: %s", name, directory, err)
                message = f"{label} could not be loaded into the engine (the server log has the details)"
                raise InvalidArgument(message, [FieldViolation("path", message)]) from None
            except EngineDeadError as err:
                await self.engine_failed(engine, str(err))
                raise died_while("loading the adapter") from None
            loaded = LoadedAdapter(name, spec, datetime.now(timezone.utc))
            self.adapters[name] = loaded
        logger.info("adapter %s loaded from %s (rank %d)", name, spec.path, spec.rank)
        return loaded

    async def unload_adapter(self, engine: Engine, name: str) -> LoadedAdapter:
        """Take the adapter `name` out of `engine`; returns what it was."""
        async with self._adapter_lock:
            loaded = self.adapters.get(name)
            if loaded is None:
                raise NotFound(f"no adapter named {quote(name)} is loaded")
            try:
                await engine.remove_adapter(loaded.engine_name)
            except EngineDeadError as err:
                await self.engine_failed(engine, str(err))
                raise died_while("unloading the adapter") from None
            del self.adapters[name]
        return loaded

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
            await self.engine_failed(engine, str(err))
            raise Unavailable("the inference engine is not available", retry_after=RETRY_AFTER_DEATH_S) from None
        except AdapterError as err:
            # The engine's text may name the adapter's directory (a server path): the log keeps it.
            logger.warning("fine-tuned model %s did not load into the engine: %s", model.name, err)
            raise FailedPrecondition(
                f"fine-tuned model {quote(model.name)} can't be loaded into the engine (see the server log)"
            ) from None
        self.adapters[model.name] = loaded
        logger.info("fine-tuned model %s loaded from %s (rank %d)", model.name, spec.path, spec.rank)
        return loaded

    async def _make_room(self, engine: Engine) -> None:
        """Free an adapter slot for one more adapter (under the adapter lock): evict the least recently used
        fine-tuned adapter no request is using. LoadAdapter adapters are never evicted: someone loaded them on
        purpose, and a later request naming one could not bring it back."""
        limit = engine.info().max_loras
        while limit and len(self.adapters) >= limit:
            idle = [a for a in self.adapters.values() if a.fine_tuned and a.users == 0]
            if not idle:
                if any(a.fine_tuned for a in self.adapters.values()):
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
            del self.adapters[victim.name]
            try:
                await engine.remove_adapter(victim.engine_name)
            except EngineDeadError as err:
                await self.engine_failed(engine, str(err))
                raise Unavailable("the inference engine is not available", retry_after=RETRY_AFTER_DEATH_S) from None
            except AdapterError:
                pass  # already gone from the engine: the slot is free either way
            logger.info("fine-tuned model %s evicted from the engine (least recently used)", victim.name)


def _hidden_size(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config", config)
    return int(config.get("hidden_size") or config.get("n_embd") or 0)

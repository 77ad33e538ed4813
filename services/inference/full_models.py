"""Engines of their own for fully fine-tuned models: started on first use, shut down least recently used.

A fully fine-tuned result (a whole model directory) can't be an adapter: it gets an engine of its own, of the main
engine's kind and settings, with the base model's context window. At most GENLOOM_MAX_FULL_MODELS such engines run
at once; to start another, the least recently used one no request is using is shut down. These engines are not part
of health: one that dies is dropped, and started again by the next request that names its model. The serving core
(serving.py) decides when a request needs one; this module keeps the table of running ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from genloom.services.inference.engine import Engine, EngineDeadError
from genloom.services.inference.settings import InferenceSettings
from genloom.services.models.finetuned import FineTunedModel
from genloom.services.models.registry import ModelSpec
from genloom.services.server.errors import FailedPrecondition, ResourceExhausted, quote
from genloom.services.tokenizer.store import LoadedTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

# Builds an unstarted engine for a model, with these settings and this context window.
EngineFactory = Callable[[ModelSpec, InferenceSettings, int], Engine]


@dataclass(eq=False)
class FullModelEngine:
    """A fully fine-tuned model served by an engine of its own (started on first use, evicted least recently used)."""

    model: FineTunedModel
    engine: Engine
    tokenizer: LoadedTokenizer
    loaded_at: datetime
    users: int = 0  # requests running on it now: it is only shut down to make room when this is 0
    last_used: float = field(default_factory=time.monotonic)


class FullModelEngines:
    """The running full-model engines, by fine-tuned model name (at most settings.max_full_models)."""

    def __init__(self, settings: InferenceSettings, engine_factory: EngineFactory, max_model_len: int) -> None:
        self.settings = settings
        self._engine_factory = engine_factory
        self._max_model_len = max_model_len
        self.running: dict[str, FullModelEngine] = {}
        self.lock = asyncio.Lock()  # one engine start at a time: concurrent first requests start it once

    def get(self, name: str) -> FullModelEngine | None:
        return self.running.get(name)

    async def check_health(self) -> None:
        """Run by the pool's health checks: drop full-model engines that died."""
        for full in list(self.running.values()):
            try:
                await full.engine.check_health()
            except EngineDeadError:
                await self.died(full.engine)

    async def died(self, engine: Engine) -> None:
        """`engine` raised EngineDeadError: if it serves a full model, drop it (and shut it down), so the next request
        naming its model starts a fresh one."""
        for full in list(self.running.values()):
            if full.engine is engine:
                logger.error("the engine serving %s died; it is started again on its next request", full.model.name)
                await self.stop(full)

    async def start(
        self, model: FineTunedModel, base_engine: Engine, base_tokenizer: LoadedTokenizer, base_name: str
    ) -> FullModelEngine:
        """Start an engine for a fully fine-tuned model directory (under the lock): the main engine's kind and
        settings, the base model's context window, and the directory's own tokenizer (a full fine-tune keeps its
        base's vocabulary, but the directory is what the weights were saved with)."""
        path = Path(model.path)
        if not await asyncio.to_thread((path / "config.json").is_file):
            logger.warning("fine-tuned model %s: %s has no config.json", model.name, path)
            raise FailedPrecondition(
                f"fine-tuned model {quote(model.name)} can't be served: its directory is not a model (no config.json)"
            )
        spec = ModelSpec(model.name, path)
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, spec, self._max_model_len)
        except Exception:
            # The loader's text names server paths: the log has it, the client a plain reason.
            logger.exception("the tokenizer of fine-tuned model %s does not load", model.name)
            raise FailedPrecondition(
                f"fine-tuned model {quote(model.name)} can't be served: its tokenizer does not load"
            ) from None
        if tokenizer.vocab_size != base_tokenizer.vocab_size:
            logger.warning(
                "fine-tuned model %s has a vocabulary of %d tokens, its base %s one of %d",
                model.name,
                tokenizer.vocab_size,
                base_name,
                base_tokenizer.vocab_size,
            )
        await self.make_room()
        window = base_tokenizer.context_window
        # Same kind as the main engine (not GENLOOM_ENGINE=auto's pick: an engine given from outside may differ);
        # no LoRA: adapters apply to the base model, not to a full fine-tune.
        settings = dataclasses.replace(self.settings, engine=base_engine.info().engine, enable_lora=False)
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
        self.running[model.name] = full
        logger.info("fully fine-tuned model %s started from %s", model.name, path)
        return full

    async def make_room(self) -> None:
        """Make room for one more full-model engine (under the lock): shut down the least recently used one no
        request is using."""
        limit = self.settings.max_full_models
        while len(self.running) >= limit:
            idle = [f for f in self.running.values() if f.users == 0]
            if not idle:
                raise ResourceExhausted(
                    f"all {limit} fully fine-tuned model engines (GENLOOM_MAX_FULL_MODELS) are serving requests; "
                    "retry shortly",
                    retry_after=1.0,
                )
            victim = min(idle, key=lambda f: f.last_used)
            await self.stop(victim)
            logger.info("fully fine-tuned model %s shut down (least recently used)", victim.model.name)

    async def stop(self, full: FullModelEngine) -> None:
        """Take `full` out of the table (a request arriving meanwhile starts a fresh engine) and shut it down."""
        if self.running.get(full.model.name) is not full:
            return  # already taken out by someone else, who shuts it down
        del self.running[full.model.name]
        try:
            await full.engine.shutdown()
        except Exception:
            logger.exception("shutting down the engine of fine-tuned model %s failed", full.model.name)

    async def stop_all(self) -> None:
        for full in list(self.running.values()):
            await self.stop(full)

"""The serving pool: the inference server's main engine, kept alive.

The pool starts the engine, checks its health every GENLOOM_ENGINE_HEALTH_INTERVAL seconds, and hears from the
servicer when a call finds it dead (EngineDeadError: the hf step thread died, vLLM's EngineCore process is gone,
an out-of-memory error). A dead engine it made itself is replaced in-process by a fresh one from the same factory:

- health goes NOT_SERVING at once; calls that were running on the dead engine end UNAVAILABLE with RetryInfo
  (the servicer re-runs, once, a generation that had not produced anything yet: it was still queued);
- calls that arrive meanwhile wait for the new engine (at most GENLOOM_ENGINE_RESTART_WAIT seconds and never
  past their deadline), then run on it; at most GENLOOM_MAX_QUEUED_REQUESTS of them wait, more are answered
  UNAVAILABLE with RetryInfo at once;
- before the new engine is handed out, the `restore` hook loads into it what the old one had (adapters);
- then health is SERVING again.

Restarts are spaced by an exponential backoff (GENLOOM_ENGINE_RESTART_BACKOFF doubling up to
GENLOOM_ENGINE_RESTART_BACKOFF_MAX). More than GENLOOM_ENGINE_MAX_RESTARTS restarts within
GENLOOM_ENGINE_RESTART_WINDOW seconds is a crash loop: the pool gives up, logs why once at ERROR, and health
stays NOT_SERVING so that an orchestrator replaces the process (a restart in-process can't fix what keeps killing
it, and a process restart also resets what the process itself may have leaked).

Not restarted:
- an engine handed to the servicer from outside (tests, a shared engine): its owner decides its lifecycle. The
  pool reports NOT_SERVING while it fails its health check and SERVING when it passes again.
- the `openai` engine: it is a client of a remote server, and a remote server that is down is not a dead engine;
  a new client would find the same server down. Health follows the remote server, as for a given engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable

from genloom.services.inference.engine import Engine, EngineDeadError
from genloom.services.inference.settings import InferenceSettings
from genloom.services.server.errors import Unavailable

logger = logging.getLogger(__name__)

# The RetryInfo delay for a call that ended because its engine died: a retry waits for the restart on the server
# (calls wait while the pool restarts), so it need not wait long on the client.
RETRY_AFTER_DEATH_S = 1.0
# How long a dead engine may take to shut down before its replacement starts anyway.
SHUTDOWN_TIMEOUT_S = 60.0
# Engines that run elsewhere: a new client would not bring the remote server back.
REMOTE_ENGINES = frozenset({"openai"})


class PoolState(enum.Enum):
    STARTING = "starting"  # start() has not finished
    SERVING = "serving"
    RESTARTING = "restarting"  # the engine died; a new one is being started
    DOWN = "down"  # a given or remote engine fails its health check; it may come back by itself
    FAILED = "failed"  # crash loop: given up until the process is replaced
    CLOSED = "closed"


class ServingPool:
    """Owns the main engine's lifecycle: start, health checks, restarts with backoff, crash-loop give-up.

    `make` builds an unstarted engine; `given` is an already started engine owned by someone else (not
    restarted, not shut down by close()). `restore(engine)` runs against every new engine before calls may use it;
    `watch()` runs after each health check (the servicer checks its fully fine-tuned models' engines there);
    `report_health(serving)` flips the service's health."""

    def __init__(
        self,
        settings: InferenceSettings,
        make: Callable[[], Engine],
        *,
        given: Engine | None = None,
        restore: Callable[[Engine], Awaitable[None]] | None = None,
        watch: Callable[[], Awaitable[None]] | None = None,
        report_health: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self._make = make
        self._given = given
        self._restore = restore
        self._watch_hook = watch
        self._report_health = report_health
        self._engine: Engine | None = None
        self.state = PoolState.STARTING
        self._settled = asyncio.Event()  # set while the state is not STARTING or RESTARTING
        self._restarts: deque[float] = deque()  # monotonic start times of recent restarts
        self._watcher: asyncio.Task[None] | None = None
        self._restarter: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None  # brings health in line with the state: _publish()
        # What health says as far as the pool knows: until the first change, the server's own startup flip.
        self._reported = True
        self._discarded: Engine | None = None  # the dead engine _restart shut down (close() must not again)
        self._replaced: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines the pool has replaced
        self._waiting = 0  # calls waiting in acquire() for a restart
        self.last_restart_s: float | None = None  # death to serving again, of the last restart

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> Engine:
        engine = self._given
        if engine is None:
            engine = self._make()
            try:
                await engine.start()
            except BaseException:
                # A start that failed part way (vLLM's warm-up once its EngineCore process is up) still holds what
                # it started, and no one else has this engine to shut it down.
                await self._discard(engine, "an inference engine that failed to start")
                raise
        self._engine = engine
        self._set_state(PoolState.SERVING)
        self._watcher = asyncio.create_task(self._watch(), name="genloom-engine-health")
        return engine

    async def close(self) -> None:
        """Stop checking and restarting, and shut the engine down (unless given). Never raises: the servicer has
        more to close after this."""
        self._set_state(PoolState.CLOSED)
        for task in (self._watcher, self._restarter):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # A health report in flight is left to finish (it reports nothing once CLOSED): cancelling it would cancel
        # the request that awaits it too.
        engine = self._engine
        if engine is not None and self._given is None and engine is not self._discarded:
            await self._discard(engine, "the inference engine")

    @property
    def engine(self) -> Engine | None:
        """The current engine (while restarting: the dead one, until its replacement is ready)."""
        return self._engine

    @property
    def serving(self) -> bool:
        return self.state is PoolState.SERVING

    @property
    def restartable(self) -> bool:
        engine = self._engine
        return (
            self._given is None
            and engine is not None
            and engine.info().engine not in REMOTE_ENGINES
            and self.settings.engine_max_restarts > 0
        )

    # -- handing out the engine ---------------------------------------------------------------------------------

    def current(self) -> Engine:
        """The engine, whatever its health (for descriptions: model info, listing); Unavailable before start."""
        if self._engine is None:
            raise Unavailable("the inference engine is still starting; retry shortly", retry_after=1.0)
        return self._engine

    async def acquire(self, time_remaining: float | None = None) -> Engine:
        """The engine to run a call on. While the engine restarts, wait for it: at most
        GENLOOM_ENGINE_RESTART_WAIT seconds and at most `time_remaining` (the call's deadline)."""
        if self.state is PoolState.RESTARTING:
            limit = self.settings.max_queued_requests
            if self._waiting >= limit:
                # Each waiter holds its request (and its client's connection) for up to a restart: bounded, as the
                # engine's own queue is.
                raise Unavailable(
                    f"{self._waiting} calls are waiting for the restarting inference engine (limit {limit}, "
                    "GENLOOM_MAX_QUEUED_REQUESTS); retry shortly",
                    retry_after=RETRY_AFTER_DEATH_S,
                )
            wait = self.settings.engine_restart_wait
            if time_remaining is not None:
                # Answer before the deadline, so the client sees UNAVAILABLE + RetryInfo and not DEADLINE_EXCEEDED.
                wait = min(wait, max(time_remaining - 0.1, 0.0))
            self._waiting += 1
            try:
                # asyncio.TimeoutError: on Python 3.10 wait_for raises it, and it is not yet the builtin.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._settled.wait(), wait)
            finally:
                self._waiting -= 1
        state = self.state
        if state is PoolState.SERVING:
            assert self._engine is not None
            return self._engine
        if state is PoolState.STARTING:
            raise Unavailable("the inference engine is still starting; retry shortly", retry_after=1.0)
        if state is PoolState.RESTARTING:
            raise Unavailable(
                "the inference engine is restarting after a failure; retry shortly", retry_after=RETRY_AFTER_DEATH_S
            )
        if state is PoolState.DOWN:
            raise Unavailable(
                "the inference engine is not available; retry later (health says NOT_SERVING)",
                retry_after=self.settings.engine_health_interval,
            )
        if state is PoolState.FAILED:
            raise Unavailable("the inference engine failed repeatedly and is not restarted (health says NOT_SERVING)")
        raise Unavailable("the inference service is shutting down")

    def will_replace(self, engine: Engine) -> bool:
        """Whether a call that failed on `engine` (EngineDeadError) may run again on the pool's engine: `engine` is
        the dead one being replaced, or one already replaced (its error came late) while the pool serves or
        restarts again."""
        if engine is self._engine:
            return self.state is PoolState.RESTARTING
        return engine in self._replaced and self.state in (PoolState.SERVING, PoolState.RESTARTING)

    # -- deaths and restarts ------------------------------------------------------------------------------------

    async def died(self, engine: Engine, reason: str) -> None:
        """`engine` raised EngineDeadError (in a call or a health check)."""
        if engine is not self._engine or self.state is not PoolState.SERVING:
            return  # an engine already replaced, or a death already being handled
        # Everything that must happen happens before the first await: the caller is often a request, which its
        # client can cancel at any await, and a death without its restart would leave the server wedged.
        if self.restartable:
            self._set_state(PoolState.RESTARTING)
            logger.error("the inference engine died (%s); restarting it", reason)
            self._restarter = asyncio.create_task(self._restart(engine, reason), name="genloom-engine-restart")
        else:
            self._set_state(PoolState.DOWN)
            logger.error("the inference engine is not healthy (%s); answering UNAVAILABLE until it is", reason)
        await self._publish()

    async def _restart(self, dead: Engine, reason: str) -> None:
        died_at = time.monotonic()
        # The dead engine goes first: its memory (a GPU's above all) is what the new one needs.
        await self._discard(dead, "a dead inference engine")
        self._discarded = dead
        s = self.settings
        while self.state is PoolState.RESTARTING:  # close() may have come meanwhile
            now = time.monotonic()
            while self._restarts and now - self._restarts[0] > s.engine_restart_window:
                self._restarts.popleft()
            if len(self._restarts) >= s.engine_max_restarts:
                await self._give_up(reason)
                return
            delay = min(s.engine_restart_backoff * 2 ** len(self._restarts), s.engine_restart_backoff_max)
            self._restarts.append(now)
            await asyncio.sleep(delay)
            engine: Engine | None = None
            try:
                engine = self._make()
                await engine.start()
                if self._restore is not None:
                    await self._restore(engine)
            except asyncio.CancelledError:
                if engine is not None:
                    await self._discard(engine, "an inference engine started in a cancelled restart")
                raise
            except Exception as err:
                logger.exception("restarting the inference engine failed")
                if engine is not None:
                    await self._discard(engine, "an inference engine that failed to restart")
                reason = f"restart failed: {err!r}"
                continue
            if self.state is not PoolState.RESTARTING:
                await self._discard(engine, "an inference engine restarted while the pool closed")
                return
            self._replaced.add(dead)
            self._engine = engine
            self.last_restart_s = time.monotonic() - died_at
            self._set_state(PoolState.SERVING)
            logger.warning(
                "the inference engine is serving again, %.1f s after it died (restart %d of at most %d in %.0f s)",
                self.last_restart_s,
                len(self._restarts),
                s.engine_max_restarts,
                s.engine_restart_window,
            )
            await self._publish()
            return

    async def _give_up(self, reason: str) -> None:
        s = self.settings
        self._set_state(PoolState.FAILED)
        logger.error(
            "the inference engine died again (%s) after %d restarts within %.0f s (GENLOOM_ENGINE_MAX_RESTARTS, "
            "GENLOOM_ENGINE_RESTART_WINDOW): giving up; health stays NOT_SERVING until this process is replaced",
            reason,
            len(self._restarts),
            s.engine_restart_window,
        )
        await self._publish()

    async def _discard(self, engine: Engine, what: str) -> None:
        """Shut `engine` down, at most SHUTDOWN_TIMEOUT_S; a failure is logged, not raised (what follows, a
        replacement or the rest of a shutdown, must go on)."""
        try:
            await asyncio.wait_for(engine.shutdown(), SHUTDOWN_TIMEOUT_S)
        except Exception:
            logger.exception("shutting down %s failed", what)

    # -- health checks ------------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.engine_health_interval)
            if self._watch_hook is not None:
                try:
                    await self._watch_hook()
                except Exception:
                    logger.exception("checking the extra engines failed")
            engine = self._engine
            if engine is None or self.state not in (PoolState.SERVING, PoolState.DOWN):
                continue
            try:
                await engine.check_health()
            except EngineDeadError as err:
                await self.died(engine, str(err))
                continue
            except Exception:
                logger.exception("the inference engine's health check failed unexpectedly")
                continue
            if self.state is PoolState.DOWN and engine is self._engine:
                self._set_state(PoolState.SERVING)
                logger.info("the inference engine is healthy again")
                await self._publish()

    def _set_state(self, state: PoolState) -> None:
        self.state = state
        if state in (PoolState.STARTING, PoolState.RESTARTING):
            self._settled.clear()
        else:
            self._settled.set()

    async def _publish(self) -> None:
        """Bring the service's health in line with the state. The report runs in a task of the pool's own, which
        the caller awaits shielded: a caller cancelled meanwhile (a request whose client hung up) can't leave health
        SERVING for a dead engine, and reports can't overtake one another (the task reports the latest state until
        health says it)."""
        if self._report_health is None:
            return
        if self._reporter is None or self._reporter.done():
            self._reporter = asyncio.create_task(self._report_until_settled(), name="genloom-engine-health-report")
        await asyncio.shield(self._reporter)

    async def _report_until_settled(self) -> None:
        assert self._report_health is not None
        while self.state is not PoolState.CLOSED and self._reported is not self.serving:
            serving = self.serving
            try:
                await self._report_health(serving)
            except Exception:
                logger.exception("reporting the inference engine's health failed")
                return
            self._reported = serving

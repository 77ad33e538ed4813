"""`client.finetune.sweeps`: hyperparameter sweeps (create, get, list, cancel, wait), sync and asyncio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from genloom._transport import _DEFAULT, AsyncTransport, SyncTransport
from genloom.resources._finetune_requests import _create_sweep_request, _deadline, _left, _list_sweeps_request
from genloom.resources._pages import AsyncPage, AsyncPager, Page
from genloom.types._finetune_enums import SortOrderName, SweepMethodName, SweepObjectiveName, SweepStateName
from genloom.types._finetune_records import Sweep
from genloom.types._finetune_spec import FineTuneSpec
from genloom.types._search_space import SearchSpaceLike
from genloom.v1 import finetune_pb2


class Sweeps:
    """Hyperparameter sweeps, synchronously: `client.finetune.sweeps`."""

    def __init__(self, transport: SyncTransport, stub: Any) -> None:
        self._t = transport
        self._stub = stub

    def create(
        self,
        base_job: FineTuneSpec | Mapping[str, Any],
        *,
        search_space: Mapping[str, SearchSpaceLike],
        method: SweepMethodName = "grid",
        max_trials: int = 0,
        parallelism: int = 0,
        objective: SweepObjectiveName | None = None,
        seed: int = 0,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        timeout: float | None = _DEFAULT,
    ) -> Sweep:
        """Start a hyperparameter sweep: trials are jobs with `base_job`'s spec and the searched values applied.

        Args:
            base_job: what every trial trains: a FineTuneSpec, a mapping of `finetune.create()`'s arguments
                ({"training_file": "train.jsonl", "method": "lora", "hyperparameters": {...}}), or a job record's
                `spec` (to reuse its stored data).
            search_space: {hyperparameter: values}: a list of values to try in order (["linear", "cosine"]),
                FloatRange(1e-5, 1e-3, log=True), IntRange(4, 16, step=4), range(4, 17, 4), or a (min, max) tuple
                of two numbers. 1 to 16 dimensions.
            method: "grid" (every combination, last dimension fastest) or "bayesian" (seeded TPE).
            max_trials: grid: the first N combinations (0: all); bayesian: N trials (0: 10).
            parallelism: trials queued or running at once (0: 2).
            objective: "validation_loss" (default; needs validation data or a split) or "train_loss".
            seed: the Bayesian sampler's seed.
            idempotency_key, webhook_url, webhook_secret: as in `finetune.create()` (the webhook is called once,
                when the sweep ends).
        """
        request = _create_sweep_request(base_job, search_space, locals())
        response = self._t.unary(self._stub.CreateSweep, request, timeout=timeout)
        return Sweep.from_pb(response.sweep, created=response.created)

    def get(self, sweep_id: str, *, timeout: float | None = _DEFAULT) -> Sweep:
        """A sweep with every trial and the best so far (NotFoundError for an unknown id)."""
        request = finetune_pb2.GetSweepRequest(sweep_id=sweep_id)
        return Sweep.from_pb(self._t.unary(self._stub.GetSweep, request, timeout=timeout).sweep)

    def list(
        self,
        *,
        state: SweepStateName | Iterable[SweepStateName] | None = None,
        limit: int = 20,
        order: SortOrderName = "desc",
        timeout: float | None = _DEFAULT,
    ) -> Page[Sweep]:
        """Sweeps, newest first ("asc": oldest first), optionally only in `state` (one or several). `limit` is
        the page size (at most 100); iterating the result walks every page."""
        request = _list_sweeps_request(state, limit, order)

        def fetch(token: str) -> Page[Sweep]:
            page_request = finetune_pb2.ListSweepsRequest()
            page_request.CopyFrom(request)
            page_request.page_token = token
            response = self._t.unary(self._stub.ListSweeps, page_request, timeout=timeout)
            return Page([Sweep.from_pb(s) for s in response.sweeps], response.next_page_token, fetch)

        return fetch("")

    def cancel(self, sweep_id: str, *, timeout: float | None = _DEFAULT) -> Sweep:
        """Stop a sweep: no further trials start and running ones are cancelled (FailedPreconditionError when
        it already ended)."""
        request = finetune_pb2.CancelSweepRequest(sweep_id=sweep_id)
        return Sweep.from_pb(self._t.unary(self._stub.CancelSweep, request, timeout=timeout).sweep)

    def wait(
        self,
        sweep_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 5.0,
        on_update: Callable[[Sweep], None] | None = None,
    ) -> Sweep:
        """Poll a sweep until it ends and return it (check `state`, or call `raise_for_status()`). Sweeps have no
        event stream; follow a trial's job with `finetune.watch(trial.job_id)`.

        Args:
            timeout: seconds to wait at most (WaitTimeoutError after; the sweep carries on). None: no limit.
            poll_interval: seconds between polls.
            on_update: called with the sweep after every poll.
        """
        deadline = _deadline(timeout)
        while True:
            sweep = self.get(sweep_id, timeout=_DEFAULT)
            if on_update is not None:
                on_update(sweep)
            if sweep.is_terminal:
                return sweep
            remaining = _left(deadline, f"sweep {sweep_id}")
            time.sleep(poll_interval if remaining is None else min(poll_interval, remaining))


class AsyncSweeps:
    """Hyperparameter sweeps, for asyncio: `client.finetune.sweeps`. Same methods as `Sweeps`."""

    def __init__(self, transport: AsyncTransport, stub: Any) -> None:
        self._t = transport
        self._stub = stub

    async def create(
        self,
        base_job: FineTuneSpec | Mapping[str, Any],
        *,
        search_space: Mapping[str, SearchSpaceLike],
        method: SweepMethodName = "grid",
        max_trials: int = 0,
        parallelism: int = 0,
        objective: SweepObjectiveName | None = None,
        seed: int = 0,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        timeout: float | None = _DEFAULT,
    ) -> Sweep:
        """See `Sweeps.create`."""
        request = _create_sweep_request(base_job, search_space, locals())
        response = await self._t.unary(self._stub.CreateSweep, request, timeout=timeout)
        return Sweep.from_pb(response.sweep, created=response.created)

    async def get(self, sweep_id: str, *, timeout: float | None = _DEFAULT) -> Sweep:
        """See `Sweeps.get`."""
        request = finetune_pb2.GetSweepRequest(sweep_id=sweep_id)
        return Sweep.from_pb((await self._t.unary(self._stub.GetSweep, request, timeout=timeout)).sweep)

    def list(
        self,
        *,
        state: SweepStateName | Iterable[SweepStateName] | None = None,
        limit: int = 20,
        order: SortOrderName = "desc",
        timeout: float | None = _DEFAULT,
    ) -> AsyncPager[Sweep]:
        """See `Sweeps.list`: `await` it for the first page, or `async for` over every sweep."""
        request = _list_sweeps_request(state, limit, order)

        async def fetch(token: str) -> AsyncPage[Sweep]:
            page_request = finetune_pb2.ListSweepsRequest()
            page_request.CopyFrom(request)
            page_request.page_token = token
            response = await self._t.unary(self._stub.ListSweeps, page_request, timeout=timeout)
            return AsyncPage([Sweep.from_pb(s) for s in response.sweeps], response.next_page_token, fetch)

        return AsyncPager(lambda: fetch(""))

    async def cancel(self, sweep_id: str, *, timeout: float | None = _DEFAULT) -> Sweep:
        """See `Sweeps.cancel`."""
        request = finetune_pb2.CancelSweepRequest(sweep_id=sweep_id)
        return Sweep.from_pb((await self._t.unary(self._stub.CancelSweep, request, timeout=timeout)).sweep)

    async def wait(
        self,
        sweep_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 5.0,
        on_update: Callable[[Sweep], None] | None = None,
    ) -> Sweep:
        """See `Sweeps.wait`."""
        deadline = _deadline(timeout)
        while True:
            sweep = await self.get(sweep_id)
            if on_update is not None:
                on_update(sweep)
            if sweep.is_terminal:
                return sweep
            remaining = _left(deadline, f"sweep {sweep_id}")
            await asyncio.sleep(poll_interval if remaining is None else min(poll_interval, remaining))

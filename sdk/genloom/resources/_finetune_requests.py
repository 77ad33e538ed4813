"""Request building shared by the sync and async fine-tuning resources (jobs and sweeps), and the deadline
arithmetic of their `wait()` methods.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from genloom._exceptions import WaitTimeoutError
from genloom.types._finetune_enums import (
    JOB_STATES,
    SORT_ORDERS,
    SWEEP_METHODS,
    SWEEP_OBJECTIVES,
    SWEEP_STATES,
    SortOrderName,
    _states,
)
from genloom.types._finetune_spec import FineTuneSpec, webhook_to_pb
from genloom.types._search_space import SearchSpaceLike, search_space_to_pb
from genloom.types._task_inputs import enum_value
from genloom.v1 import finetune_pb2


def _new_idempotency_key(key: str | None) -> str:
    """The caller's key; "" for none; a fresh one for None, so the transport's retries reuse it."""
    return f"genloom-sdk-{uuid.uuid4().hex}" if key is None else key


def _create_job_request(spec: FineTuneSpec, options: Mapping[str, Any]) -> finetune_pb2.CreateJobRequest:
    request = finetune_pb2.CreateJobRequest(
        spec=spec.to_pb(), idempotency_key=_new_idempotency_key(options["idempotency_key"])
    )
    webhook = webhook_to_pb(options["webhook_url"], options["webhook_secret"])
    if webhook is not None:
        request.webhook.CopyFrom(webhook)
    return request


def _job_spec(arguments: Mapping[str, Any]) -> FineTuneSpec:
    """The FineTuneSpec of `create()`'s arguments."""
    names = FineTuneSpec.__dataclass_fields__
    return FineTuneSpec(**{k: v for k, v in arguments.items() if k in names})


def _list_jobs_request(
    state: Any, base_model: str | None, sweep_id: str | None, limit: int, order: SortOrderName
) -> finetune_pb2.ListJobsRequest:
    if limit < 1:
        raise ValueError("limit (the page size) must be at least 1")
    return finetune_pb2.ListJobsRequest(
        page_size=limit,
        states=_states(JOB_STATES, state, "state"),
        base_model=base_model or "",
        sweep_id=sweep_id or "",
        order=enum_value(SORT_ORDERS, order, "order"),
    )


def _create_sweep_request(
    base_job: FineTuneSpec | Mapping[str, Any],
    search_space: Mapping[str, SearchSpaceLike],
    options: Mapping[str, Any],
) -> finetune_pb2.CreateSweepRequest:
    for name, value in (("max_trials", options["max_trials"]), ("parallelism", options["parallelism"])):
        if value < 0:
            raise ValueError(f"{name} must be 0 (the server's default) or more")
    spec = finetune_pb2.SweepSpec(
        base_job=FineTuneSpec.coerce(base_job).to_pb(),
        search_space=search_space_to_pb(search_space),
        method=enum_value(SWEEP_METHODS, options["method"], "method"),
        max_trials=options["max_trials"],
        parallelism=options["parallelism"],
        objective=enum_value(SWEEP_OBJECTIVES, options["objective"], "objective")
        if options["objective"]
        else finetune_pb2.SWEEP_OBJECTIVE_UNSPECIFIED,
        seed=options["seed"],
    )
    request = finetune_pb2.CreateSweepRequest(
        spec=spec, idempotency_key=_new_idempotency_key(options["idempotency_key"])
    )
    webhook = webhook_to_pb(options["webhook_url"], options["webhook_secret"])
    if webhook is not None:
        request.webhook.CopyFrom(webhook)
    return request


def _list_sweeps_request(state: Any, limit: int, order: SortOrderName) -> finetune_pb2.ListSweepsRequest:
    if limit < 1:
        raise ValueError("limit (the page size) must be at least 1")
    return finetune_pb2.ListSweepsRequest(
        page_size=limit, states=_states(SWEEP_STATES, state, "state"), order=enum_value(SORT_ORDERS, order, "order")
    )


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None, what: str) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise WaitTimeoutError(f"stopped waiting for {what}: the timeout passed (it carries on)")
    return remaining

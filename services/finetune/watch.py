"""A job's event stream as WatchJob sends it: stored events after a cursor, then (when following) new ones as they
are written, until the job's terminal state event.

The servicer's WatchJob validates the job id and turns each event into a response; this module reads the Redis
Stream (store.events_key) with an asyncio client, so a watcher blocks in XREAD rather than in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator

import redis.asyncio as aioredis
from redis.typing import StreamEntry

from genloom.services.finetune.store import TERMINAL, Store, as_bytes, as_text, events_key
from genloom.services.server.errors import InvalidArgument, NotFound, quote
from genloom.v1 import finetune_pb2

S = finetune_pb2


async def job_events(
    aio: aioredis.Redis, store: Store, job_id: str, after: str, follow: bool
) -> AsyncIterator[finetune_pb2.JobEvent]:
    """The events of job `job_id` after event id `after` ("" = from the first). With `follow`, waits for new
    events and ends after the terminal state event; without, ends once every stored event is sent (a webhook
    warning may come after the end). Raises InvalidArgument when `after` is not one of the job's events, NotFound
    when the job is deleted while followed."""
    key = events_key(job_id)
    if after:
        found = await aio.xrange(key, min=after, max=after, count=1) if _stream_id(after) else []
        if not found:
            raise InvalidArgument.field("after_event_id", f"{quote(after)} is not an event of job {job_id}")
    if follow and after and await _ended_before(aio, key, after):
        follow = False  # resuming after the end: send what came after it (webhook warnings) and stop
    cursor = after or "0-0"
    while True:
        rows = await aio.xrange(key, min=f"({cursor}" if cursor != "0-0" else "-", max="+", count=200)
        if not rows and follow:
            answer = await aio.xread({key: cursor}, block=5000, count=200)
            rows = answer[0][1] if isinstance(answer, list) and answer else []
        if not rows:
            if not follow:
                return
            # Nothing new for a while: make sure the job has not ended (its last event may predate `cursor`).
            current = await asyncio.to_thread(store.get_job, job_id)
            if current is None:
                raise NotFound(f"job {job_id} was deleted while it was being watched")
            if current.state in TERMINAL and await _ended_before(aio, key, cursor):
                return
            continue
        for cursor, event in _parsed(rows):  # noqa: B007 - the cursor the next read starts after
            yield event
            if follow and event.type == S.JOB_EVENT_TYPE_STATE_CHANGE and event.state in TERMINAL:
                return  # (without follow every stored event is sent: a webhook warning comes after the end)


def _parsed(rows: Iterable[StreamEntry]) -> Iterator[tuple[str, finetune_pb2.JobEvent]]:
    """Stream entries -> (event id, JobEvent with its id set), lazily."""
    for entry_id, fields in rows:
        if entry_id is None or fields is None:  # (only XAUTOCLAIM reports deleted entries so; never XRANGE)
            continue
        event_id = as_text(entry_id)
        event = finetune_pb2.JobEvent.FromString(as_bytes(fields[b"e"]))
        event.id = event_id
        yield event_id, event


async def _ended_before(aio: aioredis.Redis, key: str, cursor: str) -> bool:
    """Whether a terminal state event is at or before `cursor` (a watcher resuming after the end)."""
    for _, event in _parsed(await aio.xrevrange(key, max=cursor, min="-", count=50) or []):
        if event.type == S.JOB_EVENT_TYPE_STATE_CHANGE and event.state in TERMINAL:
            return True
    return False


def _stream_id(value: str) -> bool:
    ms, sep, seq = value.partition("-")
    return bool(sep) and ms.isdigit() and seq.isdigit()

"""Job and sweep records, events, cancel flags and worker leases in Redis.

Everything a job is lives here, so any service replica can answer for any job and a worker needs only the job id:

    genloom:ft:job:<id>          the Job record (serialized proto), changed only in WATCH/MULTI transactions
    genloom:ft:jobs              sorted set of job ids by creation order (genloom:ft:seq; listing)
    genloom:ft:active            set of the jobs not yet in a terminal state (what the reaper inspects)
    genloom:ft:events:<id>       Redis Stream of JobEvent protos: ids are the event ids WatchJob resumes from
    genloom:ft:cancel:<id>       set when a running job is cancelled (read by its training loop every step)
    genloom:ft:lease:<id>        the worker running the job (a token with a TTL the worker keeps renewing)
    genloom:ft:vlease:<id>       the service replica validating the job's data (same idea)
    genloom:ft:ckpt:<id>         hash step -> Checkpoint proto of the checkpoints still on disk
    genloom:ft:hook:<kind>:<id>  a job's or sweep's webhook URL and secret (the secret is never returned)
    genloom:ft:idem:<kind>:<key> id and request digest of an idempotent create
    genloom:ft:sweep:<id>, genloom:ft:sweeps, genloom:ft:sweeplock:<id>   the same for sweeps

A state change and its event are written in one transaction, so a watcher never sees one without the other.
The store is synchronous (the worker's training loop calls it); the gRPC service calls it from a thread.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar

import redis
import redis.asyncio
from google.protobuf.message import Message
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from genloom.v1 import finetune_pb2

P = "genloom:ft:"
TERMINAL = frozenset(
    {finetune_pb2.JOB_STATE_SUCCEEDED, finetune_pb2.JOB_STATE_FAILED, finetune_pb2.JOB_STATE_CANCELLED}
)
SWEEP_TERMINAL = frozenset(
    {finetune_pb2.SWEEP_STATE_SUCCEEDED, finetune_pb2.SWEEP_STATE_FAILED, finetune_pb2.SWEEP_STATE_CANCELLED}
)
EVENT_NAMES = {
    finetune_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    finetune_pb2.JOB_STATE_FAILED: "failed",
    finetune_pb2.JOB_STATE_CANCELLED: "cancelled",
}
# Release a lease only if it is still ours.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
# Renew a lease only if it is still ours.
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)

M = TypeVar("M", bound=Message)
ACTIVE = P + "active"


def job_key(job_id: str) -> str:
    return f"{P}job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{P}events:{job_id}"


def sweep_key(sweep_id: str) -> str:
    return f"{P}sweep:{sweep_id}"


def lease_key(job_id: str, kind: str = "lease") -> str:
    return f"{P}{kind}:{job_id}"


def redis_client(url: str) -> redis.Redis:
    """A client that survives Redis restarts: a pooled connection that died with the server is replaced and the
    command retried (with jittered backoff) instead of failing the caller, and idle connections are checked
    before use."""
    return redis.Redis.from_url(url, **RESILIENCE)


def async_redis_client(url: str, **overrides: Any) -> redis.asyncio.Redis:
    """The asyncio twin of redis_client (WatchJob's XREAD)."""
    options = {**RESILIENCE, "retry": AsyncRetry(_backoff(), _RETRIES), **overrides}
    return redis.asyncio.Redis.from_url(url, **options)


_RETRIES = 3


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.1, cap=2.0)


RESILIENCE: dict[str, Any] = {
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
    "health_check_interval": 15,
    "retry": Retry(_backoff(), _RETRIES),
    "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
}


def now_ms() -> int:
    return int(time.time() * 1000)


def state_event(
    state: finetune_pb2.JobState, message: str, *, level: finetune_pb2.JobEventLevel = finetune_pb2.JOB_EVENT_LEVEL_INFO
) -> finetune_pb2.JobEvent:
    return finetune_pb2.JobEvent(
        type=finetune_pb2.JOB_EVENT_TYPE_STATE_CHANGE, level=level, state=state, message=message
    )


def message_event(
    message: str, level: finetune_pb2.JobEventLevel = finetune_pb2.JOB_EVENT_LEVEL_INFO
) -> finetune_pb2.JobEvent:
    return finetune_pb2.JobEvent(type=finetune_pb2.JOB_EVENT_TYPE_MESSAGE, level=level, message=message)


class Store:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    @classmethod
    def from_url(cls, url: str) -> Store:
        return cls(redis_client(url))

    # -- jobs ---------------------------------------------------------------------------------------------------

    def create_job(
        self, job: finetune_pb2.Job, event: finetune_pb2.JobEvent, *, digest: str = "", webhook_secret: str = ""
    ) -> tuple[finetune_pb2.Job, bool]:
        """Store a new job and its first event; with an idempotency key, return the job an identical earlier
        request created instead (created=False). Raises KeyError(existing id) when the key was used with a
        different request."""
        return self._create("job", job, self._job_writer(job, event), job_key, digest, webhook_secret, finetune_pb2.Job)

    def _seq(self) -> int:
        """A creation sequence number: listing order (unique, unlike timestamps, so page tokens never skip)."""
        return int(self.r.incr(P + "seq"))

    def _job_writer(self, job: finetune_pb2.Job, event: finetune_pb2.JobEvent) -> Callable[[Any], None]:
        def write(pipe: Any) -> None:
            pipe.set(job_key(job.id), job.SerializeToString())
            pipe.zadd(P + "jobs", {job.id: self._seq()})
            pipe.sadd(ACTIVE, job.id)
            self._xadd(pipe, job.id, event)

        return write

    def _create(
        self,
        kind: str,
        record: M,
        write: Callable[[Any], None],
        key_of: Callable[[str], str],
        digest: str,
        webhook_secret: str,
        cls: type[M],
    ) -> tuple[M, bool]:
        rec: Any = record
        if rec.webhook.url:
            self.r.hset(f"{P}hook:{kind}:{rec.id}", mapping={"url": rec.webhook.url, "secret": webhook_secret})
        if not rec.idempotency_key:
            with self.r.pipeline() as pipe:
                write(pipe)
                pipe.execute()
            return record, True
        idem = f"{P}idem:{kind}:{rec.idempotency_key}"
        # SET NX claims the key atomically; the loser of a race reads the winner's record.
        if self.r.set(idem, json.dumps({"id": rec.id, "digest": digest}), nx=True):
            with self.r.pipeline() as pipe:
                write(pipe)
                pipe.execute()
            return record, True
        winner = self.claimed(kind, rec.idempotency_key, digest) or ""  # KeyError when the request differed
        for _ in range(50):  # the winner may be between its SET NX and its write
            raw = self.r.get(key_of(winner))
            if raw:
                return cls.FromString(as_bytes(raw)), False
            time.sleep(0.02)
        raise KeyError(winner)

    def claimed(self, kind: str, key: str, digest: str) -> str | None:
        """The id an earlier create with idempotency key `key` made, if any; KeyError(that id) when that request
        differed (its digest)."""
        raw = self.r.get(f"{P}idem:{kind}:{key}")
        if not raw:
            return None
        claimed = json.loads(raw)
        if claimed.get("digest") != digest:
            raise KeyError(claimed.get("id", ""))
        return str(claimed["id"])

    def get_job(self, job_id: str) -> finetune_pb2.Job | None:
        raw = self.r.get(job_key(job_id))
        return finetune_pb2.Job.FromString(as_bytes(raw)) if raw else None

    def get_jobs(self, job_ids: Sequence[str]) -> list[finetune_pb2.Job | None]:
        if not job_ids:
            return []
        raws = self.r.mget([job_key(i) for i in job_ids])
        return [finetune_pb2.Job.FromString(as_bytes(r)) if r else None for r in raws]

    def update_job(
        self,
        job_id: str,
        change: Callable[[finetune_pb2.Job], Iterable[finetune_pb2.JobEvent] | Literal[False] | None],
        watch: Sequence[str] = (),
    ) -> finetune_pb2.Job | None:
        """Apply `change` to the stored job atomically. `change` mutates the job and returns the events to append
        (or None for none); returning False leaves the record untouched. Returns the job after the change (or as
        stored, when `change` declined); None when there is no such job. Keys in `watch` that `change` reads
        are watched too: if one changes meanwhile, `change` runs again on what is there then."""
        key = job_key(job_id)
        result: list[finetune_pb2.Job | None] = [None]

        def apply(pipe: Any) -> None:
            raw = pipe.get(key)
            if not raw:
                result[0] = None
                return
            job = finetune_pb2.Job.FromString(raw)
            events = change(job)
            if events is False:
                result[0] = finetune_pb2.Job.FromString(raw)
                return
            job.updated_at.GetCurrentTime()
            pipe.multi()
            pipe.set(key, job.SerializeToString())
            if job.state in TERMINAL:
                pipe.srem(ACTIVE, job_id)
            for event in events or ():
                self._xadd(pipe, job_id, event)
            result[0] = job

        self.r.transaction(apply, key, *watch)
        return result[0]

    def transition(
        self,
        job_id: str,
        to: finetune_pb2.JobState,
        *,
        allowed_from: Iterable[int],
        message: str,
        level: finetune_pb2.JobEventLevel = finetune_pb2.JOB_EVENT_LEVEL_INFO,
        mutate: Callable[[finetune_pb2.Job], None] | None = None,
        extra_events: Sequence[finetune_pb2.JobEvent] = (),
        guard: Callable[[finetune_pb2.Job], bool] | None = None,
        watch: Sequence[str] = (),
    ) -> tuple[finetune_pb2.Job | None, bool]:
        """Move a job to state `to` if it is in one of `allowed_from` (and `guard(job)` holds); (job after,
        whether it moved)."""
        allowed = set(allowed_from)
        moved = [False]

        def change(job: finetune_pb2.Job) -> list[finetune_pb2.JobEvent] | Literal[False]:
            moved[0] = False  # a WATCH conflict runs this again on the newer record
            if job.state not in allowed or (guard is not None and not guard(job)):
                return False
            job.state = to
            if mutate is not None:
                mutate(job)
            if to == finetune_pb2.JOB_STATE_QUEUED:
                job.queued_at.GetCurrentTime()
            if to in TERMINAL:
                job.finished_at.GetCurrentTime()
                job.cancel_requested = False
            event = state_event(to, message, level=level)
            if to == finetune_pb2.JOB_STATE_SUCCEEDED:
                event.result_model = job.result_model
            if to == finetune_pb2.JOB_STATE_FAILED:
                event.error.CopyFrom(job.error)
            moved[0] = True
            return [*extra_events, event]

        job = self.update_job(job_id, change, watch)
        return job, moved[0]

    def add_event(self, job_id: str, event: finetune_pb2.JobEvent) -> str:
        return self._xadd(self.r, job_id, event)

    def _xadd(self, target: Any, job_id: str, event: finetune_pb2.JobEvent) -> str:
        event.job_id = job_id
        if not event.HasField("created_at"):
            event.created_at.GetCurrentTime()
        return target.xadd(events_key(job_id), {"e": event.SerializeToString()})  # type: ignore[no-any-return]

    def last_event_id(self, job_id: str) -> str:
        newest = self.r.xrevrange(events_key(job_id), count=1)
        return as_text(newest[0][0] or b"") if newest else ""

    def with_last_event(self, job: finetune_pb2.Job) -> finetune_pb2.Job:
        """The job as stored now with its newest event id, read in one transaction (a record and its events are
        written together, so the id never runs ahead of the record)."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.get(job_key(job.id))
            pipe.xrevrange(events_key(job.id), count=1)
            raw, newest = pipe.execute()
        fresh = finetune_pb2.Job.FromString(raw) if raw else job
        fresh.last_event_id = newest[0][0].decode() if newest else ""
        return fresh

    def list_jobs(self, ids_after: float | None, ascending: bool, count: int) -> list[tuple[str, float]]:
        """Job ids with their creation scores, after score `ids_after` exclusive, in the requested order."""
        zkey = P + "jobs"
        if ascending:
            low = f"({ids_after}" if ids_after is not None else "-inf"
            rows = self.r.zrangebyscore(zkey, low, "+inf", start=0, num=count, withscores=True)
        else:
            high = f"({ids_after}" if ids_after is not None else "+inf"
            rows = self.r.zrevrangebyscore(zkey, high, "-inf", start=0, num=count, withscores=True)
        return _scored(rows)

    # -- cancellation and leases -----------------------------------------------------------------------------------

    def set_cancel_flag(self, job_id: str) -> None:
        self.r.set(f"{P}cancel:{job_id}", "1", ex=30 * 24 * 3600)

    def cancel_flag(self, job_id: str) -> bool:
        return bool(self.r.exists(f"{P}cancel:{job_id}"))

    def acquire_lease(self, kind: str, job_id: str, token: str, seconds: float) -> bool:
        return bool(self.r.set(f"{P}{kind}:{job_id}", token, nx=True, px=int(seconds * 1000)))

    def renew_lease(self, kind: str, job_id: str, token: str, seconds: float) -> bool:
        return bool(self._renew(keys=[f"{P}{kind}:{job_id}"], args=[token, int(seconds * 1000)]))

    def release_lease(self, kind: str, job_id: str, token: str) -> None:
        self._release(keys=[f"{P}{kind}:{job_id}"], args=[token])

    def lease_holder(self, kind: str, job_id: str) -> str | None:
        raw = self.r.get(f"{P}{kind}:{job_id}")
        return as_text(raw) if raw else None

    def reclaim_lease(
        self, job_id: str, token: str, seconds: float, still_ours: Callable[[finetune_pb2.Job], bool]
    ) -> bool:
        """Take a lapsed job lease back, provided nobody holds it and `still_ours(job)` holds for the record as
        stored; both are watched, so a reaper that re-queues the job meanwhile wins and this returns False."""
        lease = lease_key(job_id)
        taken = [False]

        def apply(pipe: Any) -> None:
            taken[0] = False
            holder = pipe.get(lease)
            if holder is not None:
                taken[0] = holder.decode() == token
                return
            raw = pipe.get(job_key(job_id))
            if not raw or not still_ours(finetune_pb2.Job.FromString(raw)):
                return
            pipe.multi()
            pipe.set(lease, token, px=int(seconds * 1000))
            pipe.delete(_leaseless_key(job_id))
            taken[0] = True

        self.r.transaction(apply, lease, job_key(job_id))
        return taken[0]

    def leaseless_for(self, job_id: str) -> float:
        """Seconds since a reaper first saw this running job without a lease (0 on the first sighting)."""
        now = time.time()
        key = _leaseless_key(job_id)
        # Kept well past any grace period, so a forgotten marker cannot make a later lapse look old.
        self.r.set(key, repr(now), nx=True, ex=3600)
        raw = self.r.get(key)
        return max(0.0, now - float(raw)) if raw else 0.0

    def clear_leaseless(self, job_id: str) -> None:
        self.r.delete(_leaseless_key(job_id))

    # -- checkpoints --------------------------------------------------------------------------------------------

    def record_checkpoint(self, job_id: str, ckpt: finetune_pb2.Checkpoint | None, kept: Sequence[str]) -> None:
        """Add `ckpt` (if any) and forget checkpoints no longer on disk (Trainer rotates old ones out)."""
        key = f"{P}ckpt:{job_id}"
        stored = self.r.hgetall(key)
        with self.r.pipeline() as pipe:
            for step, raw in stored.items():
                if finetune_pb2.Checkpoint.FromString(as_bytes(raw)).name not in kept:
                    pipe.hdel(key, step)
            if ckpt is not None:
                pipe.hset(key, str(ckpt.step), ckpt.SerializeToString())
            pipe.execute()

    def checkpoints(self, job_id: str) -> list[finetune_pb2.Checkpoint]:
        rows = [finetune_pb2.Checkpoint.FromString(as_bytes(v)) for v in self.r.hgetall(f"{P}ckpt:{job_id}").values()]
        return sorted(rows, key=lambda c: c.step)

    def webhook(self, kind: str, record_id: str) -> tuple[str, str] | None:
        raw = self.r.hgetall(f"{P}hook:{kind}:{record_id}")
        if not raw:
            return None
        return as_text(raw[b"url"]), as_text(raw.get(b"secret", b""))

    # -- sweeps -------------------------------------------------------------------------------------------------

    def create_sweep(
        self, sweep: finetune_pb2.Sweep, *, digest: str = "", webhook_secret: str = ""
    ) -> tuple[finetune_pb2.Sweep, bool]:
        def write(pipe: Any) -> None:
            pipe.set(sweep_key(sweep.id), sweep.SerializeToString())
            pipe.zadd(P + "sweeps", {sweep.id: self._seq()})

        return self._create("sweep", sweep, write, sweep_key, digest, webhook_secret, finetune_pb2.Sweep)

    def get_sweep(self, sweep_id: str) -> finetune_pb2.Sweep | None:
        raw = self.r.get(sweep_key(sweep_id))
        return finetune_pb2.Sweep.FromString(as_bytes(raw)) if raw else None

    def update_sweep(
        self, sweep_id: str, change: Callable[[finetune_pb2.Sweep], bool | None]
    ) -> finetune_pb2.Sweep | None:
        """As update_job for sweeps: `change` returns False to leave the record untouched."""
        key = sweep_key(sweep_id)
        result: list[finetune_pb2.Sweep | None] = [None]

        def apply(pipe: Any) -> None:
            raw = pipe.get(key)
            if not raw:
                return
            sweep = finetune_pb2.Sweep.FromString(raw)
            if change(sweep) is False:
                result[0] = finetune_pb2.Sweep.FromString(raw)
                return
            sweep.updated_at.GetCurrentTime()
            pipe.multi()
            pipe.set(key, sweep.SerializeToString())
            result[0] = sweep

        self.r.transaction(apply, key)
        return result[0]

    def list_sweeps(self, after: float | None, ascending: bool, count: int) -> list[tuple[str, float]]:
        zkey = P + "sweeps"
        if ascending:
            rows = self.r.zrangebyscore(zkey, f"({after}" if after is not None else "-inf", "+inf", 0, count, True)
        else:
            rows = self.r.zrevrangebyscore(zkey, f"({after}" if after is not None else "+inf", "-inf", 0, count, True)
        return _scored(rows)

    def jobs_in_states(self, states: Iterable[int]) -> list[finetune_pb2.Job]:
        """Unfinished jobs in any of `states`: what the reaper inspects (however old they are)."""
        wanted = set(states)
        ids = sorted(as_text(i) for i in self.r.smembers(ACTIVE))
        found = []
        for start in range(0, len(ids), 500):
            for job in self.get_jobs(ids[start : start + 500]):
                if job is not None and job.state in wanted:
                    found.append(job)
        return found


def as_bytes(value: bytes | str) -> bytes:
    """A Redis reply as the bytes it is: this module's clients never decode replies (no decode_responses), but
    redis-py types replies as bytes or str."""
    return value if isinstance(value, bytes) else value.encode()


def as_text(value: bytes | str) -> str:
    """A Redis reply (bytes, see as_bytes) decoded as UTF-8."""
    return value.decode() if isinstance(value, bytes) else value


def _scored(rows: Iterable[Sequence[Any]]) -> list[tuple[str, float]]:
    """A ZRANGEBYSCORE ... WITHSCORES reply (rows of member and score) -> (member, score) pairs."""
    return [(as_text(member), score) for member, score in rows]


def _leaseless_key(job_id: str) -> str:
    return f"{P}leaseless:{job_id}"


def page_token(last_score: float, digest: str) -> str:
    raw = json.dumps({"s": last_score, "f": digest}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_page_token(token: str) -> tuple[float, str]:
    """(score, filter digest) of a token; ValueError when it is not one of ours."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    data = json.loads(raw)
    return float(data["s"]), str(data["f"])

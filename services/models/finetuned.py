"""The registry of fine-tuned models: "ft:<base>:<suffix>:<job-id>" -> what to load.

A worker registers a succeeded job's result here (a Redis hash per name); the inference, tokenizer and task
services look names up when a request names an "ft:" model, so a new model is servable as soon as its job ends,
by any replica, without a restart.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

from redis.exceptions import RedisError

from genloom.services.server.errors import InvalidArgument, NotFound, Unavailable, quote

logger = logging.getLogger(__name__)

PREFIX = "ft:"
KEY_PREFIX = "genloom:ft:model:"
# ft:<base>:<suffix>:<job-id>; the base has no ':', the suffix is [A-Za-z0-9._-]{0,40}, the id is a job id.
_NAME = re.compile(r"^ft:(?P<base>[^:]+):(?P<suffix>[A-Za-z0-9._-]{0,40}):(?P<job>ftjob-[0-9a-z]{26})$")


@dataclass(frozen=True)
class FineTunedModel:
    """A servable fine-tuned model."""

    name: str
    # The base model's name as the model registry knows it (e.g. "smollm2-135m-instruct").
    base_model: str
    # "lora" (path is a PEFT adapter directory) or "full" (path is a whole Hugging Face model directory).
    method: str
    path: str
    job_id: str


def is_fine_tuned(name: str) -> bool:
    return name.startswith(PREFIX)


def parse_name(name: str) -> tuple[str, str, str]:
    """(base, suffix, job id) of a well-formed name; ValueError otherwise."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{quote(name)} is not a fine-tuned model name (ft:<base>:<suffix>:<job-id>)")
    return m["base"], m["suffix"], m["job"]


def model_name(base: str, suffix: str, job_id: str) -> str:
    return f"{PREFIX}{base}:{suffix}:{job_id}"


def key(name: str) -> str:
    return KEY_PREFIX + name


def register(client: Any, model: FineTunedModel) -> None:
    """Record `model` (sync redis client)."""
    client.hset(key(model.name), mapping=asdict(model))


def _decode(raw: dict[Any, Any]) -> FineTunedModel | None:
    if not raw:
        return None
    fields = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()
    }
    return FineTunedModel(**{f: fields.get(f, "") for f in FineTunedModel.__dataclass_fields__})


def lookup_sync(client: Any, name: str) -> FineTunedModel | None:
    return _decode(client.hgetall(key(name)))


async def lookup(client: Any, name: str) -> FineTunedModel | None:
    """The registered model called `name` (async redis client), or None."""
    return _decode(await client.hgetall(key(name)))


class FineTunedModelResolver:
    """Names -> registered fine-tuned models, for the servers that serve them (inference, tokenizer).

    The Redis client is created on first use, so servers that never see an "ft:" name never connect. Found
    entries are cached for the life of the process: a registered name is never re-pointed (its job id makes it
    unique), while a name not found yet is asked again on every request, so a job that succeeds later is
    servable at once (hot, no restart). Failures are raised as the service errors the servers return.
    """

    def __init__(self, redis_url: str, *, timeout: float = 5.0) -> None:
        self._redis_url = redis_url
        self._timeout = timeout  # a Redis that hangs must not hang the RPC: it becomes UNAVAILABLE
        self._client: Any = None
        self._found: dict[str, FineTunedModel] = {}

    async def resolve(self, name: str, field: str) -> FineTunedModel:
        """The model registered as `name` (a request's `field`). Raises InvalidArgument for a name that is not
        "ft:<base>:<suffix>:<job-id>", NotFound for one no job registered, Unavailable when Redis can't be
        reached."""
        cached = self._found.get(name)
        if cached is not None:
            return cached
        try:
            parse_name(name)
        except ValueError:
            # The "ft:" prefix is reserved: a name that breaks the format can never be registered, so the request
            # is what needs fixing, not a model that is missing.
            raise InvalidArgument.field(
                field, f"{quote(name)} is not a fine-tuned model name: expected ft:<base>:<suffix>:<job-id>"
            ) from None
        try:
            found = await lookup(self._redis(), name)
        except (RedisError, OSError) as err:
            logger.warning("fine-tuned model registry lookup of %s failed: %r", name, err)
            raise Unavailable(
                f"the fine-tuned model registry (GENLOOM_REDIS_URL) can't be reached to look up {quote(name)}; "
                "retry later"
            ) from None
        if found is None:
            raise NotFound(
                f"{field}: no fine-tuned model {quote(name)} is registered (its job has not succeeded, or it never "
                "existed)"
            )
        self._found[name] = found
        return found

    def _redis(self) -> Any:
        if self._client is None:
            from genloom.services.finetune.store import async_redis_client

            self._client = async_redis_client(
                self._redis_url, socket_connect_timeout=self._timeout, socket_timeout=self._timeout
            )
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

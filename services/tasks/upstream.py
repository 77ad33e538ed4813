"""The task service's view of the tokenizer and inference services: gRPC stubs with the caller's deadline,
request id and API key, model facts cached, and upstream failures turned into the task service's own errors.

Why gRPC and not in-process calls: the task service scales separately from inference (GPU nodes) and the
tokenizer; `genloom serve all` points both targets at its own port, so one code path serves every deployment.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from google.rpc.error_details_pb2 import RetryInfo

from genloom.services.server import errors
from genloom.services.server.channels import KEEPALIVE_OPTIONS, OVERLOADED_SERVER_MESSAGE
from genloom.services.server.interceptors import request_id_var
from genloom.services.server.lru import LRUCache
from genloom.services.tasks.settings import TasksSettings
from genloom.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

logger = logging.getLogger(__name__)

#: Monotonic deadline of the task RPC being served (None: the caller set none). Every upstream call gets the
#: time that is left, so a task never outlives its caller's deadline.
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar("genloom_task_deadline", default=None)

# gRPC itself retries an upstream call that failed on UNAVAILABLE before the server answered at all (a replica
# restarting, a refused connection); _may_retry below covers calls that a replica dropped while serving them.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "genloom.v1.TokenizerService"}, {"service": "genloom.v1.InferenceService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
# Models whose facts are kept (least recently used dropped first).
MAX_CACHED_MODELS = 256
# Attempts of one upstream call that fails with UNAVAILABLE (see _may_retry), and the first pause between them.
UPSTREAM_ATTEMPTS = 3
UPSTREAM_BACKOFF = 0.1
_CHANNEL_OPTIONS = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # A backend that stops answering without closing the connection (frozen, its node lost) is noticed by
    # unanswered pings as the SDK notices it; its calls then fail UNAVAILABLE and _may_retry moves them elsewhere.
    *KEEPALIVE_OPTIONS,
]


@dataclass(frozen=True)
class ModelFacts:
    """What prompt building needs to know about a model (from the tokenizer service, cached)."""

    name: str
    context_window: int
    has_chat_template: bool
    vocab_size: int = 0  # every valid token id is below it; 0 = unknown


def remaining_timeout() -> float | None:
    """Seconds left before the current task RPC's deadline; raises DeadlineExceeded when none are."""
    deadline = deadline_var.get()
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.DeadlineExceeded("the deadline passed before the task finished")
    return left


class Upstream:
    """Channels to the tokenizer and inference services."""

    def __init__(self, settings: TasksSettings) -> None:
        self.settings = settings
        self._local_target: str | None = None
        self._local_api_key = ""
        self._local_root_cert: bytes | None = None
        self._channels: list[grpc.aio.Channel] = []
        self.tokenizer: tokenizer_pb2_grpc.TokenizerServiceStub | None = None
        self.inference: inference_pb2_grpc.InferenceServiceStub | None = None
        # Keyed by the caller's spelling of a model: bounded, since a client can spell one model many ways.
        self._facts: LRUCache[str, ModelFacts] = LRUCache(MAX_CACHED_MODELS)
        self._facts_lock = asyncio.Lock()
        self._api_key = settings.upstream_api_key

    def bind_local(self, target: str, api_key: str, root_cert: bytes | None) -> None:
        """The address of the server hosting this service (used for targets left empty)."""
        self._local_target = target
        self._local_api_key = api_key
        self._local_root_cert = root_cert

    async def start(self) -> None:
        tok_target, tok_local = self._target(self.settings.tokenizer_target, "GENLOOM_TASKS_TOKENIZER_TARGET")
        inf_target, inf_local = self._target(self.settings.inference_target, "GENLOOM_TASKS_INFERENCE_TARGET")
        tok_channel = self._channel(tok_target, tok_local)
        inf_channel = (
            tok_channel if (inf_target, inf_local) == (tok_target, tok_local) else self._channel(inf_target, inf_local)
        )
        self._channels = list({id(c): c for c in (tok_channel, inf_channel)}.values())
        # The generated stub classes carry no annotations.
        self.tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(tok_channel)
        self.inference = inference_pb2_grpc.InferenceServiceStub(inf_channel)
        if not self._api_key and (tok_local or inf_local):
            self._api_key = self._local_api_key

    def _target(self, configured: str, env: str) -> tuple[str, bool]:
        if configured:
            return configured, False
        if self._local_target is None:
            raise RuntimeError(f"{env} is not set and this server hosts no tokenizer/inference service to use")
        return self._local_target, True

    def _channel(self, target: str, local: bool) -> grpc.aio.Channel:
        options = list(_CHANNEL_OPTIONS)
        if local and self._local_root_cert is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self._local_root_cert)
            return grpc.aio.secure_channel(target, credentials, options=options)
        if not local and self.settings.upstream_tls:
            return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
        return grpc.aio.insecure_channel(target, options=options)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels = []

    # -- calls ----------------------------------------------------------------------------------------------------

    def _metadata(self) -> list[tuple[str, str]]:
        metadata = [("x-request-id", request_id_var.get())]
        if self._api_key:
            metadata.append(("authorization", f"Bearer {self._api_key}"))
        return metadata

    async def _unary(self, service: str, method: Any, request: Any) -> Any:
        for attempt in range(UPSTREAM_ATTEMPTS):
            try:
                return await method(request, timeout=remaining_timeout(), metadata=self._metadata())
            except grpc.aio.AioRpcError as err:
                if not await _may_retry(err, attempt):
                    raise translate(err, service) from None
        raise AssertionError("unreachable")

    async def model_facts(self, model: str) -> ModelFacts:
        """Context window and chat template of `model` ("" = the default), asked once per model."""
        facts = self._facts.get(model)
        if facts is not None:
            return facts
        async with self._facts_lock:
            facts = self._facts.get(model)  # another call may have asked while this one waited for the lock
            if facts is None:
                assert self.tokenizer is not None
                info = await self._unary(
                    "tokenizer",
                    self.tokenizer.GetTokenizerInfo,
                    tokenizer_pb2.GetTokenizerInfoRequest(model=model),
                )
                facts = ModelFacts(info.model, info.context_window, info.has_chat_template, info.vocab_size)
                self._facts.put(info.model, facts)
                self._facts.put(model, facts)
            return facts

    async def tokenize(
        self, model: str, inputs: Sequence[tokenizer_pb2.TokenizerInput], *, offsets: bool = False
    ) -> list[tokenizer_pb2.TokenizeResult]:
        assert self.tokenizer is not None
        request = tokenizer_pb2.TokenizeRequest(
            model=model, inputs=inputs, add_special_tokens=False, return_offsets=offsets
        )
        response = await self._unary("tokenizer", self.tokenizer.Tokenize, request)
        return list(response.results)

    async def count(self, model: str, inputs: Sequence[tokenizer_pb2.TokenizerInput]) -> list[int]:
        assert self.tokenizer is not None
        request = tokenizer_pb2.CountTokensRequest(model=model, inputs=inputs, add_special_tokens=False)
        response = await self._unary("tokenizer", self.tokenizer.CountTokens, request)
        return list(response.counts)

    async def generate(self, request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateResponse:
        assert self.inference is not None
        return await self._unary("inference", self.inference.Generate, request)  # type: ignore[no-any-return]

    async def generate_stream(
        self, request: inference_pb2.GenerateStreamRequest
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        assert self.inference is not None
        for attempt in range(UPSTREAM_ATTEMPTS):
            call = self.inference.GenerateStream(request, timeout=remaining_timeout(), metadata=self._metadata())
            started = False
            try:
                async for message in call:
                    started = True
                    yield message
                return
            except grpc.aio.AioRpcError as err:
                # Before its first message a stream can start again elsewhere; after it, the caller has part of it.
                if started or not await _may_retry(err, attempt):
                    raise translate(err, "inference") from None
            finally:
                call.cancel()

    async def score(self, request: inference_pb2.ScoreRequest) -> inference_pb2.ScoreResponse:
        assert self.inference is not None
        return await self._unary("inference", self.inference.Score, request)  # type: ignore[no-any-return]


async def _may_retry(err: grpc.aio.AioRpcError, attempt: int) -> bool:
    """Whether a failed upstream call should be made again, after a short pause if so. Only UNAVAILABLE is
    retried: a replica died or restarted under the call, and another may answer (every upstream call is
    idempotent). gRPC's own retry policy can't cover this case: the servers send their headers (the request id)
    as a call starts, and a call with headers received is never retried by gRPC."""
    if err.code() != grpc.StatusCode.UNAVAILABLE or attempt + 1 >= UPSTREAM_ATTEMPTS:
        return False
    pause = UPSTREAM_BACKOFF * 2**attempt * (0.5 + random.random() / 2)
    left = remaining_timeout()
    if left is not None and left <= pause:
        return False
    await asyncio.sleep(pause)
    return True


# Codes an upstream genloom service gives for the caller's own mistakes (bad value, unknown name, a path it may
# not use, a state that forbids the call). They reach the task's caller as they are, message and BadRequest
# included: retrying would not help, and the message already follows the error contract (the upstream server's
# interceptor wrote it). gRPC itself never produces these codes, so no transport text can come with them.
_CALLER_ERRORS: dict[grpc.StatusCode, type[errors.ServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRange,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
}


def translate(err: grpc.aio.AioRpcError, service: str) -> errors.ServiceError:
    """An upstream failure as the task service's error. The caller's mistakes keep their code (see _CALLER_ERRORS);
    a missing, overloaded or failing dependency is UNAVAILABLE / RESOURCE_EXHAUSTED / INTERNAL with a message of
    our own. gRPC's text for those names addresses ("ipv4:10.0.0.7:50051: Connection refused"): it goes to the
    log, never to the caller."""
    code = err.code()
    details = err.details() or code.name
    status = _status_details(err)
    kind = _CALLER_ERRORS.get(code)
    if kind is errors.InvalidArgument:
        violations = [
            errors.FieldViolation(_caller_field(service, v.field), v.description)
            for detail in status
            if isinstance(detail, error_details_pb2.BadRequest)
            for v in detail.field_violations
        ]
        # The contract promises a BadRequest with every INVALID_ARGUMENT; an upstream that sent none (a request
        # it could not parse) is named as the field at fault.
        return errors.InvalidArgument(details, violations or [errors.FieldViolation(service, details)])
    if kind is not None:
        return kind(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.DeadlineExceeded(f"the {service} service did not answer before the deadline")
    if code == grpc.StatusCode.CANCELLED:
        return errors.Unavailable(f"the call to the {service} service was cancelled; retry")
    retry_after = next((d.retry_delay.ToNanoseconds() / 1e9 for d in status if isinstance(d, RetryInfo)), None)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (retry_after is not None or OVERLOADED_SERVER_MESSAGE in details):
        logger.info("the %s service is overloaded: %s", service, details)
        return errors.ResourceExhausted(f"the {service} service is overloaded; retry later", retry_after or 1.0)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # gRPC's own size limits (a message or status too large), not overload: retrying can't help.
        logger.error("a call to the %s service hit a size limit: %s", service, details)
        return errors.ServiceError(f"a call to the {service} service exceeded a size limit; the server log has details")
    logger.warning("a call to the %s service failed: %s: %s", service, code.name, details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return errors.Unavailable(
            f"the {service} service refused the task service's credentials; check GENLOOM_TASKS_UPSTREAM_API_KEY"
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return errors.Unavailable(
            f"no {service} service at the configured target; set GENLOOM_TASKS_{service.upper()}_TARGET"
        )
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS):
        # A fault of the upstream server, not a blip: retrying the same request would fail the same way.
        return errors.ServiceError(
            f"the {service} service failed (request id {request_id_var.get()}); the server logs have the details"
        )
    return errors.Unavailable(f"the {service} service is unavailable; retry later", retry_after)


def _caller_field(service: str, field: str) -> str:
    """An upstream request's field as the task request's field where the task request has it (the same ModelRef
    and SamplingParams travel on), else named as a field of the request the task service made."""
    head = field.split(".", 1)[0].split("[", 1)[0]
    if service == "tokenizer" and field == "model":
        return "model.model"
    if service == "inference" and head in ("model", "sampling"):
        return field
    return f"{service}.{field}"


def _status_details(err: grpc.aio.AioRpcError) -> list[Message]:
    """The google.rpc details (BadRequest, RetryInfo) an upstream status carries."""
    found: list[Message] = []
    for key, value in err.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            continue
        for detail in status.details:
            for kind in (error_details_pb2.BadRequest, RetryInfo):
                unpacked = kind()
                if detail.Unpack(unpacked):
                    found.append(unpacked)
    return found

"""Server interceptors, outermost first: observability, error mapping, authentication, malformed-request guard.

Each interceptor runs an async context manager ("scope") around every call of a unary-request method, for unary
and streaming responses alike, so the same code covers both shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc._cython import cygrpc
from grpc_status import rpc_status

from genloom.services.server import errors
from genloom.services.server.metrics import RPC_IN_FLIGHT, RPC_LATENCY, RPC_REQUESTS, split_method

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# What a client may send as its x-request-id; anything else is replaced by an id of our own.
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# The id of the RPC being handled, for log records (see log_setup.RequestIdFilter).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("genloom_request_id", default="-")

# What grpc raises when a send on a call fails because the client already left (cancelled, deadline, connection
# lost) and grpc has not yet cancelled the handler's task: a cancellation, not a server error.
CALL_GONE: tuple[type[BaseException], ...] = tuple(
    kind for kind in (getattr(cygrpc, "ExecuteBatchError", None),) if isinstance(kind, type)
)

# Methods anyone may call without an API key: load balancers and debugging tools must reach them.
PUBLIC_SERVICE_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


# grpcio ships no type information: its ServerInterceptor base is untyped to mypy.
class ScopedInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Base: subclasses implement `scope()`, entered around every call of the methods they apply to."""

    def applies_to(self, method: str) -> bool:
        return True

    def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    def wrap_deserializer(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        return deserializer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # genloom has no client-streaming RPCs; reflection's stream-stream passes through untouched.
        if handler is None or handler.request_streaming or not self.applies_to(method):
            return handler
        deserializer = self.wrap_deserializer(handler.request_deserializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._wrap_unary(method, handler.unary_unary),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self.scope(method, request, context):
                return await behavior(request, context)

        return unary

    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        # Always handed to grpc in writer style (context.write), never as an async generator. grpc cancels the
        # handler's task when the client cancels; if that lands while grpc itself is sending a message the
        # generator was suspended at `yield`, grpc drops it unclosed, and the event loop finalizes it later in
        # another task and context: the scopes then exit where their context variables were never set (and the
        # RPC is counted UNKNOWN). Here the cancellation arrives in this coroutine, and `aclosing` closes the
        # handler's generator at once, in the handler's own task (which also aborts its engine work promptly).
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                async with (
                    self.scope(method, request, context),
                    contextlib.aclosing(behavior(request, context)) as messages,
                ):
                    async for message in messages:
                        await context.write(message)

            return stream

        async def writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            async with self.scope(method, request, context):
                await behavior(request, context)

        return writer


class ObservabilityInterceptor(ScopedInterceptor):
    """Request ids (taken from x-request-id metadata or made up, echoed in initial metadata), one log line per
    RPC with its status and duration, and the Prometheus RPC metrics."""

    def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AbstractAsyncContextManager[None]:
        return self._observe(method, context)

    @asynccontextmanager
    async def _observe(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get(REQUEST_ID_KEY)
        # A client's id is echoed in headers, messages and every log line of the call: only a short, plain one.
        request_id = given if isinstance(given, str) and CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        service, name = split_method(method)
        in_flight = RPC_IN_FLIGHT.labels(service, name)
        in_flight.inc()
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
            yield
            code = _status_of(context) or grpc.StatusCode.OK
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except CALL_GONE:
            # E.g. the headers above, for a client that cancelled before the handler ran. Re-raised as is, grpc
            # would log it as an error when it has not yet seen the client leave.
            code = grpc.StatusCode.CANCELLED
            raise asyncio.CancelledError from None
        except BaseException:
            code = _status_of(context) or grpc.StatusCode.UNKNOWN
            raise
        finally:
            elapsed = time.perf_counter() - start
            in_flight.dec()
            RPC_REQUESTS.labels(service, name, code.name).inc()
            RPC_LATENCY.labels(service, name).observe(elapsed)
            logger.info(
                "rpc %s %s %.1fms",
                method,
                code.name,
                elapsed * 1000,
                extra={"rpc_method": method, "grpc_code": code.name, "duration_ms": round(elapsed * 1000, 3)},
            )
            request_id_var.reset(token)


def _status_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


class ErrorInterceptor(ScopedInterceptor):
    """Domain errors -> their gRPC status (with google.rpc details); anything else -> INTERNAL, generic message."""

    def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AbstractAsyncContextManager[None]:
        return self._map_errors(method, context)

    @asynccontextmanager
    async def _map_errors(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        try:
            yield
        except errors.ServiceError as err:
            status = to_rpc_status(err)
            await context.abort(status.code, status.details, status.trailing_metadata)
        except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
            raise
        except CALL_GONE:
            # Not a bug to report: the client left while a message was on its way. Ends the call as cancelled.
            logger.debug("%s: the client left before the call ended", method)
            raise asyncio.CancelledError from None
        except Exception:
            logger.exception("unhandled error in %s", method)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal server error (request id {request_id_var.get()}); the server log has the details",
            )


# Bounds on what one error status carries, whatever a servicer put in it. The status travels in the trailers:
# grpc-message (percent-encoded: up to 3 bytes per byte) and grpc-status-details-bin (base64 of the Status, which
# repeats the message). Past gRPC's metadata limits (8 KiB soft, some calls refused; 16 KiB hard) the client gets
# RESOURCE_EXHAUSTED instead of the real code, so these keep the trailers under 6 KiB in the worst case.
MAX_STATUS_MESSAGE_BYTES = 512
MAX_VIOLATION_FIELD_BYTES = 128
MAX_VIOLATION_DESCRIPTION_BYTES = 256
MAX_VIOLATIONS = 20
MAX_STATUS_DETAILS_BYTES = 3072


def _clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (on a character boundary), marked when cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    marker = "... (truncated)"
    return data[: limit - len(marker)].decode("utf-8", "ignore") + marker


def to_rpc_status(err: errors.ServiceError) -> grpc.Status:
    """The status for a domain error, bounded in size (see MAX_STATUS_*): the client always receives its code."""
    violations = err.violations if isinstance(err, errors.InvalidArgument) else ()
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=_clip(v.field, MAX_VIOLATION_FIELD_BYTES),
                description=_clip(v.description, MAX_VIOLATION_DESCRIPTION_BYTES),
            )
            for v in violations[:MAX_VIOLATIONS]
        ]
    )
    # The first violations are the ones a client fixes first: drop from the end until they fit next to the
    # longest message.
    while len(detail.field_violations) > 1 and detail.ByteSize() > MAX_STATUS_DETAILS_BYTES - MAX_STATUS_MESSAGE_BYTES:
        del detail.field_violations[-1]
    message = err.message
    if len(violations) > len(detail.field_violations):
        message = f"{message} ({len(violations) - len(detail.field_violations)} more problems not listed)"
    status = status_pb2.Status(code=err.code.value[0], message=_clip(message, MAX_STATUS_MESSAGE_BYTES))
    if detail.field_violations:
        status.details.add().Pack(detail)
    elif isinstance(err, errors.ResourceExhausted | errors.Unavailable) and err.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    assert status.code != code_pb2.OK
    return rpc_status.to_status(status)


class AuthInterceptor(ScopedInterceptor):
    """Requires `authorization: Bearer <key>` with one of the configured keys on every non-public RPC."""

    def __init__(self, keys: frozenset[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    def applies_to(self, method: str) -> bool:
        return not method.startswith(PUBLIC_SERVICE_PREFIXES)

    def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AbstractAsyncContextManager[None]:
        return self._check(context)

    @asynccontextmanager
    async def _check(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        metadata = dict(context.invocation_metadata() or ())
        header = str(metadata.get("authorization", ""))
        scheme, _, token = header.partition(" ")
        if not header:
            raise errors.Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'")
        presented = token.strip().encode()
        # Compare against every key in constant time so timing reveals nothing about which key was close.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise errors.Unauthenticated("invalid API key")
        yield


class MalformedRequest:
    """Stands in for a request whose bytes did not parse (e.g. a string field with invalid UTF-8)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class MalformedRequestInterceptor(ScopedInterceptor):
    """Turns undecodable requests into INVALID_ARGUMENT. Without it grpc answers INTERNAL for a client's bad
    bytes. Innermost, so authentication is checked before the request's content is judged."""

    def wrap_deserializer(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        if deserializer is None:
            return None

        def deserialize(data: bytes) -> Any:
            try:
                return deserializer(data)
            except Exception as err:  # protobuf's DecodeError, or the upb backend's own error types
                return MalformedRequest(str(err) or type(err).__name__)

        return deserialize

    def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AbstractAsyncContextManager[None]:
        return self._guard(request)

    @asynccontextmanager
    async def _guard(self, request: Any) -> AsyncIterator[None]:
        if isinstance(request, MalformedRequest):
            raise errors.InvalidArgument(
                f"request could not be parsed: {request.reason} (string fields must be valid UTF-8)"
            )
        yield


def default_interceptors(api_keys: frozenset[str]) -> list[grpc.aio.ServerInterceptor]:
    chain: list[grpc.aio.ServerInterceptor] = [ObservabilityInterceptor(), ErrorInterceptor()]
    if api_keys:
        chain.append(AuthInterceptor(api_keys))
    chain.append(MalformedRequestInterceptor())
    return chain

"""Domain errors raised by servicers and engines; the error interceptor turns each into one gRPC status.

Servicers raise these and never touch status codes themselves. Anything else that escapes a handler is a bug:
it becomes INTERNAL with a generic message, and the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

# How much of a client's value an error message may quote: enough to recognise it, never enough to push a status
# past gRPC's metadata limit (16 KiB) or to mirror a huge input back.
QUOTE_LIMIT = 64


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A client-supplied value for an error message: escaped (repr), and cut to `limit` characters with the
    full length noted. Every message that names a user's string goes through this."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field, e.g. field="inputs[2].conversation.messages[0].role"."""

    field: str
    description: str


class ServiceError(Exception):
    """Base for errors that map to a specific gRPC status. The message is shown to the client as is."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """The request is malformed or a value is out of its allowed range; fixing the request fixes it."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, violations: Iterable[FieldViolation] = ()) -> None:
        super().__init__(message)
        self.violations: Sequence[FieldViolation] = tuple(violations)

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        """A single bad field: the message is "<field>: <description>"."""
        return cls(f"{field}: {description}", [FieldViolation(field, description)])

    @classmethod
    def raise_for(cls, violations: Iterable[FieldViolation], limit: int = 20) -> None:
        """Raise one error listing the violations (the first `limit` of them, the rest counted); do nothing when
        there are none. `violations` may be a lazy iterable: only the first `limit` are ever built, so a request
        with millions of bad entries costs a count, not a million messages."""
        found = iter(violations)
        shown = list(itertools.islice(found, limit))
        if not shown:
            return
        message = "; ".join(f"{v.field}: {v.description}" for v in shown)
        more = sum(1 for _ in found)
        if more:
            message += f" (and {more} more)"
        raise cls(message, shown)


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class NotFound(ServiceError):
    """A named model, adapter, job or sweep does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """The request is valid but the system is not in a state to run it (e.g. cancelling a finished job)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    """Overloaded: the client should retry after `retry_after` seconds (sent as google.rpc.RetryInfo)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ServiceError):
    """Not ready (model loading), shutting down, or a dependency (engine, Redis, another service) is down.
    With `retry_after` (seconds) the client is told when to retry (google.rpc.RetryInfo), e.g. while an engine
    restarts."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED

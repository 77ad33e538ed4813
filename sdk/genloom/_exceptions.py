"""The SDK's exceptions: one root, one class per gRPC status, the status -> class mapping in one function."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = [
    "APIStatusError",
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "GenLoomError",
    "InternalServerError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
]


class GenLoomError(Exception):
    """Root of every exception the SDK raises."""


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, as reported by the server (google.rpc.BadRequest)."""

    field: str
    """Path of the field, e.g. ``inputs[2].conversation.messages[0].role``."""
    description: str
    """What is wrong with it."""


class APIStatusError(GenLoomError):
    """The server answered with a non-OK gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        request_id: str | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.request_id = request_id
        """The server's id for the failed request (x-request-id), for matching server logs."""
        self.field_violations = list(field_violations)
        """For INVALID_ARGUMENT: each offending field."""
        self.retry_after = retry_after
        """For RESOURCE_EXHAUSTED: seconds the server asked the client to wait before retrying."""

    def __str__(self) -> str:
        suffix = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.code.name}: {self.message}{suffix}"


class CancelledError(APIStatusError):
    code = grpc.StatusCode.CANCELLED


class UnknownError(APIStatusError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(APIStatusError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(APIStatusError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(APIStatusError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(APIStatusError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(APIStatusError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(APIStatusError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(APIStatusError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(APIStatusError):
    code = grpc.StatusCode.ABORTED


class OutOfRangeError(APIStatusError):
    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(APIStatusError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalServerError(APIStatusError):
    code = grpc.StatusCode.INTERNAL


class UnavailableError(APIStatusError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(APIStatusError):
    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(APIStatusError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[APIStatusError]] = {
    cls.code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalServerError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def error_from_status(
    code: grpc.StatusCode,
    message: str,
    *,
    request_id: str | None = None,
    field_violations: Sequence[FieldViolation] = (),
    retry_after: float | None = None,
) -> APIStatusError:
    """The one place that maps a gRPC status code to its exception class."""
    cls = _BY_CODE.get(code, UnknownError)
    return cls(message, code=code, request_id=request_id, field_violations=field_violations, retry_after=retry_after)


def error_from_rpc(err: grpc.RpcError) -> APIStatusError:
    """Convert a grpc RpcError (sync or aio) into the SDK's exception, with the server's structured details."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (err.details() if callable(getattr(err, "details", None)) else None) or str(code.name)
    metadata: list[tuple[str, Any]] = []
    for getter in ("initial_metadata", "trailing_metadata"):
        fn = getattr(err, getter, None)
        with contextlib.suppress(Exception):  # no metadata when the call never reached a server
            metadata += list(fn() or ()) if callable(fn) else []
    request_id = next((str(v) for k, v in metadata if k == "x-request-id"), None)
    violations, retry_after = _parse_details(metadata)
    return error_from_status(code, message, request_id=request_id, field_violations=violations, retry_after=retry_after)


def _parse_details(metadata: list[tuple[str, Any]]) -> tuple[list[FieldViolation], float | None]:
    blob = next((v for k, v in metadata if k == "grpc-status-details-bin"), None)
    if not isinstance(blob, bytes):
        return [], None
    try:  # googleapis-common-protos ships with the server extra; without it the details are skipped
        from google.rpc import error_details_pb2, status_pb2
    except ImportError:
        return [], None
    status = status_pb2.Status.FromString(blob)
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after = info.retry_delay.ToTimedelta().total_seconds()
    return violations, retry_after

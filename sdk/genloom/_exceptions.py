"""The SDK's exceptions: one root, one class per gRPC status, the status -> class mapping in one function, and
the fine-tuning outcomes raised on request (a failed job or sweep, a wait that ran out of time) together with the
records that say why a job failed (`JobError`, `LineError`; `genloom.types.finetune` re-exports them)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import grpc
from google.protobuf.message import DecodeError, Message

from genloom.v1 import finetune_pb2

if TYPE_CHECKING:  # annotations only: the records raise these, so they import this module at run time
    from genloom.types._finetune_records import FineTuneJob, Sweep

__all__ = [
    "APIStatusError",
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "FineTuneJobFailed",
    "GenLoomError",
    "InternalServerError",
    "InvalidArgumentError",
    "JobError",
    "JobErrorCodeName",
    "LineError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SweepFailed",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "WaitTimeoutError",
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
        attempts: int = 1,
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
        """For RESOURCE_EXHAUSTED: seconds the server asked the client to wait before retrying (RetryInfo); set
        only on the server's overload answer, which is what the SDK retries."""
        self.attempts = attempts
        """How many times the SDK sent the call (1 + its retries) before raising this."""

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


# --- fine-tuning outcomes ------------------------------------------------------------------------------------------

JobErrorCodeName = Literal[
    "invalid_data",
    "model_unavailable",
    "worker_lost",
    "out_of_memory",
    "unsupported",
    "internal",
    "all_trials_failed",
]
# JobErrorCode values by number, named like every fine-tuning enum of the SDK (genloom.types.finetune): the
# value's name without its prefix, lowercased.
_JOB_ERROR_CODES: dict[int, Any] = {
    v.number: v.name.removeprefix("JOB_ERROR_CODE_").lower()
    for v in finetune_pb2.JobErrorCode.DESCRIPTOR.values
    if v.number != 0
}


@dataclass(frozen=True)
class LineError:
    """A problem on one line of a data file."""

    file: str
    """"training" or "validation"."""
    line: int
    """1-based line number."""
    message: str
    """What is wrong, e.g. "missing key 'completion'"."""

    def __str__(self) -> str:
        return f"{self.file} line {self.line}: {self.message}"


@dataclass(frozen=True)
class JobError:
    """Why a job or sweep failed."""

    code: JobErrorCodeName | Literal["unspecified"]
    """Machine-readable reason: "invalid_data", "model_unavailable", "worker_lost", "out_of_memory",
    "unsupported", "internal" or (sweeps) "all_trials_failed"."""
    message: str
    """Human-readable explanation."""
    line_errors: list[LineError] = field(default_factory=list)
    """For "invalid_data": the offending lines, in file and line order (at most 50)."""

    @classmethod
    def from_pb(cls, pb: finetune_pb2.JobError) -> JobError:
        return cls(
            _JOB_ERROR_CODES.get(pb.code, "unspecified"),
            pb.message,
            [LineError(e.file, e.line, e.message) for e in pb.line_errors],
        )


class FineTuneJobFailed(GenLoomError):
    """`FineTuneJob.raise_for_status()` on a failed job: `job` is the record, `error` why it failed."""

    def __init__(self, job: FineTuneJob) -> None:
        self.job = job
        self.error = job.error or JobError("unspecified", "")
        lines = [f"fine-tuning job {job.id} failed ({self.error.code}): {self.error.message}"]
        lines += [f"  {e}" for e in self.error.line_errors[:10]]
        if len(self.error.line_errors) > 10:
            lines.append(f"  ... and {len(self.error.line_errors) - 10} more")
        super().__init__("\n".join(lines))

    @property
    def line_errors(self) -> list[LineError]:
        """For invalid data: the offending lines."""
        return self.error.line_errors


class SweepFailed(GenLoomError):
    """`Sweep.raise_for_status()` on a failed sweep: `sweep` is the record, `error` why it failed."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.error = sweep.error or JobError("unspecified", "")
        super().__init__(f"sweep {sweep.id} failed ({self.error.code}): {self.error.message}")


class WaitTimeoutError(GenLoomError, TimeoutError):
    """`wait()` or `watch()` ran out of time; the job or sweep carries on (cancel it to stop it)."""


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
    attempts: int = 1,
) -> APIStatusError:
    """The one place that maps a gRPC status code to its exception class."""
    cls = _BY_CODE.get(code, UnknownError)
    return cls(
        message,
        code=code,
        request_id=request_id,
        field_violations=field_violations,
        retry_after=retry_after,
        attempts=attempts,
    )


def error_from_rpc(err: grpc.RpcError, *, attempts: int = 1) -> APIStatusError:
    """Convert a grpc RpcError (sync or aio) into the SDK's exception, with the server's structured details.
    `attempts`: how many times the call was sent."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (err.details() if callable(getattr(err, "details", None)) else None) or str(code.name)
    metadata: list[tuple[str, Any]] = []
    for getter in ("initial_metadata", "trailing_metadata"):
        fn = getattr(err, getter, None)
        with contextlib.suppress(Exception):  # no metadata when the call never reached a server
            metadata += list(fn() or ()) if callable(fn) else []
    request_id = next((str(v) for k, v in metadata if k == "x-request-id"), None)
    violations, retry_after = _parse_details(metadata)
    return error_from_status(
        code, message, request_id=request_id, field_violations=violations, retry_after=retry_after, attempts=attempts
    )


def _parse_details(metadata: list[tuple[str, Any]]) -> tuple[list[FieldViolation], float | None]:
    blob = next((v for k, v in metadata if k == "grpc-status-details-bin"), None)
    if not isinstance(blob, bytes):
        return [], None
    status_cls, bad_request_cls, retry_info_cls = _rpc_message_classes()
    try:
        status = status_cls.FromString(blob)
        violations: list[FieldViolation] = []
        retry_after: float | None = None
        for detail in status.details:
            kind = detail.type_url.rpartition("/")[2]
            if kind == "google.rpc.BadRequest":
                bad = bad_request_cls.FromString(detail.value)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif kind == "google.rpc.RetryInfo":
                delay = retry_info_cls.FromString(detail.value).retry_delay
                retry_after = delay.seconds + delay.nanos / 1e9
    except DecodeError:  # not a google.rpc.Status: keep the code and message, which is what matters
        return [], None
    return violations, retry_after


@functools.cache
def _rpc_message_classes() -> tuple[Any, Any, Any]:
    """google.rpc Status, BadRequest and RetryInfo: from googleapis-common-protos where installed (the server
    extra), else built from the subset of their definitions declared below, so that an SDK-only install (grpcio
    and protobuf) still sees field violations and, above all, RetryInfo: without it the SDK could not tell the
    server's overload answer from a RESOURCE_EXHAUSTED that retrying cannot fix."""
    try:
        from google.rpc import error_details_pb2, status_pb2
    except ImportError:
        return _declared_rpc_message_classes()
    return status_pb2.Status, error_details_pb2.BadRequest, error_details_pb2.RetryInfo


def _declared_rpc_message_classes() -> tuple[type[Message], type[Message], type[Message]]:
    # Field numbers and types as in google/rpc/status.proto and error_details.proto (wire-compatible subsets),
    # in a pool of their own so that they never clash with googleapis-common-protos if it is imported later.
    from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED
    pool = descriptor_pool.DescriptorPool()
    for dependency in (any_pb2, duration_pb2):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(dependency.DESCRIPTOR.serialized_pb))
    file = descriptor_pb2.FileDescriptorProto(
        name="genloom/sdk/google_rpc_subset.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto", "google/protobuf/duration.proto"],
    )
    status = file.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=field.TYPE_INT32, label=optional)
    status.field.add(name="message", number=2, type=field.TYPE_STRING, label=optional)
    status.field.add(
        name="details", number=3, type=field.TYPE_MESSAGE, label=repeated, type_name=".google.protobuf.Any"
    )
    retry_info = file.message_type.add(name="RetryInfo")
    retry_info.field.add(
        name="retry_delay", number=1, type=field.TYPE_MESSAGE, label=optional, type_name=".google.protobuf.Duration"
    )
    bad_request = file.message_type.add(name="BadRequest")
    violation = bad_request.nested_type.add(name="FieldViolation")
    violation.field.add(name="field", number=1, type=field.TYPE_STRING, label=optional)
    violation.field.add(name="description", number=2, type=field.TYPE_STRING, label=optional)
    bad_request.field.add(
        name="field_violations",
        number=1,
        type=field.TYPE_MESSAGE,
        label=repeated,
        type_name=".google.rpc.BadRequest.FieldViolation",
    )
    pool.Add(file)
    return tuple(  # type: ignore[return-value]
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"google.rpc.{name}"))
        for name in ("Status", "BadRequest", "RetryInfo")
    )

"""Calling any genloom RPC with a generated request and checking the properties every answer must have.

Properties (each failure raises its own exception type from its own line, so Hypothesis reports and shrinks each
kind separately):
- the status is never INTERNAL or UNKNOWN (an unhandled exception), and never RESOURCE_EXHAUSTED without RetryInfo
  (e.g. gRPC's "metadata size exceeds limit" when an error echoes a huge input);
- INVALID_ARGUMENT carries google.rpc.BadRequest field violations;
- the status message plus its details stay under STATUS_LIMIT bytes, and quote no more than ECHO_LIMIT characters
  of any client value verbatim;
- no message (status, BadRequest descriptions, any error text in a response) names an internal path or address
  the client did not send itself, and no response field at all names the artifact store or Redis;
- a SERVING server stays SERVING, does not answer UNAVAILABLE to a healthy call, and finishes within a deadline;
- every LIVENESS_EVERY calls, a normal Generate still succeeds.
A server already down before a call (a previous example killed it) gets RECOVERY_S to come back; the example is
then rejected rather than blamed, so shrinking a "left NOT_SERVING" failure keeps the request that caused it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.control import currently_in_test_context

from genloom.v1 import (
    finetune_pb2,
    finetune_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

from .strategies import MessageStrategies, Vocabulary, mutated

TINY = "tiny-llama"
LORA = "fuzz-lora"
#: The one webhook destination the fuzz server allow-lists (a loopback address): test_webhooks' positive control.
WEBHOOK_CONTROL_HOST = "127.0.0.2"

# -- budget ---------------------------------------------------------------------------------------------------------

# Hypothesis keeps caches (constants, Unicode tables) in ./.hypothesis by default: keep them out of the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "genloom-hypothesis")

#: Examples per RPC in CI (times the RPC's weight): the suite's ~30 RPCs then fit in ~3 minutes on 2 cores.
DEFAULT_EXAMPLES = 30
_requested = os.environ.get("GENLOOM_FUZZ_EXAMPLES", "").strip()
_common: dict[str, Any] = dict(
    deadline=None,
    database=None,  # never write .hypothesis/ into the repository
    suppress_health_check=list(HealthCheck),  # big generated requests and slow real servers are the point
)
settings.register_profile("genloom-fuzz", max_examples=DEFAULT_EXAMPLES, derandomize=True, print_blob=False, **_common)
settings.register_profile(
    "genloom-fuzz-deep", max_examples=int(_requested or DEFAULT_EXAMPLES), derandomize=False, print_blob=True, **_common
)
PROFILE = "genloom-fuzz-deep" if _requested else "genloom-fuzz"


def fuzz_settings(weight: float = 1.0) -> settings:
    """The session's profile, with `weight` x its examples (expensive RPCs get fewer)."""
    profile = settings.get_profile(PROFILE)
    return settings(profile, max_examples=max(1, round(profile.max_examples * weight)))


#: Status message + trailing metadata above this many bytes fails the "bounded status" property.
STATUS_LIMIT = 8 * 1024
#: A message may quote a short prefix of a client's value (errors.quote: 64 characters); this many verbatim fails.
ECHO_LIMIT = 200
#: How long a NOT_SERVING server is given to come back (engine restart) before later examples are skipped.
RECOVERY_S = 60.0
#: A normal Generate every this many fuzz calls (besides the health check after every call).
LIVENESS_EVERY = 50
MAX_STREAM_MESSAGES = 2_000
#: RPCs whose stream legitimately stays open (following a job that never finishes: no worker runs here).
FOLLOWING_RPCS = frozenset({"FineTuningService.WatchJob"})

SERVICES: dict[str, tuple[ServiceDescriptor, type]] = {
    "TokenizerService": (
        tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"],
        tokenizer_pb2_grpc.TokenizerServiceStub,
    ),
    "InferenceService": (
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
        inference_pb2_grpc.InferenceServiceStub,
    ),
    "TaskService": (tasks_pb2.DESCRIPTOR.services_by_name["TaskService"], tasks_pb2_grpc.TaskServiceStub),
    "FineTuningService": (
        finetune_pb2.DESCRIPTOR.services_by_name["FineTuningService"],
        finetune_pb2_grpc.FineTuningServiceStub,
    ),
}


def methods(service: str) -> list[str]:
    """The RPCs of one service, from its descriptor: an RPC added to the .proto gets a fuzz test (which fails until
    the test module gives it a valid base request)."""
    return [m.name for m in SERVICES[service][0].methods]


# -- property failures ----------------------------------------------------------------------------------------------


class PropertyFailure(AssertionError):
    kind = "property"


class InternalStatus(PropertyFailure):
    kind = "INTERNAL/UNKNOWN status"


class MetadataOverflow(PropertyFailure):
    kind = "RESOURCE_EXHAUSTED without RetryInfo (metadata overflow?)"


class MissingBadRequest(PropertyFailure):
    kind = "INVALID_ARGUMENT without BadRequest"


class OversizedStatus(PropertyFailure):
    kind = "status over 8 KiB"


class EchoedInput(PropertyFailure):
    kind = "message echoes a long run of client input"


class LeakedInternal(PropertyFailure):
    kind = "internal path/address in a message"


class LeakedRecord(PropertyFailure):
    kind = "internal path/address in a response record"


class UnknownEnumAccepted(PropertyFailure):
    kind = "unknown enum value accepted"


class ReadOutsideRoot(PropertyFailure):
    kind = "path outside its root served"


class ExistenceOracle(PropertyFailure):
    kind = "path existence oracle"


class UnavailableWhileServing(PropertyFailure):
    kind = "UNAVAILABLE from a SERVING server"


class LeftNotServing(PropertyFailure):
    kind = "server left NOT_SERVING"


class TookTooLong(PropertyFailure):
    kind = "DEADLINE_EXCEEDED (wedged or unbounded work)"


class LivenessFailure(PropertyFailure):
    kind = "normal Generate failed after fuzzing"


# -- statistics -----------------------------------------------------------------------------------------------------


@dataclass
class Violation:
    rpc: str
    kind: str
    request: str
    size: int
    observed: str


@dataclass
class FuzzStats:
    """Counts over the whole session, printed at its end (conftest.pytest_terminal_summary)."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: (rpc, kind) -> the smallest request seen failing that way.
    violations: dict[tuple[str, str], Violation] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    server_started_s: float = 0.0
    #: ERROR (and worse) log records the servers wrote meanwhile, by logger and message: a handled bad request
    #: should log at most a warning; these point at crashes the status codes hid.
    errors: Counter[str] = field(default_factory=Counter)
    #: Whether a fuzz test is running: log records of other tests in the same pytest session are not ours.
    active: bool = False
    #: Seconds spent in fuzz tests (the rest of a whole-suite session is other tests').
    fuzz_seconds: float = 0.0

    def record(self, rpc: str, code: str) -> None:
        self.counts[(rpc, code)] += 1

    def violation(
        self, rpc: str, failure: PropertyFailure | type[PropertyFailure], request: Message, observed: str
    ) -> None:
        text = _describe(request)
        key = (rpc, failure.kind)
        known = self.violations.get(key)
        if known is None or len(text) < known.size:
            self.violations[key] = Violation(rpc, failure.kind, text, len(text), observed)

    def by_code(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for (_, code), n in self.counts.items():
            total[code] += n
        return total


STATS = FuzzStats()


class ErrorLogCounter(logging.Handler):
    """Counts the servers' ERROR records into STATS (installed on the root logger for the fuzz session)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        if not STATS.active:
            return
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is itself worth counting
            message = str(record.msg)
        exc = f" [{record.exc_info[0].__name__}]" if record.exc_info and record.exc_info[0] else ""
        STATS.errors[f"{record.name}: {message[:160]}{exc}"] += 1


def _describe(request: Message, limit: int = 600) -> str:
    """A request in text format, long strings and repeated runs cut so a report stays readable."""
    text = f"{type(request).__name__} {{{_text(request)}}}"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _text(msg: Message) -> str:
    parts = []
    for fd, value in msg.ListFields():
        if fd.is_repeated and fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            items = list(value.items())
            shown = ", ".join(f"{_scalar(k)}: {_scalar(v)}" for k, v in items[:3])
            parts.append(f"{fd.name} {{{shown}{' ...' if len(items) > 3 else ''}}} ({len(items)} entries)")
        elif fd.is_repeated:
            values = list(value)
            shown = ", ".join(_value(fd, v) for v in values[:3])
            more = f" ... ({len(values)} items)" if len(values) > 3 else ""
            parts.append(f"{fd.name}: [{shown}{more}]")
        else:
            parts.append(f"{fd.name}: {_value(fd, value)}")
    return " ".join(parts)


def _value(fd: FieldDescriptor, value: Any) -> str:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return f"{{{_text(value)}}}"
    if fd.type == FieldDescriptor.TYPE_ENUM:
        known = fd.enum_type.values_by_number.get(value)
        return known.name if known is not None else str(value)
    return _scalar(value)


def _scalar(value: Any) -> str:
    if isinstance(value, str | bytes) and len(value) > 80:
        return f"{value[:40]!r}...({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
    return repr(value)


# -- calling --------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    trailing: Sequence[tuple[str, Any]]
    responses: list[Message]
    elapsed: float

    def status_bytes(self) -> int:
        size = len((self.details or "").encode("utf-8", "surrogatepass"))
        for key, value in self.trailing or ():
            size += len(key) + len(value if isinstance(value, bytes) else str(value).encode())
        return size

    def rich_status(self) -> status_pb2.Status | None:
        for key, value in self.trailing or ():
            if key == "grpc-status-details-bin":
                return status_pb2.Status.FromString(value)
        return None

    def bad_request(self) -> list[error_details_pb2.BadRequest.FieldViolation]:
        status = self.rich_status()
        out: list[error_details_pb2.BadRequest.FieldViolation] = []
        for detail in status.details if status else ():
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                out += bad.field_violations
        return out

    def has_retry_info(self) -> bool:
        status = self.rich_status()
        return status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)

    def messages(self) -> list[tuple[str, str]]:
        """Every client-visible text that is an error or message (not data the client asked for)."""
        out = [("status", self.details or "")]
        status = self.rich_status()
        if status is not None:
            out.append(("status.message", status.message))
            for detail in status.details:
                out.append((detail.type_url, detail.value.decode("utf-8", "replace")))
        out += [(f"BadRequest[{v.field}]", f"{v.field} {v.description}") for v in self.bad_request()]
        for response in self.responses:
            out += list(_error_texts(response))
        return out

    def summary(self, limit: int = 300) -> str:
        details = self.details or ""
        shown = details if len(details) <= limit else details[:limit] + f"... ({len(details)} chars)"
        fields = [v.field for v in self.bad_request()]
        return f"{self.code.name} {shown!r}" + (f" BadRequest{fields[:5]}" if fields else "")


# Response fields that carry error or event text (job events, eval prediction errors, line errors).
ERROR_FIELDS = frozenset({"message", "error", "file"})


def _error_texts(msg: Message, path: str = "") -> Iterable[tuple[str, str]]:
    for fd, value in msg.ListFields():
        name = f"{path}.{fd.name}" if path else fd.name
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                continue
            for item in value if fd.is_repeated else [value]:
                yield from _error_texts(item, name)
        elif fd.type == FieldDescriptor.TYPE_STRING and fd.name in ERROR_FIELDS:
            for item in value if fd.is_repeated else [value]:
                yield name, item


def request_strings(msg: Message) -> list[str]:
    """Every string and bytes value in a message (a leak check ignores what the client sent itself)."""
    out: list[str] = []
    for fd, value in msg.ListFields():
        items = value if fd.is_repeated else [value]
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                for k, v in value.items():
                    out += [str(k), str(v)]
                continue
            for item in items:
                out += request_strings(item)
        elif fd.type == FieldDescriptor.TYPE_STRING:
            out += list(items)
        elif fd.type == FieldDescriptor.TYPE_BYTES:
            out += [b.decode("utf-8", "replace") for b in items]
    return out


class FuzzSession:
    """Everything a fuzz test module needs: the target, strategies, and the session's files and ids."""

    def __init__(self, root: Path, tiny_dir: Path) -> None:
        self.root = root
        self.tiny_dir = tiny_dir
        self.models_root = tiny_dir.parent
        self.adapters_root = root / "adapters"
        self.task_data = root / "task-data"
        self.train_data = root / "train-data"
        self.artifacts = root / "artifacts"
        self.outside = root / "outside"
        self.job_ids: list[str] = []
        self.sweep_ids: list[str] = []
        self.event_ids: list[str] = []
        self.page_tokens: list[str] = []
        self.target: FuzzTarget
        self.strategies: MessageStrategies
        self.vocabulary: Vocabulary

    @property
    def fine_tuned_name(self) -> str:
        return f"ft:{TINY}:fuzz:{self.job_ids[0]}" if self.job_ids else f"ft:{TINY}:fuzz:job-x"


class Shown:
    """A generated request whose repr (what Hypothesis prints for a falsifying example) is short and readable."""

    def __init__(self, message: Message) -> None:
        self.message = message

    def __repr__(self) -> str:
        return _describe(self.message, limit=3000)


def fuzz_rpc(session: FuzzSession, rpc: str, bases: Sequence[Message], weight: float = 1.0) -> None:
    """Run the property checks on `rpc` with requests mutated from `bases` (valid requests) and generic garbage."""
    strategy = mutated(session.strategies, bases).map(Shown)

    @fuzz_settings(weight)
    @given(request=strategy)
    def run(request: Shown) -> None:
        session.target.check(rpc, request.message)

    run()


def assert_still_serving(session: FuzzSession) -> None:
    problem = session.target.liveness()
    assert problem is None, f"after this module's fuzzing: {problem}"


class FuzzTarget:
    """A fuzz session's servers, reached over one real channel, with the internal strings that must not leak."""

    def __init__(
        self,
        target: str,
        secrets: Iterable[str],
        liveness: Message,
        deadline_s: float = 60.0,
        record_secrets: Iterable[str] = (),
        stats: FuzzStats | None = None,
    ) -> None:
        """`secrets` must appear in no message (status, error details, error/event text in responses);
        `record_secrets` (e.g. the artifact store, which is never shown to clients) in no response field at all."""
        self.target = target
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        )
        self.stubs = {name: stub(self.channel) for name, (_, stub) in SERVICES.items()}
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.record_secrets = sorted({s for s in record_secrets if s}, key=len, reverse=True)
        self.liveness_request = liveness
        self.stats = stats or STATS
        self.deadline_s = deadline_s
        self.calls = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self.channel.close()

    # -- health -----------------------------------------------------------------------------------------------------

    def serving(self) -> bool:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_serving(self, timeout: float = RECOVERY_S) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serving():
                return True
            time.sleep(0.25)
        return self.serving()

    def liveness(self) -> str | None:
        """None when the server is SERVING and a normal Generate succeeds; else what went wrong."""
        if not self.wait_serving():
            return f"health is not SERVING after {RECOVERY_S:.0f}s"
        try:
            reply = self.stubs["InferenceService"].Generate(self.liveness_request, timeout=60)
        except grpc.RpcError as err:
            return f"Generate failed: {err.code().name} {err.details()!r}"
        if not reply.token_ids:
            return "Generate returned no tokens"
        return None

    # -- one fuzz call ----------------------------------------------------------------------------------------------

    def invoke(self, rpc: str, request: Message, timeout: float | None = None) -> Outcome:
        service, method = rpc.split(".")
        descriptor = SERVICES[service][0].methods_by_name[method]
        call = getattr(self.stubs[service], method)
        timeout = timeout or (2.0 if rpc in FOLLOWING_RPCS else self.deadline_s)
        started = time.monotonic()
        responses: list[Message] = []
        try:
            if descriptor.server_streaming:
                stream = call(request, timeout=timeout)
                try:
                    for response in stream:
                        responses.append(response)
                        if len(responses) >= MAX_STREAM_MESSAGES:
                            stream.cancel()
                            break
                finally:
                    code, details, trailing = stream.code(), stream.details(), stream.trailing_metadata()
                if code == grpc.StatusCode.CANCELLED and len(responses) >= MAX_STREAM_MESSAGES:
                    code = grpc.StatusCode.OK  # we stopped reading, the server did nothing wrong
            else:
                response, call_info = call.with_call(request, timeout=timeout)
                responses.append(response)
                code, details, trailing = call_info.code(), call_info.details(), call_info.trailing_metadata()
        except grpc.RpcError as err:
            code, details, trailing = err.code(), err.details(), err.trailing_metadata()
        return Outcome(code, details or "", tuple(trailing or ()), responses, time.monotonic() - started)

    def check(self, rpc: str, request: Message) -> Outcome:
        """Send `request` to `rpc` and assert every property. Examples that find the server already down are
        rejected (assume), so Hypothesis neither blames nor shrinks towards them."""
        if not self.serving():
            # A previous example took the server down: give a self-healing engine time to come back.
            up = self.wait_serving()
            if currently_in_test_context():
                assume(up)
            assert up, f"{rpc}: the server was not SERVING before the call"
        outcome = self.invoke(rpc, request)
        with self._lock:
            self.calls += 1
            calls = self.calls
        self.stats.record(rpc, outcome.code.name)
        if currently_in_test_context():
            note(f"{rpc} -> {outcome.summary()} in {outcome.elapsed:.2f}s")
        try:
            self._check(rpc, request, outcome, calls)
        except PropertyFailure as failure:
            self.stats.violation(rpc, failure, request, outcome.summary())
            raise
        return outcome

    def _check(self, rpc: str, request: Message, outcome: Outcome, calls: int) -> None:
        code = outcome.code
        serving_after = self.serving()
        if not serving_after:
            recovered = self.wait_serving()
            raise LeftNotServing(
                f"{rpc}: the server went NOT_SERVING after this request ({outcome.summary()}); "
                f"{'it came back' if recovered else f'still down after {RECOVERY_S:.0f}s'}"
            )
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            raise InternalStatus(f"{rpc}: {outcome.summary()}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not outcome.has_retry_info():
            raise MetadataOverflow(f"{rpc}: {outcome.summary()}")
        if code == grpc.StatusCode.UNAVAILABLE:
            raise UnavailableWhileServing(f"{rpc}: {outcome.summary()} (health SERVING before and after)")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and rpc not in FOLLOWING_RPCS:
            raise TookTooLong(f"{rpc}: no answer within {self.deadline_s:.0f}s")
        if outcome.status_bytes() > STATUS_LIMIT:
            raise OversizedStatus(f"{rpc}: status is {outcome.status_bytes()} bytes: {outcome.summary()}")
        if code == grpc.StatusCode.INVALID_ARGUMENT and not outcome.bad_request():
            raise MissingBadRequest(f"{rpc}: {outcome.summary()}")
        sent = request_strings(request)
        long_runs = {text[:ECHO_LIMIT] for text in sent if len(text) > ECHO_LIMIT}
        for where, text in outcome.messages():
            for run in long_runs:
                if run in text:
                    raise EchoedInput(f"{rpc}: {where} quotes {ECHO_LIMIT}+ characters of the request: {text[:160]!r}")
            for secret in self.secrets:
                if secret in text and not any(secret in s for s in sent):
                    at = text.find(secret)
                    raise LeakedInternal(
                        f"{rpc}: {where} names {secret!r}: ...{text[max(0, at - 80) : at + len(secret) + 40]!r}..."
                    )
        for response in outcome.responses:
            for text in request_strings(response):
                for secret in self.record_secrets:
                    if secret in text and not any(secret in s for s in sent):
                        raise LeakedRecord(f"{rpc}: a {type(response).__name__} names {secret!r}: {text[:200]!r}")
        if calls % LIVENESS_EVERY == 0:
            problem = self.liveness()
            if problem is not None:
                raise LivenessFailure(f"after {calls} fuzz calls (last: {rpc}): {problem}")


# -- exhaustive field sweeps ----------------------------------------------------------------------------------------


def with_field(base: Message, path: Sequence[FieldDescriptor], value: Any) -> Message:
    """A copy of `base` with the field at `path` set to `value` (a list for a repeated field); the first element
    of a repeated message on the way is used (created when empty)."""
    msg = type(base)()
    msg.CopyFrom(base)
    target = msg
    for fd in path[:-1]:
        if fd.is_repeated:
            items = getattr(target, fd.name)
            target = items[0] if len(items) else items.add()
        else:
            target = getattr(target, fd.name)
    last = path[-1]
    if last.is_repeated:
        container = getattr(target, last.name)
        del container[:]
        container.extend(value if isinstance(value, list) else [value])
    elif last.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(target, last.name).CopyFrom(value)
    else:
        setattr(target, last.name, value)
    return msg


def dotted(path: Sequence[FieldDescriptor]) -> str:
    return ".".join(fd.name for fd in path)


def check_all(session: FuzzSession, cases: Iterable[tuple[str, str, Message]]) -> list[str]:
    """Run every (rpc, label, request) through the property checks; the failures, one line each."""
    failures = []
    for rpc, label, request in cases:
        try:
            session.target.check(rpc, request)
        except PropertyFailure as failure:
            failures.append(f"{label}: [{failure.kind}] {failure}"[:600])
    return failures

"""Every field of every RPC's request, one at a time, set to the value most likely to break it: a ~20 K-character
string with NUL, bidi and combining characters; NaN, infinities and the smallest subnormal for floats; an enum number
no .proto defines; 5,000 items in a repeated field. The generated tests (test_*_fuzz.py) sample fields; this sweep
covers each one, every run.

Besides the properties of every call (harness.py): an unknown enum value is refused with INVALID_ARGUMENT."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import Message

from . import test_finetune_fuzz, test_inference_fuzz, test_tasks_fuzz, test_tokenizer_fuzz
from .harness import (
    SERVICES,
    STATS,
    FuzzSession,
    UnknownEnumAccepted,
    assert_still_serving,
    check_all,
    dotted,
    with_field,
)
from .strategies import field_paths

MODULES = {
    "TokenizerService": test_tokenizer_fuzz,
    "InferenceService": test_inference_fuzz,
    "TaskService": test_tasks_fuzz,
    "FineTuningService": test_finetune_fuzz,
}
HUGE = "\x00\u202e\u0301\U0001f600" + "A" * 20_000
FLOATS = {FD.TYPE_FLOAT: (math.nan, math.inf, 1e-45), FD.TYPE_DOUBLE: (math.nan, -math.inf, 5e-324)}
UNKNOWN_ENUM = 99
RPCS = [f"{service}.{m.name}" for service, (desc, _) in SERVICES.items() for m in desc.methods]


OVERSIZED = 5_000  # past every batch limit genloom has


def _is_map(fd: FD) -> bool:
    return fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def _oversized(base: Message, path: tuple[FD, ...]) -> list[object]:
    """OVERSIZED copies of the field's first element in `base` (a valid one), or of a plain value."""
    target: object = base
    for fd in path[:-1]:
        value = getattr(target, fd.name)
        target = (value[0] if len(value) else None) if fd.is_repeated else value
        if target is None:
            break
    existing = getattr(target, path[-1].name) if target is not None else []
    if len(existing):
        return [existing[0]] * OVERSIZED
    kind = path[-1].type
    if kind == FD.TYPE_MESSAGE:
        return [path[-1].message_type._concrete_class()] * OVERSIZED
    plain = {FD.TYPE_STRING: "x", FD.TYPE_BYTES: b"x", FD.TYPE_BOOL: True, FD.TYPE_ENUM: 1}
    return [plain.get(kind, 1)] * OVERSIZED


def base_request(session: FuzzSession, rpc: str) -> Message:
    service, method = rpc.split(".")
    return MODULES[service].bases(session)[method][0]


@pytest.mark.parametrize("rpc", RPCS)
def test_every_field_hostile(fuzz: FuzzSession, rpc: str) -> None:
    base = base_request(fuzz, rpc)
    cases: list[tuple[str, str, Message]] = []
    enum_cases: list[tuple[str, Message]] = []
    for path in field_paths(base.DESCRIPTOR):
        fd, label = path[-1], dotted(path)
        if fd.is_repeated and not _is_map(fd):
            cases.append((rpc, f"{label}=<{OVERSIZED} items>", with_field(base, path, _oversized(base, path))))
        if fd.type == FD.TYPE_STRING:
            cases.append((rpc, f"{label}=<20K chars>", with_field(base, path, HUGE)))
        elif fd.type in FLOATS:
            cases += [(rpc, f"{label}={v}", with_field(base, path, v)) for v in FLOATS[fd.type]]
        elif fd.type == FD.TYPE_ENUM:
            request = with_field(base, path, UNKNOWN_ENUM)
            cases.append((rpc, f"{label}={UNKNOWN_ENUM}", request))
            enum_cases.append((label, request))
    failures = check_all(fuzz, cases)
    for label, request in enum_cases:
        outcome = fuzz.target.invoke(rpc, request)
        if outcome.code != grpc.StatusCode.INVALID_ARGUMENT:
            STATS.violation(rpc, UnknownEnumAccepted, request, outcome.summary())
            failures.append(f"{label}={UNKNOWN_ENUM}: [unknown enum accepted] {outcome.summary()}")
    assert not failures, f"{rpc}: {len(failures)} failures:\n" + "\n".join(failures)


def test_still_serving_after_every_field(fuzz: FuzzSession) -> None:
    assert_still_serving(fuzz)

"""The fuzz properties can fail: each check in harness.FuzzTarget, fed a fabricated bad answer, raises its own
failure (and a clean answer passes). No server: a FuzzTarget whose calls and health are scripted."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from genloom.v1 import finetune_pb2, inference_pb2

from . import harness
from .harness import FuzzTarget, Outcome

SECRET = "/srv/genloom-secret-root"


def _details(*details: Message) -> tuple[tuple[str, bytes], ...]:
    status = status_pb2.Status(code=3, message="bad")
    for detail in details:
        status.details.add().Pack(detail)
    return (("grpc-status-details-bin", status.SerializeToString()),)


BAD_REQUEST = error_details_pb2.BadRequest(
    field_violations=[error_details_pb2.BadRequest.FieldViolation(field="x", description="bad")]
)


class ScriptedTarget(FuzzTarget):
    def __init__(self, outcome: Outcome, serving: bool = True) -> None:
        super().__init__(
            "127.0.0.1:1",
            [SECRET],
            inference_pb2.GenerateRequest(),
            record_secrets=["redis://"],
            stats=harness.FuzzStats(),  # keep the session's counts to real requests
        )
        self.outcome, self._serving = outcome, serving

    def serving(self) -> bool:
        return self._serving

    def wait_serving(self, timeout: float = 0) -> bool:
        return self._serving

    def invoke(self, rpc: str, request: Message, timeout: float | None = None) -> Outcome:
        return self.outcome


def _outcome(code: grpc.StatusCode, details: str = "", trailing: Any = (), responses: Any = ()) -> Outcome:
    return Outcome(code, details, tuple(trailing), list(responses), 0.01)


CODE = grpc.StatusCode
CASES = [
    (_outcome(CODE.INTERNAL, "boom"), harness.InternalStatus),
    (_outcome(CODE.UNKNOWN, "Unexpected error"), harness.InternalStatus),
    (_outcome(CODE.RESOURCE_EXHAUSTED, "received metadata size exceeds hard limit"), harness.MetadataOverflow),
    (_outcome(CODE.INVALID_ARGUMENT, "x: bad"), harness.MissingBadRequest),
    (_outcome(CODE.INVALID_ARGUMENT, "x" * 9000, _details(BAD_REQUEST)), harness.OversizedStatus),
    (_outcome(CODE.NOT_FOUND, f"no file {SECRET}/data.jsonl"), harness.LeakedInternal),
    (
        _outcome(
            CODE.INVALID_ARGUMENT,
            "x: bad",
            _details(
                error_details_pb2.BadRequest(
                    field_violations=[error_details_pb2.BadRequest.FieldViolation(field="x", description=SECRET)]
                )
            ),
        ),
        harness.LeakedInternal,
    ),
    (
        _outcome(CODE.OK, responses=[finetune_pb2.WatchJobResponse(event=finetune_pb2.JobEvent(message=SECRET))]),
        harness.LeakedInternal,
    ),
    (
        _outcome(CODE.OK, responses=[inference_pb2.GetModelInfoResponse(source="redis://10.0.0.1:6379/0")]),
        harness.LeakedRecord,
    ),
    (_outcome(CODE.UNAVAILABLE, "engine restarting"), harness.UnavailableWhileServing),
    (_outcome(CODE.NOT_FOUND, "no model " + "m" * 300, trailing=()), harness.EchoedInput),
    (_outcome(CODE.DEADLINE_EXCEEDED, "Deadline Exceeded"), harness.TookTooLong),
]


@pytest.mark.parametrize(("outcome", "failure"), CASES, ids=[c[1].__name__ + str(i) for i, c in enumerate(CASES)])
def test_each_property_can_fail(outcome: Outcome, failure: type[harness.PropertyFailure]) -> None:
    request = inference_pb2.GenerateRequest(request_id="m" * 300)
    with pytest.raises(failure):
        ScriptedTarget(outcome).check("InferenceService.Generate", request)


def test_a_server_that_stops_serving_fails() -> None:
    with pytest.raises(harness.LeftNotServing):
        target = ScriptedTarget(_outcome(CODE.OK), serving=False)
        target._check("X.Y", inference_pb2.GenerateRequest(), _outcome(CODE.OK), 1)


def test_clean_answers_and_echoed_input_pass() -> None:
    ScriptedTarget(_outcome(CODE.OK)).check("X.Y", inference_pb2.GenerateRequest())
    ScriptedTarget(_outcome(CODE.INVALID_ARGUMENT, "x: bad", _details(BAD_REQUEST))).check(
        "X.Y", inference_pb2.GenerateRequest()
    )
    # A path the client sent itself may be quoted back.
    echoed = _outcome(CODE.NOT_FOUND, f"model {SECRET!r} is not served here")
    ScriptedTarget(echoed).check("X.Y", inference_pb2.GenerateRequest(model={"model": SECRET}))
    retry = _outcome(CODE.RESOURCE_EXHAUSTED, "busy", _details(error_details_pb2.RetryInfo()))
    ScriptedTarget(retry).check("X.Y", inference_pb2.GenerateRequest())

"""Calls abandoned by their client: streams cancelled after a drawn number of messages or a drawn delay, unary calls
cut by a tiny deadline. Properties: the server stays SERVING and answers a normal Generate, writes no ERROR log
record (a cancelled call is no error: issue 12 saw "Task exception was never retrieved" and UNKNOWN here), and
its engine ends the abandoned work (no running or waiting requests left behind)."""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from genloom.v1 import inference_pb2

from . import test_finetune_fuzz, test_inference_fuzz, test_tasks_fuzz
from .harness import SERVICES, STATS, FuzzSession, assert_still_serving, fuzz_settings

LONG = inference_pb2.SamplingParams(max_new_tokens=64, ignore_eos=True)


def _copy(request: Message, **sampling: Message) -> Message:
    out = type(request)()
    out.CopyFrom(request)
    for name, value in sampling.items():
        getattr(out, name).CopyFrom(value)
    return out


def _calls(s: FuzzSession) -> list[tuple[str, Message]]:
    """Valid calls that take a while (64 forced tokens, map-reduce summaries, a followed job that never ends)."""
    inference, tasks, finetune = (m.bases(s) for m in (test_inference_fuzz, test_tasks_fuzz, test_finetune_fuzz))
    out = [
        (f"InferenceService.{method}", _copy(request, sampling=LONG))
        for method in ("Generate", "GenerateStream")
        for request in inference[method]
    ]
    out.append(("InferenceService.Score", inference["Score"][0]))
    out += [
        ("TaskService.SummarizeStream", _copy(tasks["SummarizeStream"][1], sampling=LONG)),
        ("TaskService.Summarize", _copy(tasks["Summarize"][1], sampling=LONG)),
        ("TaskService.Classify", tasks["Classify"][1]),
        ("TaskService.Evaluate", tasks["Evaluate"][0]),
    ]
    follow = _copy(finetune["WatchJob"][1])
    follow.follow = True  # a queued job (no worker runs): the stream never ends by itself
    out += [("FineTuningService.WatchJob", finetune["WatchJob"][0]), ("FineTuningService.WatchJob", follow)]
    return out


def _abandon(s: FuzzSession, rpc: str, request: Message, after_messages: int, delay: float) -> None:
    service, method = rpc.split(".")
    stub = getattr(s.target.stubs[service], method)
    if not SERVICES[service][0].methods_by_name[method].server_streaming:
        with contextlib.suppress(grpc.RpcError):  # the drawn delay is the unary call's whole deadline
            stub(request, timeout=max(delay, 0.001))
        return
    call = stub(request, timeout=30)
    timer = threading.Timer(delay, call.cancel)
    timer.start()
    try:
        for seen, _ in enumerate(call, 1):
            if seen >= after_messages:
                call.cancel()
                break
    except grpc.RpcError:
        pass  # cancelled by the timer: the point of the test
    finally:
        timer.cancel()


def _engine_idle(s: FuzzSession, timeout: float = 30.0) -> str | None:
    stub = s.target.stubs["InferenceService"]
    deadline = time.monotonic() + timeout
    while True:
        info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
        if info.running_requests == 0 and info.waiting_requests == 0:
            return None
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return f"{info.running_requests} running and {info.waiting_requests} waiting requests left after {timeout:.0f}s"


def test_abandoned_calls_leave_nothing_behind(fuzz: FuzzSession) -> None:
    calls = _calls(fuzz)
    before = STATS.errors.copy()

    @fuzz_settings(0.7)
    @given(
        which=st.integers(0, len(calls) - 1),
        after_messages=st.integers(1, 4),
        delay=st.sampled_from((0.0, 0.001, 0.01, 0.05, 0.2, 0.5)),
    )
    def run(which: int, after_messages: int, delay: float) -> None:
        rpc, request = calls[which]
        _abandon(fuzz, rpc, request, after_messages, delay)
        STATS.record(rpc, "CANCELLED (by the client)")

    run()
    time.sleep(0.5)  # let the servers finish unwinding what was cancelled
    leftover = _engine_idle(fuzz)
    assert leftover is None, leftover
    assert_still_serving(fuzz)
    logged = STATS.errors - before
    assert not logged, "ERROR records logged while clients abandoned calls:\n" + "\n".join(
        f"{n} x {line}" for line, n in logged.items()
    )

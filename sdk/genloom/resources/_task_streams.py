"""The streams the task resource returns: `SummarizeStream` / `AsyncSummarizeStream` for `summarize_stream()`
and `Evaluation` / `AsyncEvaluation` for `evaluate()`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any

import grpc

from genloom._exceptions import GenLoomError, error_from_rpc
from genloom.types._evaluation import EvalConfigurationResult, EvalEvent, EvalProgress, EvalSummary, eval_event_from_pb
from genloom.types._task_results import (
    SummarizeEvent,
    SummarizeFinish,
    SummarizeProgress,
    SummaryDelta,
    SummaryResult,
    summarize_event_from_pb,
)
from genloom.v1 import tasks_pb2


class _SummarizeStreamState:
    """What the sync and async summary streams share: the call, progress, the text so far and the finish."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.progress: SummarizeProgress | None = None
        """The latest map/reduce progress (only for documents that had to be chunked)."""
        self.finish: SummarizeFinish | None = None
        """The end of the summary, once the stream is exhausted."""
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """Summary text received so far."""
        return "".join(self._parts)

    @property
    def final(self) -> SummaryResult | None:
        """The whole summary as `summarize()` would return it, once the stream is exhausted; else None."""
        if self.finish is None:
            return None
        return SummaryResult(self.text, self.finish.finish_reason, self.finish.context, self.finish.usage)

    def _accept(self, message: tasks_pb2.SummarizeStreamResponse) -> SummarizeEvent | None:
        event = summarize_event_from_pb(message)
        if isinstance(event, SummaryDelta):
            self._parts.append(event.text)
        elif isinstance(event, SummarizeProgress):
            self.progress = event
        elif isinstance(event, SummarizeFinish):
            self.finish = event
        return event

    def close(self) -> None:
        """Cancel the call if it is still running (this stops the summary's generations on the server)."""
        self._call.cancel()


class SummarizeStream(_SummarizeStreamState):
    """Iterate over `SummarizeProgress` (chunked documents only), `SummaryDelta` and, last, `SummarizeFinish`;
    `text` holds the summary so far and `final` the whole result once done. `close()` (or leaving a `with`
    block, or abandoning the iteration) cancels the call."""

    def __iter__(self) -> Iterator[SummarizeEvent]:
        try:
            for message in self._call:
                event = self._accept(message)
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            self.close()

    def __enter__(self) -> SummarizeStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncSummarizeStream(_SummarizeStreamState):
    """`SummarizeStream` for asyncio: `async for event in stream`."""

    async def __aiter__(self) -> AsyncIterator[SummarizeEvent]:
        try:
            async for message in self._call:
                event = self._accept(message)
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            self.close()

    async def __aenter__(self) -> AsyncSummarizeStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _EvaluationState:
    """What the sync and async evaluation streams share: the call, the latest progress, results and summary."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.progress: EvalProgress | None = None
        """The latest progress."""
        self.results: list[EvalConfigurationResult] = []
        """The configurations finished so far, in order."""
        self.summary: EvalSummary | None = None
        """The summary, once the stream is exhausted."""

    def _accept(self, message: tasks_pb2.EvaluateResponse) -> EvalEvent | None:
        event = eval_event_from_pb(message)
        if isinstance(event, EvalProgress):
            self.progress = event
        elif isinstance(event, EvalConfigurationResult):
            self.results.append(event)
        elif isinstance(event, EvalSummary):
            self.summary = event
        return event

    def _require_summary(self) -> EvalSummary:
        if self.summary is None:
            raise GenLoomError("the Evaluate stream ended without a summary")
        return self.summary

    def close(self) -> None:
        """Cancel the evaluation if it is still running."""
        self._call.cancel()


class Evaluation(_EvaluationState):
    """An evaluation in progress. Iterate over `EvalProgress`, `EvalPrediction` (with return_predictions),
    `EvalConfigurationResult` per configuration and, last, `EvalSummary`; or call `wait()` for the summary.
    `close()` (or leaving a `with` block, or abandoning the iteration) cancels the evaluation."""

    def __iter__(self) -> Iterator[EvalEvent]:
        try:
            for message in self._call:
                event = self._accept(message)
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            self.close()

    def wait(self) -> EvalSummary:
        """Run the evaluation to its end (or consume the rest of it) and return the summary."""
        if self.summary is None:
            for _ in self:
                pass
        return self._require_summary()

    def __enter__(self) -> Evaluation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncEvaluation(_EvaluationState):
    """`Evaluation` for asyncio: `async for event in evaluation`, or `await evaluation.wait()`."""

    async def __aiter__(self) -> AsyncIterator[EvalEvent]:
        try:
            async for message in self._call:
                event = self._accept(message)
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            self.close()

    async def wait(self) -> EvalSummary:
        """See `Evaluation.wait`."""
        if self.summary is None:
            async for _ in self:
                pass
        return self._require_summary()

    async def __aenter__(self) -> AsyncEvaluation:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

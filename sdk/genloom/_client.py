"""`genloom.Client` and `genloom.AsyncClient`: one channel to a genloom server, a resource per service."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from genloom._transport import _DEFAULT, DEFAULT_MAX_RETRIES, AsyncTransport, ClientOptions, SyncTransport
from genloom.resources.finetune import AsyncFineTuning, FineTuning
from genloom.resources.inference import AsyncInference, Inference
from genloom.resources.tasks import AsyncTasks, Tasks
from genloom.resources.tokenizer import AsyncTokenizer, Tokenizer


class _ClientBase:
    """Resolves the options shared by both clients (see `Client` for their meaning)."""

    def __init__(
        self,
        *,
        target: str | None = None,
        api_key: str | None = None,
        timeout: float | None = _DEFAULT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._options = ClientOptions.resolve(
            target=target,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            tls=tls,
            root_certificates=root_certificates,
            metadata=metadata,
            channel_options=channel_options,
        )
        self._connect()

    def _connect(self) -> None:
        """Open the channel and create the service resources."""
        raise NotImplementedError

    @property
    def target(self) -> str:
        """The gRPC target this client talks to."""
        return self._options.target


class Client(_ClientBase):
    """Synchronous client for every genloom service.

    Args:
        target: gRPC target, e.g. "127.0.0.1:50051" or "ipv4:10.0.0.1:50051,10.0.0.2:50051" (round-robin).
            Default: $GENLOOM_TARGET, else 127.0.0.1:50051.
        api_key: sent as "authorization: Bearer <key>". Default: $GENLOOM_API_KEY.
        timeout: seconds each call may take in all, retries and their waits included: each attempt gets what is
            left as its gRPC deadline, and no retry starts that could not finish in time (the call then fails with
            its last error, or DeadlineExceededError if time ran out during an attempt). None: no deadline.
            Default: $GENLOOM_TIMEOUT, else 60. A method's `timeout=` argument replaces it for that call.
        max_retries: retries of a call that failed with UNAVAILABLE, or with RESOURCE_EXHAUSTED that is the
            server's overload answer (it carries RetryInfo; gRPC's own size-limit errors are not retried). Each
            waits the server's RetryInfo delay, if any, plus a random share of a window that doubles from 0.5 s to
            8 s, so that clients refused together do not retry together. Default 8 (the timeout usually ends a
            call first). The attempts and delays are logged at DEBUG by the "genloom._transport" logger.
        tls: use TLS with the system's root certificates.
        root_certificates: PEM roots to trust instead (implies TLS).
        metadata: extra metadata sent with every call.
        channel_options: extra grpc channel options.

    Use it as a context manager, or call `close()`, to release the channel.
    """

    tokenizer: Tokenizer
    """Tokenize, detokenize, count tokens, chat templates, context windows."""
    inference: Inference
    """Generate (whole or streamed), score candidates, models and adapters."""
    tasks: Tasks
    """Summarize (whole or streamed), answer, classify; evaluate prompting strategies and models on a dataset."""
    finetune: FineTuning
    """Fine-tuning jobs (create, list, watch, wait, cancel, checkpoints) and hyperparameter sweeps."""

    def _connect(self) -> None:
        self._transport = SyncTransport(self._options)
        self.tokenizer = Tokenizer(self._transport)
        self.inference = Inference(self._transport)
        self.tasks = Tasks(self._transport)
        self.finetune = FineTuning(self._transport)

    def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """Asynchronous client for every genloom service (grpc.aio). Same arguments as `Client`.

    Use it as an async context manager, or `await client.close()`.
    """

    tokenizer: AsyncTokenizer
    """Tokenize, detokenize, count tokens, chat templates, context windows."""
    inference: AsyncInference
    """Generate (whole or streamed), score candidates, models and adapters."""
    tasks: AsyncTasks
    """Summarize (whole or streamed), answer, classify; evaluate prompting strategies and models on a dataset."""
    finetune: AsyncFineTuning
    """Fine-tuning jobs (create, list, watch, wait, cancel, checkpoints) and hyperparameter sweeps."""

    def _connect(self) -> None:
        self._transport = AsyncTransport(self._options)
        self.tokenizer = AsyncTokenizer(self._transport)
        self.inference = AsyncInference(self._transport)
        self.tasks = AsyncTasks(self._transport)
        self.finetune = AsyncFineTuning(self._transport)

    async def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

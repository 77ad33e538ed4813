"""`client.inference`: generate (unary and streaming), score candidates, models and adapters."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal

import grpc

from genloom._exceptions import error_from_rpc
from genloom._transport import _DEFAULT, AsyncTransport, SyncTransport
from genloom.types.common import Conversation, conversation_to_pb
from genloom.types.inference import (
    AdapterInfo,
    Generation,
    GenerationDelta,
    GenerationFinish,
    ModelInfo,
    ModelSummary,
    Scores,
)
from genloom.v1 import common_pb2, inference_pb2, inference_pb2_grpc, tokenizer_pb2

PromptLike = str | Conversation | Sequence[int]
"""A text, a conversation (list of {"role", "content"} messages), or token ids."""
Truncation = Literal["left", "right"] | None
_SIDES = {
    None: common_pb2.TRUNCATION_SIDE_UNSPECIFIED,
    "left": common_pb2.TRUNCATION_SIDE_LEFT,
    "right": common_pb2.TRUNCATION_SIDE_RIGHT,
}


def _prompt(prompt: PromptLike) -> inference_pb2.Prompt:
    if isinstance(prompt, str):
        return inference_pb2.Prompt(text=prompt)
    items: list[Any] = list(prompt)
    if items and all(isinstance(i, int) for i in items):
        return inference_pb2.Prompt(token_ids=tokenizer_pb2.TokenIds(ids=items))
    return inference_pb2.Prompt(conversation=conversation_to_pb(items))


def _side(truncation: Truncation) -> Any:
    if truncation not in _SIDES:
        raise ValueError(f"truncation must be 'left', 'right' or None, not {truncation!r}")
    return _SIDES[truncation]


def _sampling_params(options: dict[str, Any]) -> inference_pb2.SamplingParams:
    """Pop the sampling keyword arguments of `generate()` out of `options` into SamplingParams (an absent or None
    argument stays unset, i.e. the server's default). Shared with the task resource, which takes the same ones."""
    sampling = inference_pb2.SamplingParams(
        max_new_tokens=options.pop("max_new_tokens", None) or 0,
        top_k=options.pop("top_k", None) or 0,
        top_p=options.pop("top_p", None) or 0.0,
        repetition_penalty=options.pop("repetition_penalty", None) or 0.0,
        stop=options.pop("stop", None) or (),
        stop_token_ids=options.pop("stop_token_ids", None) or (),
        min_new_tokens=options.pop("min_new_tokens", None) or 0,
        ignore_eos=bool(options.pop("ignore_eos", False)),
    )
    for name in ("temperature", "seed", "logprobs", "skip_special_tokens"):
        value = options.pop(name, None)
        if value is not None:
            setattr(sampling, name, value)
    return sampling


def _generate_options(arguments: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `generate()` or `stream()` from their locals(): without self, prompt and timeout."""
    return {k: v for k, v in arguments.items() if k not in ("self", "prompt", "timeout")}


def _generate_request(prompt: PromptLike, options: dict[str, Any]) -> inference_pb2.GenerateRequest:
    sampling = _sampling_params(options)
    request = inference_pb2.GenerateRequest(
        request_id=options.pop("request_id") or "",
        model=common_pb2.ModelRef(model=options.pop("model"), adapter=options.pop("adapter")),
        prompt=_prompt(prompt),
        sampling=sampling,
        truncation=_side(options.pop("truncation")),
    )
    add_special = options.pop("add_special_tokens")
    if add_special is not None:
        request.add_special_tokens = add_special
    assert not options, f"unexpected options {sorted(options)}"
    return request


def _score_request(
    items: Sequence[tuple[PromptLike, Sequence[str]]],
    model: str,
    adapter: str,
    truncation: Truncation,
    return_token_logprobs: bool,
) -> inference_pb2.ScoreRequest:
    return inference_pb2.ScoreRequest(
        model=common_pb2.ModelRef(model=model, adapter=adapter),
        items=[inference_pb2.ScoreItem(prompt=_prompt(p), candidates=list(c)) for p, c in items],
        truncation=_side(truncation),
        return_token_logprobs=return_token_logprobs,
    )


class _StreamState:
    """What the sync and async streams share: the call, the text so far and the finish."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.request_id = ""
        """The request's id (yours, or assigned by the server), once the first message arrived."""
        self.finish: GenerationFinish | None = None
        """The end of the generation, once the stream is exhausted."""
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """Text received so far."""
        return "".join(self._parts)

    def _accept(self, message: inference_pb2.GenerateStreamResponse) -> GenerationDelta | None:
        self.request_id = message.request_id
        if message.HasField("delta"):
            delta = GenerationDelta.from_pb(message.delta)
            self._parts.append(delta.text)
            return delta
        self.finish = GenerationFinish.from_pb(message.finish)
        return None

    def close(self) -> None:
        """Cancel the call if it is still running (this aborts the generation on the server)."""
        self._call.cancel()


class GenerationStream(_StreamState):
    """Iterate over `GenerationDelta`s; afterwards `finish` holds the end of the generation and `text` the
    whole text. `close()` (or leaving a `with` block, or abandoning the iteration) cancels the call, which
    aborts the generation on the server."""

    def __iter__(self) -> Iterator[GenerationDelta]:
        try:
            for message in self._call:
                delta = self._accept(message)
                if delta is not None:
                    yield delta
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            self.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncGenerationStream(_StreamState):
    """`GenerationStream` for asyncio: `async for delta in stream`."""

    async def __aiter__(self) -> AsyncIterator[GenerationDelta]:
        try:
            async for message in self._call:
                delta = self._accept(message)
                if delta is not None:
                    yield delta
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            self.close()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Inference:
    """The inference service, synchronously."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport
        self._stub = inference_pb2_grpc.InferenceServiceStub(transport.channel)

    def generate(
        self,
        prompt: PromptLike,
        *,
        model: str = "",
        adapter: str = "",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        truncation: Truncation = None,
        add_special_tokens: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = _DEFAULT,
    ) -> Generation:
        """Generate a completion and return it whole.

        Args:
            prompt: text, a conversation (rendered with the model's chat template) or token ids.
            model: model name ("" = the server's default). adapter: a loaded LoRA adapter's name.
            max_new_tokens: tokens to generate at most (server default 256).
            temperature: 0 for greedy decoding; default 1.0. top_k, top_p, repetition_penalty: as in transformers.
            stop: strings that end generation (removed from the text). stop_token_ids: ids that end it.
            seed: makes sampling reproducible. logprobs: None, 0 (the chosen token's) or N (also the top N).
            min_new_tokens: no stop condition before this many tokens. ignore_eos: keep going past EOS.
            skip_special_tokens: leave special tokens out of the text (default True).
            truncation: "left"/"right" to cut an over-long prompt instead of failing with InvalidArgumentError.
            request_id: your id for this request (for `abort()` and logs).
            timeout: seconds (default: the client's); the generation is aborted on the server when it expires.
        """
        request = _generate_request(prompt, _generate_options(locals()))
        return Generation.from_pb(self._t.unary(self._stub.Generate, request, timeout=timeout))

    def stream(
        self,
        prompt: PromptLike,
        *,
        model: str = "",
        adapter: str = "",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        truncation: Truncation = None,
        add_special_tokens: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = _DEFAULT,
    ) -> GenerationStream:
        """Like `generate()` (same keyword arguments), but yields `GenerationDelta`s as tokens are produced.
        Closing the stream cancels the call and aborts the generation on the server."""
        request = _generate_request(prompt, _generate_options(locals()))
        stream_request = inference_pb2.GenerateStreamRequest.FromString(request.SerializeToString())
        return GenerationStream(self._t.stream(self._stub.GenerateStream, stream_request, timeout=timeout))

    def score(
        self,
        items: Sequence[tuple[PromptLike, Sequence[str]]],
        *,
        model: str = "",
        adapter: str = "",
        truncation: Truncation = None,
        return_token_logprobs: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> Scores:
        """Log-likelihood of candidate continuations: `items` is a list of (prompt, [candidate, ...])."""
        request = _score_request(items, model, adapter, truncation, return_token_logprobs)
        return Scores.from_pb(self._t.unary(self._stub.Score, request, timeout=timeout))

    def abort(self, request_id: str, *, timeout: float | None = _DEFAULT) -> bool:
        """Abort an in-flight generation by its request id; True if one was running."""
        request = inference_pb2.AbortRequest(request_id=request_id)
        return bool(self._t.unary(self._stub.Abort, request, timeout=timeout).aborted)

    def models(self, *, timeout: float | None = _DEFAULT) -> list[ModelSummary]:
        """The models this server serves."""
        response = self._t.unary(self._stub.ListModels, inference_pb2.ListModelsRequest(), timeout=timeout)
        return [ModelSummary.from_pb(m) for m in response.models]

    def model_info(self, *, model: str = "", timeout: float | None = _DEFAULT) -> ModelInfo:
        """Engine, dtype, device, context window, adapters and load of a model."""
        request = inference_pb2.GetModelInfoRequest(model=model)
        return ModelInfo.from_pb(self._t.unary(self._stub.GetModelInfo, request, timeout=timeout))

    def load_adapter(
        self, name: str, path: str, *, replace: bool = False, timeout: float | None = _DEFAULT
    ) -> AdapterInfo:
        """Load a PEFT LoRA adapter directory (on the server) under `name`. The server only reads adapters inside
        its GENLOOM_ADAPTER_ROOTS (none by default: PermissionDeniedError); a relative `path` is taken relative to
        the first root. Fine-tuned models need no loading: name them ("ft:...") in a request."""
        request = inference_pb2.LoadAdapterRequest(name=name, path=path, replace=replace)
        return AdapterInfo.from_pb(self._t.unary(self._stub.LoadAdapter, request, timeout=timeout).adapter)

    def unload_adapter(self, name: str, *, timeout: float | None = _DEFAULT) -> AdapterInfo:
        """Unload an adapter."""
        request = inference_pb2.UnloadAdapterRequest(name=name)
        return AdapterInfo.from_pb(self._t.unary(self._stub.UnloadAdapter, request, timeout=timeout).adapter)

    def adapters(self, *, timeout: float | None = _DEFAULT) -> list[AdapterInfo]:
        """Loaded adapters."""
        response = self._t.unary(self._stub.ListAdapters, inference_pb2.ListAdaptersRequest(), timeout=timeout)
        return [AdapterInfo.from_pb(a) for a in response.adapters]


class AsyncInference:
    """The inference service, for asyncio. Same methods as `Inference`, awaitable; `stream()` returns an
    async iterator."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = inference_pb2_grpc.InferenceServiceStub(transport.channel)

    async def generate(
        self,
        prompt: PromptLike,
        *,
        model: str = "",
        adapter: str = "",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        truncation: Truncation = None,
        add_special_tokens: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = _DEFAULT,
    ) -> Generation:
        """See `Inference.generate` (same keyword arguments)."""
        request = _generate_request(prompt, _generate_options(locals()))
        return Generation.from_pb(await self._t.unary(self._stub.Generate, request, timeout=timeout))

    def stream(
        self,
        prompt: PromptLike,
        *,
        model: str = "",
        adapter: str = "",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        min_new_tokens: int | None = None,
        ignore_eos: bool = False,
        skip_special_tokens: bool | None = None,
        truncation: Truncation = None,
        add_special_tokens: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = _DEFAULT,
    ) -> AsyncGenerationStream:
        """See `Inference.stream`."""
        request = _generate_request(prompt, _generate_options(locals()))
        stream_request = inference_pb2.GenerateStreamRequest.FromString(request.SerializeToString())
        return AsyncGenerationStream(self._t.stream(self._stub.GenerateStream, stream_request, timeout=timeout))

    async def score(
        self,
        items: Sequence[tuple[PromptLike, Sequence[str]]],
        *,
        model: str = "",
        adapter: str = "",
        truncation: Truncation = None,
        return_token_logprobs: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> Scores:
        """See `Inference.score`."""
        request = _score_request(items, model, adapter, truncation, return_token_logprobs)
        return Scores.from_pb(await self._t.unary(self._stub.Score, request, timeout=timeout))

    async def abort(self, request_id: str, *, timeout: float | None = _DEFAULT) -> bool:
        """See `Inference.abort`."""
        request = inference_pb2.AbortRequest(request_id=request_id)
        return bool((await self._t.unary(self._stub.Abort, request, timeout=timeout)).aborted)

    async def models(self, *, timeout: float | None = _DEFAULT) -> list[ModelSummary]:
        """See `Inference.models`."""
        response = await self._t.unary(self._stub.ListModels, inference_pb2.ListModelsRequest(), timeout=timeout)
        return [ModelSummary.from_pb(m) for m in response.models]

    async def model_info(self, *, model: str = "", timeout: float | None = _DEFAULT) -> ModelInfo:
        """See `Inference.model_info`."""
        request = inference_pb2.GetModelInfoRequest(model=model)
        return ModelInfo.from_pb(await self._t.unary(self._stub.GetModelInfo, request, timeout=timeout))

    async def load_adapter(
        self, name: str, path: str, *, replace: bool = False, timeout: float | None = _DEFAULT
    ) -> AdapterInfo:
        """See `Inference.load_adapter`."""
        request = inference_pb2.LoadAdapterRequest(name=name, path=path, replace=replace)
        return AdapterInfo.from_pb((await self._t.unary(self._stub.LoadAdapter, request, timeout=timeout)).adapter)

    async def unload_adapter(self, name: str, *, timeout: float | None = _DEFAULT) -> AdapterInfo:
        """See `Inference.unload_adapter`."""
        request = inference_pb2.UnloadAdapterRequest(name=name)
        response = await self._t.unary(self._stub.UnloadAdapter, request, timeout=timeout)
        return AdapterInfo.from_pb(response.adapter)

    async def adapters(self, *, timeout: float | None = _DEFAULT) -> list[AdapterInfo]:
        """See `Inference.adapters`."""
        response = await self._t.unary(self._stub.ListAdapters, inference_pb2.ListAdaptersRequest(), timeout=timeout)
        return [AdapterInfo.from_pb(a) for a in response.adapters]

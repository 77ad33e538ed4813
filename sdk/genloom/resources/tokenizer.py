"""`client.tokenizer`: tokenize, detokenize, count tokens, chat templates, tokenizer info."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from genloom._transport import _DEFAULT, AsyncTransport, SyncTransport
from genloom.types.common import Conversation, conversation_to_pb
from genloom.types.tokenizer import (
    ChatTemplateResult,
    DetokenizeResult,
    TokenCount,
    Tokenization,
    TokenizerInfo,
    TokenizerSummary,
)
from genloom.v1 import tokenizer_pb2, tokenizer_pb2_grpc

Input = str | Conversation
"""A plain text, or a conversation (a list of chat messages) rendered with the model's chat template."""


def _inputs(inputs: Input | Sequence[Input]) -> list[tokenizer_pb2.TokenizerInput]:
    items: Sequence[Any] = [inputs] if isinstance(inputs, str) else inputs
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(tokenizer_pb2.TokenizerInput(text=item))
        else:
            out.append(tokenizer_pb2.TokenizerInput(conversation=conversation_to_pb(item)))
    return out


def _optional(**flags: bool | None) -> dict[str, bool]:
    return {k: v for k, v in flags.items() if v is not None}


class _TokenizerRequests:
    """Request building shared by the sync and async resources."""

    @staticmethod
    def tokenize(
        inputs: Any,
        model: str,
        add_special_tokens: bool | None,
        add_generation_prompt: bool | None,
        return_offsets: bool,
        return_tokens: bool,
    ) -> tokenizer_pb2.TokenizeRequest:
        return tokenizer_pb2.TokenizeRequest(
            model=model,
            inputs=_inputs(inputs),
            return_offsets=return_offsets,
            return_tokens=return_tokens,
            **_optional(add_special_tokens=add_special_tokens, add_generation_prompt=add_generation_prompt),
        )

    @staticmethod
    def count(
        inputs: Any,
        model: str,
        add_special_tokens: bool | None,
        add_generation_prompt: bool | None,
        reserve_tokens: int,
    ) -> tokenizer_pb2.CountTokensRequest:
        return tokenizer_pb2.CountTokensRequest(
            model=model,
            inputs=_inputs(inputs),
            reserve_tokens=reserve_tokens,
            **_optional(add_special_tokens=add_special_tokens, add_generation_prompt=add_generation_prompt),
        )

    @staticmethod
    def detokenize(
        sequences: Sequence[Sequence[int]], model: str, skip_special_tokens: bool
    ) -> tokenizer_pb2.DetokenizeRequest:
        if sequences and isinstance(sequences[0], int):
            sequences = [sequences]  # type: ignore[list-item]  # a single sequence
        return tokenizer_pb2.DetokenizeRequest(
            model=model,
            sequences=[tokenizer_pb2.TokenIds(ids=list(s)) for s in sequences],
            skip_special_tokens=skip_special_tokens,
        )

    @staticmethod
    def chat(
        messages: Conversation, model: str, add_generation_prompt: bool | None, return_ids: bool
    ) -> tokenizer_pb2.ApplyChatTemplateRequest:
        return tokenizer_pb2.ApplyChatTemplateRequest(
            model=model,
            conversation=conversation_to_pb(messages),
            return_ids=return_ids,
            **_optional(add_generation_prompt=add_generation_prompt),
        )


class Tokenizer:
    """The tokenizer service, synchronously."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport
        self._stub = tokenizer_pb2_grpc.TokenizerServiceStub(transport.channel)

    def tokenize(
        self,
        inputs: Input | Sequence[Input],
        *,
        model: str = "",
        add_special_tokens: bool | None = None,
        add_generation_prompt: bool | None = None,
        return_offsets: bool = False,
        return_tokens: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> Tokenization:
        """Tokenize one input or a batch.

        Args:
            inputs: a text, a conversation (list of {"role", "content"} messages), or a list of either.
            model: model name; "" for the server's default.
            add_special_tokens: add BOS/EOS to plain texts as the tokenizer does by default (server default: True).
            add_generation_prompt: end conversations with the assistant-turn prefix (server default: True).
            return_offsets: include each token's character span.
            return_tokens: include each token's string form.
            timeout: seconds for this call (default: the client's timeout; None: no deadline).
        """
        request = _TokenizerRequests.tokenize(
            inputs, model, add_special_tokens, add_generation_prompt, return_offsets, return_tokens
        )
        return Tokenization.from_pb(self._t.unary(self._stub.Tokenize, request, timeout=timeout))

    def count_tokens(
        self,
        inputs: Input | Sequence[Input],
        *,
        model: str = "",
        add_special_tokens: bool | None = None,
        add_generation_prompt: bool | None = None,
        reserve_tokens: int = 0,
        timeout: float | None = _DEFAULT,
    ) -> TokenCount:
        """Count tokens per input and say whether each fits the context window with `reserve_tokens` to spare."""
        request = _TokenizerRequests.count(inputs, model, add_special_tokens, add_generation_prompt, reserve_tokens)
        return TokenCount.from_pb(self._t.unary(self._stub.CountTokens, request, timeout=timeout))

    def detokenize(
        self,
        sequences: Sequence[int] | Sequence[Sequence[int]],
        *,
        model: str = "",
        skip_special_tokens: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> DetokenizeResult:
        """Decode one id sequence or a batch of them back into text."""
        request = _TokenizerRequests.detokenize(sequences, model, skip_special_tokens)  # type: ignore[arg-type]
        return DetokenizeResult.from_pb(self._t.unary(self._stub.Detokenize, request, timeout=timeout))

    def apply_chat_template(
        self,
        messages: Conversation,
        *,
        model: str = "",
        add_generation_prompt: bool | None = None,
        return_ids: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> ChatTemplateResult:
        """Render a conversation through the model's chat template."""
        request = _TokenizerRequests.chat(messages, model, add_generation_prompt, return_ids)
        return ChatTemplateResult.from_pb(self._t.unary(self._stub.ApplyChatTemplate, request, timeout=timeout))

    def info(self, *, model: str = "", timeout: float | None = _DEFAULT) -> TokenizerInfo:
        """Vocabulary size, special tokens, context window and chat template of a model's tokenizer."""
        request = tokenizer_pb2.GetTokenizerInfoRequest(model=model)
        return TokenizerInfo.from_pb(self._t.unary(self._stub.GetTokenizerInfo, request, timeout=timeout))

    def list(self, *, timeout: float | None = _DEFAULT) -> list[TokenizerSummary]:
        """The tokenizers the server has loaded, default first."""
        response = self._t.unary(self._stub.ListTokenizers, tokenizer_pb2.ListTokenizersRequest(), timeout=timeout)
        return [TokenizerSummary.from_pb(t) for t in response.tokenizers]


class AsyncTokenizer:
    """The tokenizer service, for asyncio. Same methods as `Tokenizer`, awaitable."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport
        self._stub = tokenizer_pb2_grpc.TokenizerServiceStub(transport.channel)

    async def tokenize(
        self,
        inputs: Input | Sequence[Input],
        *,
        model: str = "",
        add_special_tokens: bool | None = None,
        add_generation_prompt: bool | None = None,
        return_offsets: bool = False,
        return_tokens: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> Tokenization:
        """See `Tokenizer.tokenize`."""
        request = _TokenizerRequests.tokenize(
            inputs, model, add_special_tokens, add_generation_prompt, return_offsets, return_tokens
        )
        return Tokenization.from_pb(await self._t.unary(self._stub.Tokenize, request, timeout=timeout))

    async def count_tokens(
        self,
        inputs: Input | Sequence[Input],
        *,
        model: str = "",
        add_special_tokens: bool | None = None,
        add_generation_prompt: bool | None = None,
        reserve_tokens: int = 0,
        timeout: float | None = _DEFAULT,
    ) -> TokenCount:
        """See `Tokenizer.count_tokens`."""
        request = _TokenizerRequests.count(inputs, model, add_special_tokens, add_generation_prompt, reserve_tokens)
        return TokenCount.from_pb(await self._t.unary(self._stub.CountTokens, request, timeout=timeout))

    async def detokenize(
        self,
        sequences: Sequence[int] | Sequence[Sequence[int]],
        *,
        model: str = "",
        skip_special_tokens: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> DetokenizeResult:
        """See `Tokenizer.detokenize`."""
        request = _TokenizerRequests.detokenize(sequences, model, skip_special_tokens)  # type: ignore[arg-type]
        return DetokenizeResult.from_pb(await self._t.unary(self._stub.Detokenize, request, timeout=timeout))

    async def apply_chat_template(
        self,
        messages: Conversation,
        *,
        model: str = "",
        add_generation_prompt: bool | None = None,
        return_ids: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> ChatTemplateResult:
        """See `Tokenizer.apply_chat_template`."""
        request = _TokenizerRequests.chat(messages, model, add_generation_prompt, return_ids)
        return ChatTemplateResult.from_pb(await self._t.unary(self._stub.ApplyChatTemplate, request, timeout=timeout))

    async def info(self, *, model: str = "", timeout: float | None = _DEFAULT) -> TokenizerInfo:
        """See `Tokenizer.info`."""
        request = tokenizer_pb2.GetTokenizerInfoRequest(model=model)
        return TokenizerInfo.from_pb(await self._t.unary(self._stub.GetTokenizerInfo, request, timeout=timeout))

    async def list(self, *, timeout: float | None = _DEFAULT) -> list[TokenizerSummary]:
        """See `Tokenizer.list`."""
        response = await self._t.unary(
            self._stub.ListTokenizers, tokenizer_pb2.ListTokenizersRequest(), timeout=timeout
        )
        return [TokenizerSummary.from_pb(t) for t in response.tokenizers]

"""TokenizerService: translates protobuf <-> the tokenizer store. Validation errors name the offending field."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc

from genloom.services.models.registry import ModelRegistry
from genloom.services.server.conversation import conversation_messages
from genloom.services.server.errors import FieldViolation, InvalidArgument, Unavailable
from genloom.services.server.settings import ModelSettings
from genloom.services.tokenizer.settings import TokenizerSettings
from genloom.services.tokenizer.store import LoadedTokenizer, TokenizerStore
from genloom.v1 import tokenizer_pb2, tokenizer_pb2_grpc

logger = logging.getLogger(__name__)


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    name = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name

    def __init__(self, store: TokenizerStore, settings: TokenizerSettings | None = None) -> None:
        self.store = store
        self.settings = settings or TokenizerSettings()
        self._ready = False

    @classmethod
    def from_settings(cls, models: ModelSettings, settings: TokenizerSettings) -> TokenizerServicer:
        return cls(TokenizerStore(ModelRegistry(models), models.max_model_len), settings)

    # -- Service protocol (server.app) --------------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(self, server)

    async def start(self) -> None:
        await self.store.preload()
        self._ready = True

    async def close(self) -> None:
        self._ready = False
        await self.store.close()

    # -- RPCs -----------------------------------------------------------------------------------------------------

    async def Tokenize(
        self, request: tokenizer_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.TokenizeResponse:
        tok = await self._tokenizer(request.model)
        add_special = _flag(request, "add_special_tokens", True)
        add_generation_prompt = _flag(request, "add_generation_prompt", True)
        encodings = await asyncio.to_thread(
            self._encode_inputs, tok, request.inputs, add_special, add_generation_prompt
        )
        results = []
        for enc in encodings:
            result = tokenizer_pb2.TokenizeResult(ids=enc.ids, count=len(enc.ids))
            if request.return_offsets:
                result.offsets.extend(tokenizer_pb2.TokenOffset(start=s, end=e) for s, e in enc.offsets)
            if request.return_tokens:
                result.tokens.extend(enc.tokens)
            results.append(result)
        return tokenizer_pb2.TokenizeResponse(model=tok.name, results=results)

    async def CountTokens(
        self, request: tokenizer_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.CountTokensResponse:
        tok = await self._tokenizer(request.model)
        encodings = await asyncio.to_thread(
            self._encode_inputs,
            tok,
            request.inputs,
            _flag(request, "add_special_tokens", True),
            _flag(request, "add_generation_prompt", True),
        )
        counts = [len(enc.ids) for enc in encodings]
        limit = tok.context_window
        return tokenizer_pb2.CountTokensResponse(
            model=tok.name,
            counts=counts,
            total=sum(counts),
            context_window=limit,
            fits_context=[c + request.reserve_tokens <= limit for c in counts],
        )

    async def Detokenize(
        self, request: tokenizer_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.DetokenizeResponse:
        tok = await self._tokenizer(request.model)
        self._check_batch("sequences", len(request.sequences))
        sequences = [list(seq.ids) for seq in request.sequences]
        # A sequence may hold millions of ids: lazy, so raise_for builds only the violations it shows and counts
        # the rest (max() finds the sequences worth a look without a Python loop over every id).
        InvalidArgument.raise_for(
            FieldViolation(
                f"sequences[{i}].ids[{j}]", f"token id {t} is outside the vocabulary (size {tok.vocab_size})"
            )
            for i, seq in enumerate(sequences)
            if seq and max(seq) >= tok.vocab_size
            for j, t in enumerate(seq)
            if t >= tok.vocab_size
        )
        texts = await asyncio.to_thread(tok.decode, sequences, request.skip_special_tokens)
        return tokenizer_pb2.DetokenizeResponse(model=tok.name, texts=texts)

    async def ApplyChatTemplate(
        self, request: tokenizer_pb2.ApplyChatTemplateRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.ApplyChatTemplateResponse:
        tok = await self._tokenizer(request.model)
        messages = conversation_messages(request.conversation, "conversation")
        text = tok.render_chat(messages, _flag(request, "add_generation_prompt", True))
        (enc,) = await asyncio.to_thread(tok.encode, [text], False)
        response = tokenizer_pb2.ApplyChatTemplateResponse(model=tok.name, text=text, count=len(enc.ids))
        if request.return_ids:
            response.ids.extend(enc.ids)
        return response

    async def GetTokenizerInfo(
        self, request: tokenizer_pb2.GetTokenizerInfoRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.GetTokenizerInfoResponse:
        tok = await self._tokenizer(request.model)
        return tokenizer_pb2.GetTokenizerInfoResponse(
            model=tok.name,
            vocab_size=tok.vocab_size,
            context_window=tok.context_window,
            special_tokens=[
                tokenizer_pb2.SpecialToken(kind=s.kind, token=s.token, id=s.id) for s in tok.special_tokens
            ],
            has_chat_template=bool(tok.chat_template),
            chat_template=tok.chat_template,
            adds_bos_token=tok.adds_bos_token,
        )

    async def ListTokenizers(
        self, request: tokenizer_pb2.ListTokenizersRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.ListTokenizersResponse:
        self._require_ready()
        default = self.store.registry.default_name
        return tokenizer_pb2.ListTokenizersResponse(
            tokenizers=[
                tokenizer_pb2.TokenizerSummary(
                    model=t.name, context_window=t.context_window, vocab_size=t.vocab_size, is_default=t.name == default
                )
                for t in self.store.loaded()
            ]
        )

    # -- helpers --------------------------------------------------------------------------------------------------

    def _require_ready(self) -> None:
        if not self._ready:
            raise Unavailable("the tokenizer service is still loading its models; retry shortly")

    async def _tokenizer(self, model: str) -> LoadedTokenizer:
        self._require_ready()
        return await self.store.get(model)

    def _check_batch(self, field: str, size: int) -> None:
        limit = self.settings.max_inputs
        if size == 0:
            raise InvalidArgument.field(field, "must contain at least one item")
        if size > limit:
            raise InvalidArgument.field(field, f"has {size} items; the limit is {limit} (GENLOOM_TOKENIZER_MAX_BATCH)")

    def _encode_inputs(
        self,
        tok: LoadedTokenizer,
        inputs: Sequence[tokenizer_pb2.TokenizerInput],
        add_special_tokens: bool,
        add_generation_prompt: bool,
    ) -> list[Any]:
        """The request's batch limit, then the tokenizer's own encoding of its inputs."""
        self._check_batch("inputs", len(inputs))
        return tok.encode_inputs(inputs, add_special_tokens, add_generation_prompt)


def _flag(request: Any, field: str, default: bool) -> bool:
    return bool(getattr(request, field)) if request.HasField(field) else default

"""Typed results returned by the SDK (plain dataclasses; no protobuf objects leak out)."""

from genloom.types.common import ChatMessage, Conversation, MessageLike
from genloom.types.tokenizer import (
    ChatTemplateResult,
    DetokenizeResult,
    SpecialToken,
    TokenCount,
    Tokenization,
    TokenizeResult,
    TokenizerInfo,
    TokenizerSummary,
)

__all__ = [
    "ChatMessage",
    "ChatTemplateResult",
    "Conversation",
    "DetokenizeResult",
    "MessageLike",
    "SpecialToken",
    "TokenCount",
    "Tokenization",
    "TokenizeResult",
    "TokenizerInfo",
    "TokenizerSummary",
]

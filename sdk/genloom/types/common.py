"""Types shared by several services."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Union

from genloom.v1 import common_pb2

RoleName = Literal["system", "user", "assistant"]
_ROLE_TO_PB = {
    "system": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
}


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: RoleName
    """"system", "user" or "assistant"."""
    content: str
    """The turn's text."""

    def to_pb(self) -> common_pb2.ChatMessage:
        try:
            role = _ROLE_TO_PB[self.role]
        except KeyError:
            raise ValueError(f"role must be one of {', '.join(_ROLE_TO_PB)}, not {self.role!r}") from None
        return common_pb2.ChatMessage(role=role, content=self.content)


MessageLike = Union[ChatMessage, Mapping[str, str]]  # noqa: UP007 - a runtime alias, valid on 3.10
"""A ChatMessage or a dict like {"role": "user", "content": "Hi"} (the OpenAI shape)."""
Conversation = Sequence[MessageLike]


def conversation_to_pb(messages: Conversation) -> common_pb2.Conversation:
    converted = []
    for message in messages:
        if not isinstance(message, ChatMessage):
            if "role" not in message or "content" not in message:
                raise ValueError(f"a chat message needs 'role' and 'content': {dict(message)!r}")
            message = ChatMessage(role=message["role"], content=message["content"])  # type: ignore[arg-type]
        converted.append(message.to_pb())
    return common_pb2.Conversation(messages=converted)

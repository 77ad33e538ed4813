"""Chat messages from protobuf to the {"role", "content"} dicts chat templates take, validated."""

from __future__ import annotations

from genloom.services.server.errors import FieldViolation, InvalidArgument
from genloom.v1 import common_pb2

ROLE_NAMES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}


def conversation_messages(conversation: common_pb2.Conversation, field: str) -> list[dict[str, str]]:
    """The conversation's messages; INVALID_ARGUMENT naming `field`'s bad parts when it is empty or a role is
    unset."""
    if not conversation.messages:
        raise InvalidArgument.field(f"{field}.messages", "a conversation needs at least one message")
    # Lazy: a conversation may hold millions of messages, and raise_for builds only the violations it shows.
    InvalidArgument.raise_for(
        FieldViolation(f"{field}.messages[{j}].role", "role must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        for j, m in enumerate(conversation.messages)
        if m.role not in ROLE_NAMES
    )
    return [{"role": ROLE_NAMES[m.role], "content": m.content} for m in conversation.messages]

"""Chat messages from protobuf to the {"role", "content"} dicts chat templates take, validated."""

from __future__ import annotations

import itertools

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
    # A violation for the first 20 bad roles only (as many as a status shows), the rest counted: a conversation
    # may hold millions of messages.
    bad = (j for j, m in enumerate(conversation.messages) if m.role not in ROLE_NAMES)
    shown = [
        FieldViolation(f"{field}.messages[{j}].role", "role must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        for j in itertools.islice(bad, 20)
    ]
    if shown:
        more = sum(1 for _ in bad)
        message = "; ".join(f"{v.field}: {v.description}" for v in shown)
        raise InvalidArgument(message + (f" (and {more} more)" if more else ""), shown)
    return [{"role": ROLE_NAMES[m.role], "content": m.content} for m in conversation.messages]

"""genloom: Python SDK for the genloom gRPC services.

import genloom

with genloom.Client() as client:          # GENLOOM_TARGET / GENLOOM_API_KEY from the environment
    print(client.tokenizer.count_tokens(["Hello, world"]).counts)
"""

from genloom._client import AsyncClient, Client
from genloom._exceptions import (
    AbortedError,
    AlreadyExistsError,
    APIStatusError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    GenLoomError,
    InternalServerError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from genloom.types.common import ChatMessage

__version__ = "0.1.0"

__all__ = [
    "APIStatusError",
    "AbortedError",
    "AlreadyExistsError",
    "AsyncClient",
    "CancelledError",
    "ChatMessage",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "GenLoomError",
    "InternalServerError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "__version__",
]

"""genloom: Python SDK for the genloom gRPC services.

import genloom

with genloom.Client() as client:          # GENLOOM_TARGET / GENLOOM_API_KEY from the environment
    print(client.tokenizer.count_tokens(["Hello, world"]).counts)
    print(client.tasks.classify("I loved it", labels=["positive", "negative"]).labels)
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
from genloom.types.tasks import (
    AnswerExample,
    AnswerItem,
    ChunkingOptions,
    ClassifyExample,
    ClassLabel,
    EvalConfiguration,
    EvalExampleSource,
    SummarizeExample,
    read_eval_records,
)

__version__ = "0.1.0"

__all__ = [
    "APIStatusError",
    "AbortedError",
    "AlreadyExistsError",
    "AnswerExample",
    "AnswerItem",
    "AsyncClient",
    "CancelledError",
    "ChatMessage",
    "ChunkingOptions",
    "ClassLabel",
    "ClassifyExample",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "EvalConfiguration",
    "EvalExampleSource",
    "FailedPreconditionError",
    "FieldViolation",
    "GenLoomError",
    "InternalServerError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SummarizeExample",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "__version__",
    "read_eval_records",
]

"""How engine failures reach clients: the ServiceError (status, message, RetryInfo) for an engine error in a call.

Used by the serving core (serving.py) and the servicer's response building (responses.py).
"""

from __future__ import annotations

import logging

from genloom.services.inference.engine import (
    AdapterError,
    EngineError,
    EngineOverloadedError,
    RequestFailedError,
    SamplingError,
)
from genloom.services.inference.pool import RETRY_AFTER_DEATH_S
from genloom.services.server.errors import InvalidArgument, NotFound, ResourceExhausted, ServiceError, Unavailable

logger = logging.getLogger(__name__)

# When to retry a request the engine had no memory for: soon (others finish and free theirs).
OVERLOADED_RETRY_AFTER_S = 1.0


def died_while(doing: str) -> Unavailable:
    """For a call whose engine died under it: retry soon (the pool is restarting the engine, and calls wait)."""
    return Unavailable(f"the inference engine died while {doing}; retry shortly", retry_after=RETRY_AFTER_DEATH_S)


def request_error(err: EngineError, request_id: str, *, field: str) -> ServiceError:
    """The status of a request the engine failed while it serves on (EngineDeadError is handled by the caller)."""
    if isinstance(err, AdapterError):
        return NotFound(str(err))
    if isinstance(err, RequestFailedError):
        logger.error("request %s failed in the engine: %s", request_id, err)
        # The base class is INTERNAL: not the caller's fault, and the engine serves on.
        return ServiceError(
            f"internal error in request {request_id}; the server log has the details (retrying may work)"
        )
    if isinstance(err, EngineOverloadedError):
        return ResourceExhausted(str(err), retry_after=OVERLOADED_RETRY_AFTER_S)
    if isinstance(err, SamplingError):
        return InvalidArgument.field("sampling", str(err))
    return InvalidArgument.field(field, str(err))

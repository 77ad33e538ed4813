"""What a genloom service contributes to a server process: the protocols GenloomServer (services/server/app.py)
serves and services/launch.py builds a list of. Each service's servicer satisfies `Service` structurally; a
service that can lose the ability to serve after start-up also has `HealthAware`'s hook."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc


class Service(Protocol):
    """What a genloom service contributes to a server."""

    #: Fully qualified service name, e.g. "genloom.v1.TokenizerService" (health and reflection use it).
    name: str

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None:
        """Load models / connect to dependencies; return when the service can answer RPCs."""

    async def close(self) -> None:
        """Release resources after the server stopped."""


class HealthAware(Protocol):
    """A service that can lose (and regain) the ability to serve after start-up, e.g. when its engine dies."""

    def bind_health(self, report: Callable[[bool], Awaitable[None]]) -> None:
        """Receive the callback to call with False (NOT_SERVING) or True (SERVING)."""

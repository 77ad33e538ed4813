"""The grpc.aio server every genloom process runs: services, health, reflection, interceptors, lifecycle.

Lifecycle: `start()` binds the port with health NOT_SERVING, then each service's `start()` runs (loading models)
in the background; when all are ready, health flips to SERVING. `stop()` flips health to NOT_SERVING, stops
accepting RPCs, lets in-flight ones finish within the grace period, then closes the services.
`serve_until_signal()` is the process entry point: it runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from genloom.services.server.interceptors import default_interceptors
from genloom.services.server.metrics import serve_metrics
from genloom.services.server.service import Service
from genloom.services.server.settings import ServerSettings, bracket, local_address

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def is_loopback(host: str) -> bool:
    """Whether `host` (a listen address: IP literal, name or wildcard) is reachable from this machine only."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        # A host name other than localhost may resolve to any interface; "" and wildcards are every interface.
        return False


class GenloomServer:
    def __init__(self, settings: ServerSettings, services: Sequence[Service]) -> None:
        self.settings = settings
        self.services = list(services)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.ready = asyncio.Event()
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._startup: asyncio.Task[None] | None = None
        self._stopped = False
        # Services that reported themselves not serving (e.g. an engine that died, even during start-up).
        self._not_serving: set[str] = set()

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until every service is ready). Returns the bound port."""
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # Two servers on one port would split traffic unpredictably: fail to bind instead.
            ("grpc.so_reuseport", 0),
            # Keep idle client connections alive through proxies/NATs that drop silent TCP connections.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # Clients ping while they wait on a long call or stream, to notice a server that froze or vanished
            # (the SDK every 30 s). gRPC's default would answer pings more often than every 5 minutes with
            # GOAWAY "too_many_pings", failing those calls.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ]
        if s.max_connection_age > 0:
            options += [
                ("grpc.max_connection_age_ms", int(s.max_connection_age * 1000)),
                ("grpc.max_connection_age_grace_ms", int(s.shutdown_grace * 1000)),
            ]
        api_keys = s.load_api_keys()
        if not api_keys and not is_loopback(s.host):
            logger.warning(
                "serving on %s with no API keys: anyone who can reach this address can use every RPC "
                "(generate, fine-tune, read jobs); set GENLOOM_API_KEYS or GENLOOM_API_KEYS_FILE, or bind 127.0.0.1",
                s.host,
            )
        server = grpc.aio.server(
            interceptors=default_interceptors(api_keys),
            options=options,
            maximum_concurrent_rpcs=s.max_concurrent_rpcs or None,
        )
        for service in self.services:
            service.add_to_server(server)
            if hasattr(service, "bind_health"):
                service.bind_health(self._health_reporter(service.name))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [svc.name for svc in self.services]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        for name in ["", *names]:
            await self._health.set(name, NOT_SERVING)

        address = f"{bracket(s.host)}:{s.port}"
        if s.tls_cert is not None and s.tls_key is not None:
            credentials = grpc.ssl_server_credentials([(s.tls_key.read_bytes(), s.tls_cert.read_bytes())])
            port: int = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        self.port = port
        if port == 0:
            raise OSError(f"could not bind {address}")
        await server.start()
        self._server = server
        self._bind_local_targets(port)
        if s.metrics_port >= 0:
            self.metrics_port = serve_metrics(s.metrics_host, s.metrics_port)
        logger.info("genloom serving %s on %s:%d", ", ".join(names) or "nothing", s.host, self.port)
        self._startup = asyncio.create_task(self._start_services(), name="genloom-startup")
        return port

    def _bind_local_targets(self, port: int) -> None:
        """Tell services that call other services (tasks -> tokenizer, inference) how to reach this server."""
        s = self.settings
        tls = s.tls_cert is not None and s.tls_key is not None
        # With TLS: localhost, the name a self-signed development certificate is most likely issued for.
        target = local_address("localhost" if tls else s.host, port)
        keys = sorted(s.load_api_keys())
        for service in self.services:
            if hasattr(service, "bind_local_target"):
                service.bind_local_target(
                    target,
                    keys[0] if keys else "",
                    s.tls_cert.read_bytes() if tls and s.tls_cert is not None else None,
                )

    async def _start_services(self) -> None:
        for service in self.services:
            await service.start()
            # A service that reported a failure between its start and now (an engine that died at once) stays
            # NOT_SERVING until it reports itself serving again.
            await self._health.set(service.name, NOT_SERVING if service.name in self._not_serving else SERVING)
        await self._health.set("", NOT_SERVING if self._not_serving else SERVING)
        self.ready.set()
        logger.info("ready")

    def _health_reporter(self, name: str) -> Callable[[bool], Awaitable[None]]:
        async def report(serving: bool) -> None:
            if self._stopped:
                return
            status = SERVING if serving else NOT_SERVING
            if serving:
                self._not_serving.discard(name)
            else:
                self._not_serving.add(name)
            await self._health.set(name, status)
            if not serving:
                await self._health.set("", NOT_SERVING)
                logger.error("%s is no longer serving", name)
            elif self.ready.is_set() and not self._not_serving:
                await self._health.set("", SERVING)

        return report

    async def wait_ready(self) -> None:
        """Wait until every service started; re-raises the error of a service that failed to start."""
        assert self._startup is not None, "start() first"
        await self._startup

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, give in-flight ones `grace` seconds (default: the setting), then close services."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.shutdown_grace if grace is None else grace
        logger.info("shutting down (grace %.1fs)", grace)
        await self._health.enter_graceful_shutdown()
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
        if self._server is not None:
            await self._server.stop(grace)
        for service in reversed(self.services):
            try:
                await service.close()
            except Exception:
                logger.exception("error closing %s", service.name)
        logger.info("stopped")

    async def serve_until_signal(self) -> None:
        """Start, run until SIGTERM/SIGINT (or a failed start-up), then stop gracefully."""
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        await self.start()
        assert self._startup is not None
        waiter = asyncio.create_task(stop_requested.wait())
        try:
            done, _ = await asyncio.wait({waiter, self._startup}, return_when=asyncio.FIRST_COMPLETED)
            if self._startup in done and self._startup.exception() is not None:
                raise self._startup.exception()  # type: ignore[misc]
            await waiter
        finally:
            waiter.cancel()
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

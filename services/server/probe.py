"""Health probe for containers: `python -m genloom.services.server.probe` exits 0 only when the local server is
SERVING.

It asks the standard gRPC health service (grpc.health.v1.Health/Check) of the server in the same container, so
an image needs no probe binary. Where it connects comes from the server's own settings (GENLOOM_HOST,
GENLOOM_PORT, GENLOOM_TLS_CERT/GENLOOM_TLS_KEY), so the probe follows whatever the container runs with; flags
override them. Exit status: 0 SERVING; 1 anything else (NOT_SERVING, unknown service, no answer in time, refused
connection), with one line on stderr saying which. Docker reserves 2, so the probe never uses it (argparse's
usage errors do, which is a mistake in the probe's command line, not the server's health).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genloom.services.server.settings import ENV_PREFIX, local_address


def default_target(environ: os._Environ[str] | dict[str, str] = os.environ) -> str:
    """host:port of the server these settings describe, as seen from the same host (a wildcard host: loopback)."""
    return local_address(
        environ.get(ENV_PREFIX + "HOST", "127.0.0.1"), environ.get(ENV_PREFIX + "PORT", "50051").strip()
    )


def check(
    target: str,
    *,
    service: str = "",
    timeout: float = 5.0,
    root_certificates: bytes | None = None,
    server_name: str | None = None,
) -> tuple[bool, str]:
    """Ask `target`'s health service about `service` ("" = the whole server). Returns (serving, what was seen)."""
    options: list[tuple[str, str | int]] = []
    if root_certificates is not None:
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options)
    else:
        channel = grpc.insecure_channel(target, options)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            if code == grpc.StatusCode.NOT_FOUND:
                return False, f"{target}: unknown service {service!r}"
            name = code.name if code is not None else "error"
            return False, f"{target}: {name}: {error.details() if isinstance(error, grpc.Call) else error}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    environ = os.environ
    cert = environ.get(ENV_PREFIX + "TLS_CERT") or None
    tls_default = cert is not None and bool(environ.get(ENV_PREFIX + "TLS_KEY"))
    parser = argparse.ArgumentParser(
        prog="python -m genloom.services.server.probe",
        description="Exit 0 if the genloom server is SERVING (grpc.health.v1), 1 otherwise.",
    )
    parser.add_argument(
        "--target",
        default=default_target(environ),
        help="host:port to ask (default: from GENLOOM_HOST and GENLOOM_PORT; a wildcard host means 127.0.0.1)",
    )
    parser.add_argument("--service", default="", help="a service name, e.g. genloom.v1.TaskService (default: all)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default: 5)")
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=tls_default,
        help="connect with TLS (default: on when GENLOOM_TLS_CERT and GENLOOM_TLS_KEY are set)",
    )
    parser.add_argument(
        "--ca-file",
        default=cert,
        help="PEM certificates to trust (default: GENLOOM_TLS_CERT, the server's own chain; right for a "
        "self-signed certificate)",
    )
    parser.add_argument(
        "--server-name",
        default="localhost",
        help="name to check the server's certificate against, since the probe connects to an address "
        "(default: localhost)",
    )
    args = parser.parse_args(argv)
    roots: bytes | None = None
    if args.tls:
        if not args.ca_file:
            print("probe: --tls needs --ca-file (or GENLOOM_TLS_CERT)", file=sys.stderr)
            return 1
        try:
            with open(args.ca_file, "rb") as f:
                roots = f.read()
        except OSError as error:
            print(f"probe: cannot read {args.ca_file}: {error}", file=sys.stderr)
            return 1
    serving, seen = check(
        args.target, service=args.service, timeout=args.timeout, root_certificates=roots, server_name=args.server_name
    )
    print(seen, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())

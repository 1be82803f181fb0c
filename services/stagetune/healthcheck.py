"""`python -m stagetune.healthcheck`: ask a server's gRPC health service whether it is SERVING.

For the places a plain `grpc:` probe cannot go: Docker's HEALTHCHECK (one image runs any of the five
services, so with no address it tries each service's default port on loopback), and Kubernetes probes
when the servers speak TLS (the kubelet's gRPC probe is plaintext only). TLS and the CA come from the
client variables of core/security.py; health needs no token. Exit 0: serving; 1: anything else.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

DEFAULT_PORTS = (50051, 50052, 50053, 50054, 50055)  # stagetune serve's defaults, ingest … validation


def check(address: str, *, timeout: float = 3.0, server_name: str | None = None) -> str:
    """The health status name ("SERVING", "NOT_SERVING", …), or "UNREACHABLE: <why>"."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from stagetune.core.security import ChannelSecurity

    security = ChannelSecurity.from_env()
    if server_name:
        security = dataclasses.replace(security, server_name=server_name)
    with security.channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                timeout=timeout)
        except grpc.RpcError as exc:
            return f"UNREACHABLE: {exc.code().name} {exc.details() or ''}".rstrip()
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagetune.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None,
                        help="HOST:PORT to ask (default: each service's default port on 127.0.0.1, first that answers)")
    parser.add_argument("--server-name", default=None, help="the name expected in the server's TLS certificate")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    addresses = [args.address] if args.address else [f"127.0.0.1:{port}" for port in DEFAULT_PORTS]
    statuses = []
    for address in addresses:
        status = check(address, timeout=args.timeout, server_name=args.server_name)
        statuses.append(f"{address}: {status}")
        if not status.startswith("UNREACHABLE"):
            print(statuses[-1])
            return 0 if status == "SERVING" else 1
    print("; ".join(statuses), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

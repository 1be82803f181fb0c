"""Who may call the services: an optional shared bearer token, and optional TLS or mutual TLS.

Off by default (the embedded mode on loopback). On a cluster the token and the certificates come from
Kubernetes Secrets, mounted as files or set as environment variables:

    STAGETUNE_API_TOKEN / STAGETUNE_API_TOKEN_FILE   the shared token (servers require it, clients send it)
    STAGETUNE_TLS_CERT, STAGETUNE_TLS_KEY            a server's certificate chain and key (PEM files)
    STAGETUNE_TLS_CLIENT_CA                          a server requires client certificates from this CA (mTLS)
    STAGETUNE_TLS_CA                                 a client verifies servers against this CA
    STAGETUNE_TLS_CLIENT_CERT, STAGETUNE_TLS_CLIENT_KEY   a client's certificate for mTLS
    STAGETUNE_TLS_SERVER_NAME                        the name a client expects in server certificates

The token travels as `authorization: Bearer <token>` metadata, as gRPC's access-token credentials send
it. Health and reflection stay open, so Kubernetes probes and grpcurl's listing need no secret; every
other method answers UNAUTHENTICATED without the right token. Tokens are compared in constant time.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from stagetune.core.errors import ConfigError

ENV_TOKEN = "STAGETUNE_API_TOKEN"
ENV_TOKEN_FILE = "STAGETUNE_API_TOKEN_FILE"
ENV_TLS_CERT = "STAGETUNE_TLS_CERT"
ENV_TLS_KEY = "STAGETUNE_TLS_KEY"
ENV_TLS_CLIENT_CA = "STAGETUNE_TLS_CLIENT_CA"
ENV_TLS_CA = "STAGETUNE_TLS_CA"
ENV_TLS_CLIENT_CERT = "STAGETUNE_TLS_CLIENT_CERT"
ENV_TLS_CLIENT_KEY = "STAGETUNE_TLS_CLIENT_KEY"
ENV_TLS_SERVER_NAME = "STAGETUNE_TLS_SERVER_NAME"

#: Methods every caller may use: probes and service discovery.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")


def _read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}", field=what) from None


def load_token(token: str | None = None, token_file: str | None = None,
               env: Mapping[str, str] | None = None) -> str | None:
    """The shared token from an argument, a file (a mounted Secret) or the environment; None if unset."""
    env = os.environ if env is None else env
    token_file = token_file or env.get(ENV_TOKEN_FILE) or None
    if token is None and token_file:
        data = _read(token_file, "token file")
        token = data.decode("utf-8", "replace").strip() if data is not None else None
        if not token:
            raise ConfigError(f"token file {token_file} is empty", field="token_file")
    if token is None:
        token = env.get(ENV_TOKEN) or None
    if token is not None and (not token.strip() or any(c.isspace() for c in token.strip())):
        raise ConfigError("the API token must be one word with no spaces", field="token")
    return token.strip() if token else None


@dataclasses.dataclass(frozen=True)
class ServerSecurity:
    """A server's token and TLS settings."""

    token: str | None = None
    cert_chain: bytes | None = None
    private_key: bytes | None = None
    client_ca: bytes | None = None  # set: clients must present a certificate from this CA

    @classmethod
    def from_env(cls, *, token_file: str | None = None, cert: str | None = None, key: str | None = None,
                 client_ca: str | None = None, env: Mapping[str, str] | None = None) -> ServerSecurity:
        env = os.environ if env is None else env
        cert = cert or env.get(ENV_TLS_CERT)
        key = key or env.get(ENV_TLS_KEY)
        client_ca = client_ca or env.get(ENV_TLS_CLIENT_CA)
        if bool(cert) != bool(key):
            raise ConfigError(f"TLS needs both a certificate and its key ({ENV_TLS_CERT}, {ENV_TLS_KEY})",
                              field="tls_cert" if not cert else "tls_key")
        if client_ca and not cert:
            raise ConfigError(f"mutual TLS ({ENV_TLS_CLIENT_CA}) needs the server's own certificate and key too",
                              field="tls_cert")
        return cls(token=load_token(token_file=token_file, env=env), cert_chain=_read(cert, "tls_cert"),
                   private_key=_read(key, "tls_key"), client_ca=_read(client_ca, "tls_client_ca"))

    @property
    def tls(self) -> bool:
        return self.cert_chain is not None

    def credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [TokenInterceptor(self.token)] if self.token else []


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call but health and reflection without `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        service = handler_call_details.method.lstrip("/").split("/", 1)[0]
        if service in OPEN_SERVICES:
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        message = ("missing bearer token: set STAGETUNE_API_TOKEN (or STAGETUNE_API_TOKEN_FILE) for the client"
                   if not given else "wrong bearer token")
        return _refusing(handler, message)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def refuse_stream(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    kind = {"request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer}
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kind)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kind)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kind)
    return grpc.unary_unary_rpc_method_handler(refuse, **kind)


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token on a plaintext channel (gRPC sends call credentials over TLS only)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_token(details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: float | None, metadata: Any, credentials: Any,
                 wait_for_ready: bool | None, compression: Any) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


@dataclasses.dataclass(frozen=True)
class ChannelSecurity:
    """A client's token and TLS settings; `channel(address)` opens a channel with them."""

    token: str | None = None
    ca: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    server_name: str | None = None
    tls: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ChannelSecurity:
        env = os.environ if env is None else env
        cert, key = env.get(ENV_TLS_CLIENT_CERT), env.get(ENV_TLS_CLIENT_KEY)
        if bool(cert) != bool(key):
            raise ConfigError(f"a client certificate needs its key ({ENV_TLS_CLIENT_CERT}, {ENV_TLS_CLIENT_KEY})",
                              field="tls_client_cert")
        ca = env.get(ENV_TLS_CA)
        return cls(token=load_token(env=env), ca=_read(ca, "tls_ca"), client_cert=_read(cert, "tls_client_cert"),
                   client_key=_read(key, "tls_client_key"), server_name=env.get(ENV_TLS_SERVER_NAME) or None,
                   tls=bool(ca or cert))

    def channel(self, address: str) -> grpc.Channel:
        options = list(MESSAGE_OPTIONS)
        if not self.tls:
            channel = grpc.insecure_channel(address, options=options)
            return grpc.intercept_channel(channel, _TokenMetadata(self.token)) if self.token else channel
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.client_key,
                                                   certificate_chain=self.client_cert)
        if self.token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(self.token))
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(address, credentials, options=options)

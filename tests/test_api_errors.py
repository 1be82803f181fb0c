"""The gRPC API answers bad requests synchronously, with proper codes and the offending fields.

Real servers on loopback. Start validates its request before a job exists (nothing is left in the store),
List/Get/Watch/Cancel check their arguments, an unexpected exception is INTERNAL with a short message
(the traceback goes to the server log, once), and the five services run on one host with their defaults.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from stagetune.core.client import error_from_rpc, field_violations
from stagetune.core.errors import CorruptError
from stagetune.core.grpc_server import job_service, start_server
from stagetune.core.messages import to_struct
from stagetune.core.store.local import LocalStore
from stagetune.pipeline import DEFAULT_PORTS, start_embedded
from stagetune.v1 import (
    common_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    text_pb2,
    text_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
    validation_pb2,
    validation_pb2_grpc,
)

STUBS = {
    "ingest": ingest_pb2_grpc.IngestServiceStub,
    "vae": vae_pb2_grpc.VaeServiceStub,
    "text": text_pb2_grpc.TextServiceStub,
    "trainer": trainer_pb2_grpc.TrainerServiceStub,
    "validation": validation_pb2_grpc.ValidationServiceStub,
}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("api")
    store = LocalStore(root / "store", fsync=False)
    servers = start_embedded(store)
    channels = {name: grpc.insecure_channel(server.address) for name, server in servers.items()}
    model = root / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    try:
        yield {"stubs": {name: STUBS[name](channels[name]) for name in STUBS}, "store": store, "root": root,
               "model": str(model)}
    finally:
        for channel in channels.values():
            channel.close()
        for server in servers.values():
            server.stop(0)


def _refused(call, request) -> tuple[grpc.StatusCode, set[str], str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value.code(), {field for field, _ in field_violations(info.value)}, info.value.details()


def _no_jobs(api: dict, service: str) -> None:
    assert not [k for k in api["store"].list("jobs/") if k.split("/")[1].startswith(service + "-")]
    assert not api["stubs"][service].List(common_pb2.ListJobsRequest(), timeout=10).jobs


# --------------------------------------------------------------------------------------------------- Start


def test_ingest_start_refuses_bad_requests(api: dict) -> None:
    start = api["stubs"]["ingest"].Start
    cases = [
        (ingest_pb2.StartIngestRequest(data_backend_config_json="[{oops"), grpc.StatusCode.INVALID_ARGUMENT,
         {"data_backend_config_json"}),
        (ingest_pb2.StartIngestRequest(data_backend_config_json="{}"), grpc.StatusCode.INVALID_ARGUMENT,
         {"data_backend_config_json"}),
        (ingest_pb2.StartIngestRequest(data_backend_config_json=json.dumps([
            {"id": "d", "instance_data_dir": str(api["root"] / "absent")},
            {"id": "t", "dataset_type": "text_embeds"}]), train_batch_size=-4),
         grpc.StatusCode.INVALID_ARGUMENT, {"train_batch_size", "instance_data_dir"}),
        (ingest_pb2.StartIngestRequest(data_backend_config_json=json.dumps([
            {"id": "d", "instance_data_dir": str(api["root"] / "absent")},
            {"id": "t", "dataset_type": "text_embeds"}])),
         grpc.StatusCode.NOT_FOUND, {"instance_data_dir"}),
        (ingest_pb2.StartIngestRequest(data_backend_config_json=json.dumps([
            {"id": "d", "instance_data_dir": "x", "resolutoin": 5}, {"id": "t", "dataset_type": "text_embeds"}])),
         grpc.StatusCode.INVALID_ARGUMENT, {"resolutoin"}),
        (ingest_pb2.StartIngestRequest(data_backend_config_json="[]", dataset_defaults_json="[1]"),
         grpc.StatusCode.INVALID_ARGUMENT, {"dataset_defaults_json"}),
    ]
    for request, code, fields in cases:
        got, violations, message = _refused(start, request)
        assert (got, violations) == (code, fields), (request, message)
    _no_jobs(api, "ingest")


def test_encoder_starts_refuse_bad_requests(api: dict) -> None:
    model = common_pb2.ModelRef(name_or_path=api["model"], family="sd3")
    vae = api["stubs"]["vae"].Start
    code, fields, message = _refused(vae, vae_pb2.StartEncodeLatentsRequest(manifest_id="nope", model=model))
    assert code == grpc.StatusCode.NOT_FOUND and fields == {"manifest_id"} and "run ingest first" in message
    code, fields, _ = _refused(vae, vae_pb2.StartEncodeLatentsRequest(
        manifest_id="nope", model=common_pb2.ModelRef(name_or_path="", family="flux"), vae_batch_size=-1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == {"manifest_id", "model.name_or_path", "model.family", "vae_batch_size"}
    text = api["stubs"]["text"].Start
    code, fields, message = _refused(text, text_pb2.StartEncodeTextRequest(
        extra_captions=["x"], model=model, family_options=to_struct({"t5_padding": "left", "sana_thing": 1})))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, {"t5_padding", "family_options.sana_thing"}), message
    code, fields, _ = _refused(text, text_pb2.StartEncodeTextRequest(model=model))
    assert fields == {"manifest_id"}
    _no_jobs(api, "vae")
    _no_jobs(api, "text")


def test_trainer_start_refuses_bad_configs_naming_every_key(api: dict) -> None:
    start = api["stubs"]["trainer"].Start
    base = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": api["model"],
            "max_train_steps": 2, "output_dir": str(api["root"] / "out")}
    refs = {"manifest_id": "m", "latent_cache": "c", "text_cache": "c", "latent_keys": "k", "text_keys": "k"}
    for config_json, fields in [
        ("{not json", {"config_json"}),
        ("[]", {"config_json"}),
        ('"sd3"', {"config_json"}),
        (json.dumps({**base, "learnin_rate": 1}), {"learnin_rate"}),
        (json.dumps({**base, "train_batch_size": -2}), {"train_batch_size"}),
        (json.dumps({**base, "train_batch_size": 0, "lora_rank": "big", "optimizer": "soap"}),
         {"train_batch_size", "lora_rank", "optimizer"}),
    ]:
        code, violations, message = _refused(start, trainer_pb2.StartTrainingRequest(config_json=config_json,
                                                                                       **refs))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
        assert fields <= violations, (config_json, violations, message)
    code, violations, message = _refused(start, trainer_pb2.StartTrainingRequest(config_json=json.dumps(base),
                                                                                   **refs))
    assert code == grpc.StatusCode.NOT_FOUND and {"manifest_id", "latent_keys", "text_keys"} <= violations
    _no_jobs(api, "trainer")


def test_validation_start_refuses_bad_requests(api: dict) -> None:
    start = api["stubs"]["validation"].Start
    request = validation_pb2.StartValidationRequest(
        model=common_pb2.ModelRef(name_or_path=api["model"]), adapter_key="jobs/none/lora.safetensors",
        sampling=validation_pb2.SamplingOptions(num_inference_steps=-1, guidance_scale=float("nan"),
                                                resolutions=[validation_pb2.Resolution(width=0, height=64)]))
    code, fields, _ = _refused(start, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == {"prompts", "adapter_key", "sampling.num_inference_steps", "sampling.guidance_scale",
                      "sampling.resolutions[0]"}
    _no_jobs(api, "validation")


def test_client_side_errors_keep_every_field(api: dict) -> None:
    with pytest.raises(grpc.RpcError) as info:
        api["stubs"]["vae"].Start(vae_pb2.StartEncodeLatentsRequest(vae_batch_size=-1, write_batch_size=-1),
                                  timeout=10)
    error = error_from_rpc(info.value)
    assert [p.field for p in error.problems][:2] == ["vae_batch_size", "write_batch_size"]


# ------------------------------------------------------------------------------- List, Get, Watch, Cancel


def test_job_queries_check_their_arguments(api: dict) -> None:
    stub = api["stubs"]["ingest"]
    for request, field in [
        (common_pb2.ListJobsRequest(page_token="abc"), "page_token"),
        (common_pb2.ListJobsRequest(page_token="-1"), "page_token"),
        (common_pb2.ListJobsRequest(state=99), "state"),
        (common_pb2.ListJobsRequest(page_size=-5), "page_size"),
    ]:
        assert _refused(stub.List, request)[:2] == (grpc.StatusCode.INVALID_ARGUMENT, {field})
    assert _refused(stub.Get, common_pb2.GetJobRequest())[:2] == (grpc.StatusCode.INVALID_ARGUMENT, {"job_id"})
    assert _refused(stub.Cancel, common_pb2.CancelJobRequest())[:2] == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                         {"job_id"})
    assert _refused(stub.Get, common_pb2.GetJobRequest(job_id="a/../b"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Watch(common_pb2.WatchJobRequest(), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _refused(stub.Get, common_pb2.GetJobRequest(job_id="ingest-0000"))[0] == grpc.StatusCode.NOT_FOUND


def test_a_corrupt_job_record_is_named_and_does_not_break_list(api: dict) -> None:
    store = api["store"]
    store.put_bytes("jobs/text-badbadbad/record.json", b"{half a rec")
    stub = api["stubs"]["text"]
    assert stub.List(common_pb2.ListJobsRequest(), timeout=10).jobs == []
    code, _, message = _refused(stub.Get, common_pb2.GetJobRequest(job_id="text-badbadbad"))
    assert code == grpc.StatusCode.DATA_LOSS and "jobs/text-badbadbad/record.json" in message
    with pytest.raises(grpc.RpcError) as info:
        stub.Get(common_pb2.GetJobRequest(job_id="text-badbadbad"), timeout=10)
    assert isinstance(error_from_rpc(info.value), CorruptError)
    store.delete("jobs/text-badbadbad/record.json")


def test_unexpected_exceptions_are_internal_with_a_short_message(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    def explode(request: object) -> None:
        raise ZeroDivisionError("division by zero\nwith a second line nobody needs")

    binding = job_service(LocalStore(tmp_path), name="ingest", servicer_base=ingest_pb2_grpc.IngestServiceServicer,
                          add_to_server=ingest_pb2_grpc.add_IngestServiceServicer_to_server,
                          request_type=ingest_pb2.StartIngestRequest, work=lambda ctx: {}, validate=explode)
    server = start_server([binding])
    try:
        with grpc.insecure_channel(server.address) as channel, caplog.at_level(logging.ERROR):
            with pytest.raises(grpc.RpcError) as info:
                ingest_pb2_grpc.IngestServiceStub(channel).Start(ingest_pb2.StartIngestRequest(), timeout=10)
    finally:
        server.stop(0)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details()
    assert re.fullmatch(r"internal error in Start \(incident [0-9a-f]{8} in the server log\): "
                        r"ZeroDivisionError: division by zero", details), details
    incident = re.search(r"incident ([0-9a-f]{8})", details).group(1)
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # the traceback, once
    assert "Exception calling application" not in details


# ---------------------------------------------------------------------------------------- five on one host


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _serve(service: str, store: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, STAGETUNE_STORE=str(store))
    return subprocess.Popen([sys.executable, "-m", "stagetune.cli", "serve", service, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_five_services_on_one_host_with_their_default_ports(tmp_path: Path) -> None:
    ports = [p for pair in DEFAULT_PORTS.values() for p in pair]
    if not all(_free(p) for p in ports):
        pytest.skip("a default port is taken on this machine")
    assert len(set(ports)) == len(ports)
    procs = {name: _serve(name, tmp_path / "store") for name in DEFAULT_PORTS}
    try:
        for name, proc in procs.items():
            line = proc.stdout.readline()
            grpc_port, metrics_port = DEFAULT_PORTS[name]
            assert f"gRPC on 127.0.0.1:{grpc_port}" in line and f"metrics on :{metrics_port}" in line, (
                name, line, proc.stderr.read() if proc.poll() is not None else "")
        clash = _serve("ingest", tmp_path / "store")
        out, err = clash.communicate(timeout=60)
        assert clash.returncode == 2, (out, err)
        assert f"cannot listen for gRPC on 127.0.0.1:{DEFAULT_PORTS['ingest'][0]}" in err and "--port" in err
        assert "Traceback" not in err
        clash = _serve("ingest", tmp_path / "store", "--port", "0")  # the gRPC port is free, the metrics one not
        out, err = clash.communicate(timeout=60)
        assert clash.returncode == 2 and "cannot serve metrics" in err and "--metrics-port" in err, (out, err)
        assert "Traceback" not in err
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)

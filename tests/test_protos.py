"""The checked-in stubs must be what protoc makes of protos/ today."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_stubs_are_fresh(tmp_path: Path) -> None:
    generated = _load_generator().generate(tmp_path)
    assert generated, "protoc produced nothing"
    checked_in = ROOT / "services" / "stagetune" / "v1"
    names = {p.name for p in generated}
    assert names == {p.name for p in checked_in.glob("*_pb2*.py*")}, "stub files differ from protos/"
    for path in generated:
        fresh = path.read_bytes()
        current = (checked_in / path.name).read_bytes()
        assert fresh == current, f"{path.name} is stale: run python scripts/gen_protos.py"


def test_every_service_follows_the_job_shape() -> None:
    from stagetune.v1 import ingest_pb2, text_pb2, trainer_pb2, vae_pb2, validation_pb2

    for module, name in [
        (ingest_pb2, "IngestService"),
        (vae_pb2, "VaeService"),
        (text_pb2, "TextService"),
        (trainer_pb2, "TrainerService"),
        (validation_pb2, "ValidationService"),
    ]:
        service = module.DESCRIPTOR.services_by_name[name]
        methods = {m.name: m for m in service.methods}
        assert {"Start", "Watch", "Get", "Cancel", "List"} <= set(methods)
        assert methods["Watch"].server_streaming
        assert methods["Start"].output_type.full_name == "stagetune.v1.Job"
        start_request = methods["Start"].input_type
        assert start_request.fields_by_name["request_id"].number == 1

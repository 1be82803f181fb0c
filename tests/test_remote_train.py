"""`stagetune train --endpoint`: a laptop drives a deployment's services the way the embedded mode drives loopback.

The "deployment" is five gRPC servers on their own loopback ports over an S3 store, with a bearer token; the
client is the real `stagetune train` command in its own process, which reaches them only through gRPC and the
output_dir's S3 URL. Local dataset folders and a local output_dir are refused before anything starts.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_store import fresh_bucket
from test_end_to_end import make_dataset, use_s3_dataset, write_configs

from stagetune.cli import main
from stagetune.core.errors import InputError, PortInUseError
from stagetune.core.grpc_server import RunningServer, start_server
from stagetune.core.security import ServerSecurity
from stagetune.core.store import open_store
from stagetune.pipeline import CLIENT_STAGES, resolve_endpoints, service_binding
from stagetune.trainer.service import ENV_VALIDATION_ENDPOINT

TOKEN = "remote-test-token"


def test_endpoints_follow_the_charts_ports_and_overrides_win() -> None:
    assert resolve_endpoints("gpu.example.org") == {
        "ingest": "gpu.example.org:50051", "vae": "gpu.example.org:50052", "text": "gpu.example.org:50053",
        "trainer": "gpu.example.org:50054"}
    both = resolve_endpoints("127.0.0.1:6000", "trainer=train.example.org:443, validation=st-validation:50055")
    assert both == {"ingest": "127.0.0.1:6000", "vae": "127.0.0.1:6001", "text": "127.0.0.1:6002",
                    "trainer": "train.example.org:443", "validation": "st-validation:50055"}
    alone = resolve_endpoints(None, "ingest=a:1,vae=b:2,text=c:3,trainer=d:4")
    assert alone == {"ingest": "a:1", "vae": "b:2", "text": "c:3", "trainer": "d:4"}
    for endpoint, overrides, message in [
        (None, "ingest=a:1", "no address for vae, text, trainer"),
        ("h", "trainr=a:1", "stage=HOST:PORT pairs"),
        ("h", "vae=a", "has no port"),
        ("h:70000", None, "not a port number"),
        ("h:x", None, "not a port number"),
        ("http://h", None, "is not HOST"),
    ]:
        with pytest.raises(InputError, match=message):
            resolve_endpoints(endpoint, overrides)


def test_local_datasets_and_output_are_refused_before_anything_starts(tmp_path: Path, capsys) -> None:
    """Nothing listens on the endpoint: the refusal comes from the config alone, naming every dataset."""
    make_dataset(tmp_path / "data")
    config = write_configs(tmp_path, tmp_path / "no-such-model", steps=2, validation=False)
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends.insert(1, dict(backends[0], id="more-shapes"))
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))

    code = main(["train", "--config", str(config), "--endpoint", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2
    for dataset in ("shapes", "more-shapes"):
        assert f"dataset {dataset!r} is a local folder ({tmp_path / 'data'})" in err
    assert "datasets on a cluster live in S3" in err and "type: aws" in err
    assert f"output_dir {tmp_path / 'output'} is not an s3:// URL" in err
    assert "does not answer" not in err and "model folder" not in err  # the model is the cluster's to check
    assert not (tmp_path / "output").exists()  # no lock taken, nothing written

    with pytest.raises(InputError, match="--store does not apply with --endpoint"):
        from stagetune.cli import build_parser, cmd_train

        cmd_train(build_parser().parse_args(["train", "--config", str(config), "--endpoint", "h", "--store", "x"]))


def _start_deployment(store_url: str) -> dict[str, RunningServer]:
    """The four stages a client calls on consecutive ports (as `--endpoint HOST:PORT` assumes), validation on
    any; each its own server with the token required."""
    security = ServerSecurity(token=TOKEN)
    for _ in range(20):
        base = random.randrange(20000, 60000)
        servers: dict[str, RunningServer] = {}
        try:
            for i, name in enumerate(CLIENT_STAGES):
                servers[name] = start_server([service_binding(name, open_store(store_url))], port=base + i,
                                             security=security)
        except PortInUseError:
            for server in servers.values():
                server.stop(0)
            continue
        servers["validation"] = start_server([service_binding("validation", open_store(store_url))],
                                             security=security)
        return servers
    raise RuntimeError("no four consecutive free ports")


@pytest.fixture
def deployment(s3_server, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, RunningServer], str]]:
    store_url = s3_server.url(fresh_bucket(), prefix="stagetune")
    servers = _start_deployment(store_url)
    # What the chart gives the trainer pod: validation's in-cluster address and the token it calls it with.
    monkeypatch.setenv(ENV_VALIDATION_ENDPOINT, servers["validation"].address)
    monkeypatch.setenv("STAGETUNE_API_TOKEN", TOKEN)
    try:
        yield servers, store_url
    finally:
        for server in servers.values():
            server.stop(0)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STAGETUNE_API_TOKEN", "STAGETUNE_TLS"))}
    env["STAGETUNE_STORE"] = str(cwd / "laptop-store-never-used")
    return subprocess.run([sys.executable, "-m", "stagetune.cli", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _s3_configs(tmp_path: Path, tiny_sd3_path: Path, s3_server, run: str) -> tuple[Path, str]:
    """The quick start's dataset uploaded to S3 and a config pair training on it into an s3:// output_dir."""
    make_dataset(tmp_path / "local")
    bucket = fresh_bucket()  # the dataset's and output_dir's
    output_url = s3_server.url(bucket, prefix=f"runs/{run}")
    config = write_configs(tmp_path, tiny_sd3_path, steps=2, output_dir=output_url, validation_steps=2,
                           validation_prompt="a red square", validation_resolution="64x64",
                           validation_num_inference_steps=1)
    use_s3_dataset(tmp_path, s3_server, tmp_path / "local", bucket=bucket)
    return config, output_url


def test_a_laptop_trains_on_a_remote_deployment_with_its_token(tmp_path: Path, tiny_sd3_path: Path, s3_server,
                                                               deployment) -> None:
    servers, store_url = deployment
    config, output_url = _s3_configs(tmp_path, tiny_sd3_path, s3_server, "first")
    endpoint = servers["ingest"].address
    token_file = tmp_path / "token"

    # Without the token, and with the wrong one, every stage says so before any job starts.
    refused = _cli("--config", str(config), "--endpoint", endpoint, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    for name in CLIENT_STAGES:
        assert f"{name} at {servers[name].address} refused the call: missing bearer token" in refused.stderr
    token_file.write_text("not-the-token\n")
    wrong = _cli("--config", str(config), "--endpoint", endpoint, "--token-file", str(token_file), cwd=tmp_path)
    assert wrong.returncode == 2 and "refused the call: wrong bearer token" in wrong.stderr
    store = open_store(store_url)
    assert not list(store.list("manifests/")), "nothing may start before the endpoints are checked"

    token_file.write_text(TOKEN + "\n")
    run = _cli("--config", str(config), "--endpoint", endpoint, "--token-file", str(token_file), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trained 2 steps" in run.stdout and "pytorch_lora_weights.safetensors" in run.stdout
    assert f"ingest {endpoint}" in run.stderr
    assert list(store.list("manifests/")), "the deployment's own store holds the manifest"
    assert not (tmp_path / "laptop-store-never-used").exists()
    output = open_store(output_url)
    assert output.exists("pytorch_lora_weights.safetensors")
    assert output.exists("checkpoint-2/pytorch_lora_weights.safetensors")
    # The trainer reached validation through its own STAGETUNE_VALIDATION_ENDPOINT, with the token.
    assert output.exists("validation_images/step_2_validation_64x64.png")


def test_an_output_dir_only_the_cluster_reaches_is_locked_and_checked_by_the_trainer(
        tmp_path: Path, tiny_sd3_path: Path, s3_server, deployment, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The chart's bundled S3 has a cluster-internal address. This machine's view of output_dir is made such an
    address (the laptop's output store points at a closed port); the services reach the real one. The run
    trains, the trainer took the run's lock, and a run already holding output_dir is refused by the trainer."""
    import stagetune.cli
    import stagetune.preflight
    from stagetune.core.outputs import open_output as real_open_output
    from stagetune.core.run_lock import RunLock

    servers, _ = deployment
    config, output_url = _s3_configs(tmp_path, tiny_sd3_path, s3_server, "internal")
    laptop_view = output_url.replace(s3_server.endpoint, "http://127.0.0.1:1")
    assert laptop_view != output_url
    monkeypatch.setattr(stagetune.preflight, "open_output",
                        lambda output_dir, base_dir=None: real_open_output(laptop_view, base_dir))
    monkeypatch.setattr(stagetune.cli, "_stop_cleanly_on_signals", lambda: None)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    args = ["train", "--config", str(config), "--endpoint", servers["ingest"].address, "--token-file", str(token_file)]

    assert main([*args, "--check"]) == 0
    said = capsys.readouterr()
    assert "cannot be reached from this machine" in said.err and "127.0.0.1:1" in said.err
    assert "is checked by the deployment's trainer (not reachable from here)" in said.out

    output = open_store(output_url)
    other = RunLock(output).acquire()  # another run holds output_dir: only the trainer can see it
    try:
        assert main(args) != 0
        assert "is in use by another run" in capsys.readouterr().err
    finally:
        other.release()
    assert not output.exists("pytorch_lora_weights.safetensors")

    assert main(args) == 0
    said = capsys.readouterr()
    assert "trainer takes the run's lock" in said.err and "trained 2 steps" in said.out
    assert output.exists("pytorch_lora_weights.safetensors") and output.exists("checkpoint-2/training_state.json")
    assert RunLock(output).holder() is None  # the trainer released it when done

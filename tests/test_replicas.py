"""Encoder replicas: real `stagetune serve vae` processes on one store and one manifest.

Two replicas started together split the work and encode no key twice; a replica SIGKILLed mid-run
leaves only whole shards behind and its unit is taken over once its lease expires; the Prometheus
counters of a vae job move by what the job did.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load as load_safetensors

from stagetune.core.client import run_job
from stagetune.core.store import Store, open_store
from stagetune.v1 import common_pb2, vae_pb2, vae_pb2_grpc

TTL = 1.5  # lease ttl of the replicas: a killed one's unit is free again after this many seconds
IMAGES = 40
UNIT = 4  # write_batch_size: one shard, and one lease, per 4 latents


def make_manifest(root: Path, store_url: str, count: int = IMAGES, seed: int = 1) -> tuple[str, list[str]]:
    """Ingest `count` small pictures into the store; returns the manifest id and the pixel keys."""
    from stagetune.core.config.dataset import load_data_backend_config
    from stagetune.ingest.run import run_ingest

    data = root / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        size = (64 + 8 * (i % 5), 64 + 8 * (i % 3))
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(data / f"img_{i}.png")
        (data / f"img_{i}.txt").write_text(f"picture number {i}")
    backends = load_data_backend_config([
        {"id": "pics", "type": "local", "instance_data_dir": str(data), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel_area", "minimum_image_size": 0, "crop": True,
         "crop_aspect": "square", "crop_style": "center"},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True},
    ])
    store = open_store(store_url)
    try:
        result = run_ingest(backends, store, train_batch_size=1)
    finally:
        store.close()
    assert len(result.samples) == count
    return result.manifest_id, [row.pixel_key for row in result.samples]


@dataclasses.dataclass
class Replica:
    proc: subprocess.Popen[str]
    port: int
    metrics_port: int

    def stub(self) -> tuple[grpc.Channel, vae_pb2_grpc.VaeServiceStub]:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        return channel, vae_pb2_grpc.VaeServiceStub(channel)

    def metric(self, name: str) -> float:
        """One sample of the replica's own /metrics page (stage="vae")."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        match = re.search(rf'^{name}{{stage="vae"}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Any]:
    """Start `stagetune serve vae` processes on a store; all are killed at the end of the test."""
    started: list[Replica] = []

    def start(store_url: str, count: int) -> list[Replica]:
        # Every progress update as an event: the kill test times its kill by them.
        env = dict(os.environ, STAGETUNE_STORE=store_url, STAGETUNE_LEASE_TTL_S=str(TTL),
                   STAGETUNE_PROGRESS_INTERVAL_S="0", XDG_CACHE_HOME=str(tmp_path / "xdg"))
        procs = []
        for i in range(count):  # all started before any is waited for: they load in parallel
            log = open(tmp_path / f"replica-{len(started) + i}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "stagetune.cli", "serve", "vae", "--port", "0", "--metrics-port", "0"],
                stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True))
        out = []
        for proc in procs:
            line = proc.stdout.readline()
            match = re.search(r"gRPC on [\d.]+:(\d+), metrics on :(\d+)", line)
            assert match, f"unexpected first line {line!r}"
            replica = Replica(proc, int(match.group(1)), int(match.group(2)))
            started.append(replica)
            out.append(replica)
        return out

    yield start
    for replica in started:
        replica.kill()


def encode_request(manifest_id: str, model: Path, name: str) -> vae_pb2.StartEncodeLatentsRequest:
    return vae_pb2.StartEncodeLatentsRequest(
        request_id=name, manifest_id=manifest_id, vae_batch_size=2, write_batch_size=UNIT,
        model=common_pb2.ModelRef(name_or_path=str(model), family="sd3"))


def index_entries(store: Store, prefix: str) -> list[str]:
    """Every key of every index object under the cache prefix, duplicates included."""
    keys: list[str] = []
    for index in store.list(f"{prefix}/index/"):
        keys += json.loads(store.get_bytes(index))["keys"]
    return keys


def assert_indexed_shards_whole(store: Store, prefix: str) -> None:
    """Every index object names a shard that exists, loads, and holds each key's latents; and every
    shard in the store, indexed or orphaned by a kill, is whole (puts are atomic)."""
    indexed = set()
    for index in store.list(f"{prefix}/index/"):
        body = json.loads(store.get_bytes(index))
        tensors = load_safetensors(store.get_bytes(f"{prefix}/shards/{body['shard']}.safetensors"))
        for key in body["keys"]:
            assert tensors[f"{key}/latents"].shape == (16, 8, 8), (index, key)
        indexed.add(body["shard"])
    for shard in store.list(f"{prefix}/shards/"):
        if shard.rsplit("/", 1)[1].removesuffix(".safetensors") not in indexed:
            assert load_safetensors(store.get_bytes(shard)), shard


def latent_keys(model: Path, pixel_keys: list[str]) -> tuple[str, set[str]]:
    """The latent cache prefix and keys the vae service must produce (no weights loaded)."""
    from stagetune.models.sd3.vae import SD3LatentEncoder
    from stagetune.vae.service import latent_cache_prefix

    encoder = SD3LatentEncoder.from_pretrained(str(model), load=False)
    return latent_cache_prefix(encoder.fingerprint), {encoder.latent_key(k) for k in pixel_keys}


def test_two_replicas_split_one_manifest_and_encode_each_key_once(
    tmp_path: Path, tiny_sd3_path: Path, s3_store_url: str, replicas: Any
) -> None:
    """On S3, the store with no compare-and-swap (the lease protocol runs on both stores in test_leases)."""
    store_url = s3_store_url
    manifest_id, pixel_keys = make_manifest(tmp_path, store_url)
    prefix, expected = latent_keys(tiny_sd3_path, pixel_keys)
    pair = replicas(store_url, 2)
    # Warm both up on other images first (imports, VAE load), so that on the shared manifest they
    # start encoding together rather than one loading while the other does everything.
    warm_id, warm_pixel_keys = make_manifest(tmp_path / "warm", store_url, 2, seed=2)  # other pixels, keys

    def warm_up(i: int) -> None:
        channel, stub = pair[i].stub()
        with channel:
            run_job(stub, encode_request(warm_id, tiny_sd3_path, f"warm-up-{i}"))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(warm_up, range(2)))
    before = [(r.metric("stagetune_cache_items_encoded_total"), r.metric("stagetune_cache_hits_total"),
               r.metric("stagetune_cache_written_bytes_total")) for r in pair]
    start = threading.Barrier(2)
    results: dict[int, common_pb2.Job] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        channel, stub = pair[i].stub()
        try:
            start.wait()
            results[i] = run_job(stub, encode_request(manifest_id, tiny_sd3_path, f"same-manifest-{i}"))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            channel.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    outputs = [dict(results[i].outputs) for i in range(2)]
    encoded = [int(o["encoded"]) for o in outputs]
    assert sum(encoded) == IMAGES, outputs
    assert all(n > 0 for n in encoded), f"one replica did all the work: {outputs}"
    for o in outputs:
        assert int(o["total"]) == IMAGES and int(o["hits"]) + int(o["encoded"]) + int(o["shared"]) == IMAGES

    store = open_store(store_url)
    assert outputs[0]["cache_prefix"] == outputs[1]["cache_prefix"] == prefix
    entries = index_entries(store, prefix)
    twice = [key for key, n in Counter(entries).items() if n > 1]
    assert not twice, f"{len(twice)} keys indexed more than once"
    assert set(entries) == expected | latent_keys(tiny_sd3_path, warm_pixel_keys)[1]
    assert_indexed_shards_whole(store, prefix)
    leases = [k.rsplit("/", 1)[1] for k in store.list(f"{prefix}/leases/")]
    assert set(leases) == {"done.json"}, "no claim left behind"

    # Each replica's own counters say what it did.
    for replica, o, (encoded0, hits0, bytes0) in zip(pair, outputs, before, strict=True):
        assert replica.metric("stagetune_cache_items_encoded_total") - encoded0 == int(o["encoded"])
        assert replica.metric("stagetune_cache_hits_total") - hits0 == int(o["hits"]) + int(o["shared"])
        assert replica.metric("stagetune_cache_written_bytes_total") - bytes0 == int(o["bytes_written"])


def test_killed_replica_leaves_whole_shards_and_its_unit_is_taken_over(
    tmp_path: Path, tiny_sd3_path: Path, replicas: Any
) -> None:
    """Kill a replica half-way through a unit; a second replica finishes the manifest, redoing only
    the killed replica's unflushed unit. On a local folder (the S3 case runs in test_leases)."""
    store_url = str(tmp_path / "store")
    manifest_id, pixel_keys = make_manifest(tmp_path, store_url)
    prefix, expected = latent_keys(tiny_sd3_path, pixel_keys)
    doomed, survivor = replicas(store_url, 2)
    store = open_store(store_url)

    channel, stub = doomed.stub()
    job = stub.Start(encode_request(manifest_id, tiny_sd3_path, "doomed"))
    progress_at_kill = -1
    try:
        for event in stub.Watch(common_pb2.WatchJobRequest(job_id=job.job_id), timeout=120):
            # Two units flushed and one batch into the third (units of 4, batches of 2).
            if event.HasField("progress") and event.progress.done >= 2 * UNIT + 2:
                progress_at_kill = event.progress.done
                doomed.kill()
                break
    finally:
        channel.close()
    doomed.kill()
    assert progress_at_kill > 0
    flushed = index_entries(store, prefix)
    left_claims = [k for k in store.list(f"{prefix}/leases/") if "/claim-" in k]
    assert 2 * UNIT <= len(set(flushed)) < IMAGES, f"killed after {len(set(flushed))} flushed: not mid-run"
    assert len(flushed) == len(set(flushed))
    assert_indexed_shards_whole(store, prefix)  # whatever the kill interrupted, the index names whole shards

    channel, stub = survivor.stub()
    try:
        outputs = dict(run_job(stub, encode_request(manifest_id, tiny_sd3_path, "survivor")).outputs)
    finally:
        channel.close()
    # Everything the killed replica flushed is a hit; the survivor encodes only the rest, including
    # the killed replica's unflushed unit (the one loss a kill may cost).
    assert int(outputs["hits"]) == len(set(flushed))
    assert int(outputs["encoded"]) == IMAGES - len(set(flushed))
    assert int(outputs["shared"]) == 0
    assert left_claims, "the replica was killed holding a unit"
    entries = index_entries(store, prefix)
    assert len(entries) == len(set(entries)) == IMAGES
    assert set(entries) == expected
    assert_indexed_shards_whole(store, prefix)
    assert not [k for k in store.list(f"{prefix}/leases/") if "/claim-" in k], "the dead claim was taken over"


def test_vae_job_moves_the_cache_counters_by_what_it_did(tmp_path: Path, tiny_sd3_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """In one process (one registry): a cold job counts its encodes and bytes, a warm one only hits."""
    from prometheus_client import REGISTRY

    from stagetune.core.grpc_server import start_server
    from stagetune.pipeline import service_binding

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    count = 6
    store_url = str(tmp_path / "store")
    manifest_id, _ = make_manifest(tmp_path, store_url, count)

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"stage": "vae"}) or 0.0

    names = ["stagetune_cache_items_encoded_total", "stagetune_cache_hits_total",
             "stagetune_cache_written_bytes_total", "stagetune_encode_batch_seconds_count",
             "stagetune_encode_batch_seconds_sum"]
    store = open_store(store_url)
    server = start_server([service_binding("vae", store)])
    channel = grpc.insecure_channel(server.address)
    try:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        runs = []
        for name in ("cold", "warm"):
            before = {n: sample(n) for n in names}
            events: list[common_pb2.Event] = []
            outputs = dict(run_job(stub, encode_request(manifest_id, tiny_sd3_path, name), events.append).outputs)
            runs.append((outputs, {n: sample(n) - before[n] for n in names}, events))
    finally:
        channel.close()
        server.stop(0)
        store.close()

    (cold, moved, events), (warm, warm_moved, warm_events) = runs
    assert int(cold["encoded"]) == count and int(cold["bytes_written"]) > 0
    assert moved["stagetune_cache_items_encoded_total"] == count
    assert moved["stagetune_cache_hits_total"] == 0
    assert moved["stagetune_cache_written_bytes_total"] == int(cold["bytes_written"])
    assert moved["stagetune_encode_batch_seconds_count"] == count // 2  # vae_batch_size 2, one image size
    assert moved["stagetune_encode_batch_seconds_sum"] > 0
    # Watch shows the encoding advance to the total, never backwards.
    done = [e.progress.done for e in events if e.HasField("progress") and e.progress.phase == "encoding latents"]
    # Progress events are throttled (core/jobs.py): the first and the last always arrive, in order.
    assert done[-1] == count and done == sorted(done) and len(done) >= 2

    assert int(warm["encoded"]) == 0 and int(warm["hits"]) == count
    assert warm_moved["stagetune_cache_hits_total"] == count
    for name in names:
        if name != "stagetune_cache_hits_total":
            assert warm_moved[name] == 0, name
    warm_done = [e.progress.done for e in warm_events if e.HasField("progress")]
    assert warm_done[-1] == count

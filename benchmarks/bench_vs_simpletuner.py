"""Caching and ingest throughput, stagetune against SimpleTuner 4.10.1 on the same tiny model and data.

Method (see benchmarks/README.md): one run times both systems back to back on one machine and reports
ratios. stagetune runs in a fresh process through its embedded gRPC services (ingest, then the vae job,
then the text job, one after the other so each gets every core, as in SimpleTuner); times come from the
jobs' own outputs (`seconds`, `load_seconds`, `encoded`, `hits`) and the client's wall clock per job.
SimpleTuner runs `python -m simpletuner.train` for 2 steps from its own venv; a `sitecustomize.py` that this
script writes (outside the repo) turns `Tensor.pin_memory` into a no-op (needed on CPU) and times, with
the wall clock, the SimpleTuner functions that do each phase: aspect bucketing, caption collection, text
embedding caching, VAE caching and the model loads. Then both run again against their warm caches.

    python benchmarks/bench_vs_simpletuner.py --simpletuner-venv /tmp/st-venv [--images 512] [--resolution 64 256]

The venv is created by benchmarks/simpletuner_setup.sh when it is missing (Python 3.12, ~7 GB, ~3 min).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# stagetune: ingest, vae, text as three jobs on the embedded servers, one after the other.
STAGETUNE_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import grpc
from stagetune.core.client import call, follow
from stagetune.core.store import open_store
from stagetune.pipeline import start_embedded
from stagetune.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, text_pb2, text_pb2_grpc, vae_pb2, vae_pb2_grpc
args = json.loads(sys.argv[1])
out = {"imported": time.perf_counter() - t0, "phases": {}}
servers = start_embedded(open_store(args["store"]))
channels = {name: grpc.insecure_channel(server.address) for name, server in servers.items()}
try:
    def phase(name, stub, request):
        started = time.perf_counter()
        job = follow(stub, call(stub.Start, request))
        out["phases"][name] = {**dict(job.outputs), "wall_seconds": time.perf_counter() - started}
        return out["phases"][name]
    ingested = phase("ingest", ingest_pb2_grpc.IngestServiceStub(channels["ingest"]), ingest_pb2.StartIngestRequest(
        request_id=args["tag"] + "-ingest", data_backend_config_json=json.dumps(args["backends"]),
        train_batch_size=1, seed=1))
    started = time.perf_counter()
    import diffusers, transformers  # imported here so that the jobs' load_seconds time model loading alone
    out["heavy_imports"] = time.perf_counter() - started
    model = common_pb2.ModelRef(name_or_path=args["model"], family="sd3")
    phase("vae", vae_pb2_grpc.VaeServiceStub(channels["vae"]), vae_pb2.StartEncodeLatentsRequest(
        request_id=args["tag"] + "-vae", manifest_id=ingested["manifest_id"], model=model,
        vae_batch_size=args["vae_batch"], write_batch_size=args["write_batch"]))
    phase("text", text_pb2_grpc.TextServiceStub(channels["text"]), text_pb2.StartEncodeTextRequest(
        request_id=args["tag"] + "-text", manifest_id=ingested["manifest_id"], model=model,
        max_sequence_length=154, batch_size=args["text_batch"], write_batch_size=args["write_batch"]))
    out["start_to_cached"] = time.perf_counter() - t0
finally:
    for channel in channels.values():
        channel.close()
    for server in servers.values():
        server.stop(0)
print(json.dumps(out))
"""

# Written next to the SimpleTuner config (never into the repo) and put on its PYTHONPATH.
SIMPLETUNER_HOOK = r'''
"""Benchmark hook for SimpleTuner (not SimpleTuner code): no-op pin_memory on CPU, and wall-clock timers
around the functions that do each phase, appended as JSON lines to $BENCH_TIMINGS."""
import functools, importlib.abc, importlib.util, json, os, sys, time

_OUT = os.environ.get("BENCH_TIMINGS")
_TARGETS = {
    "simpletuner.helpers.metadata.backends.base": [("MetadataBackend", "compute_aspect_ratio_bucket_indices")],
    "simpletuner.helpers.prompts": [("PromptHandler", "get_all_captions")],
    "simpletuner.helpers.caching.text_embeds": [("TextEmbeddingCache", "compute_embeddings_for_prompts")],
    "simpletuner.helpers.caching.vae": [("VAECache", "process_buckets")],
    "simpletuner.helpers.models.common": [("ModelFoundation", "load_vae"), ("ModelFoundation", "load_text_encoder")],
}


def _record(entry):
    with open(_OUT, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _wrap(name, fn, static):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            items = args[0 if static else 1] if len(args) > (0 if static else 1) else None
            _record({"name": name, "start": start, "end": time.time(),
                     "n": len(items) if isinstance(items, (list, tuple, dict, set)) else None})
    return staticmethod(timed) if static else timed


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, patches):
        self.inner, self.patches = inner, patches

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        for cls, meth in self.patches:
            klass = getattr(module, cls)
            static = isinstance(klass.__dict__.get(meth), staticmethod)
            setattr(klass, meth, _wrap(meth, getattr(klass, meth), static))


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        spec.loader = _Loader(spec.loader, _TARGETS[fullname])
        return spec


if _OUT:
    sys.meta_path.insert(0, _Finder())
    _record({"name": "process_start", "start": time.time(), "end": time.time(), "n": None})
    import torch
    torch.Tensor.pin_memory = lambda self, *a, **k: self
'''

SHAPES = [(320, 320), (384, 256), (256, 384), (400, 300), (300, 400), (448, 256), (512, 512), (640, 360)]


@dataclass
class Settings:
    root: Path
    model: Path
    images: int
    vae_batch: int
    text_batch: int
    write_batch: int
    venv: Path


@dataclass
class Measured:
    """One system's numbers at one resolution, cold and warm."""

    ingest_s: float = float("nan")
    vae_encode_s: float = float("nan")
    vae_encoded: int = 0
    text_encode_s: float = float("nan")
    text_encoded: int = 0
    load_s: float = float("nan")  # loading the VAE and the text encoders
    cache_cold_s: float = float("nan")  # the caching phase, cold, model loads included
    cache_warm_s: float = float("nan")
    warm_encoded: str = ""
    start_to_cached_s: float = float("nan")  # process start (after interpreter start-up) to both caches complete
    extra: dict[str, Any] = field(default_factory=dict)


def make_data(folder: Path, images: int, seed: int = 0) -> None:
    """Random-pixel JPEGs in 8 sizes/aspects, each with a distinct `.txt` caption; another `seed` gives other
    pixels and captions (nothing a cache already holds)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == images:
        return
    for old in folder.iterdir():
        old.unlink()
    rng = np.random.default_rng(seed)
    take = f", take {seed}" if seed else ""
    for i in range(images):
        w, h = SHAPES[i % len(SHAPES)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i:05d}.jpg", quality=90)
        (folder / f"img_{i:05d}.txt").write_text(
            f"a photo number {i} of a scene with {i % 7} things, style {i % 5}{take}")


def dataset_entry(instance_dir: Path, resolution: int) -> dict[str, Any]:
    return {"id": "bench", "type": "local", "crop": True, "crop_aspect": "preserve", "crop_style": "center",
            "resolution": resolution, "resolution_type": "pixel_area", "minimum_image_size": 0,
            "instance_data_dir": str(instance_dir), "caption_strategy": "textfile"}


# ---------------------------------------------------------------- stagetune


def run_stagetune(s: Settings, resolution: int, store: Path, tag: str) -> dict[str, Any]:
    backends = [dataset_entry(s.root / "data", resolution),
                {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True}]
    args = {"store": str(store), "model": str(s.model), "tag": tag, "backends": backends, "vae_batch": s.vae_batch,
            "text_batch": s.text_batch, "write_batch": s.write_batch}
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    out = subprocess.run([sys.executable, "-c", STAGETUNE_CHILD, json.dumps(args)], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        sys.exit(f"stagetune run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def stagetune_measured(cold: dict[str, Any], warm: dict[str, Any]) -> Measured:
    c, w = cold["phases"], warm["phases"]
    m = Measured()
    m.ingest_s = c["ingest"]["wall_seconds"]
    m.vae_encode_s = float(c["vae"]["seconds"]) - float(c["vae"]["load_seconds"])
    m.vae_encoded = int(c["vae"]["encoded"])
    m.text_encode_s = float(c["text"]["seconds"]) - float(c["text"]["load_seconds"])
    m.text_encoded = int(c["text"]["encoded"])
    m.load_s = float(c["vae"]["load_seconds"]) + float(c["text"]["load_seconds"])
    m.cache_cold_s = c["vae"]["wall_seconds"] + c["text"]["wall_seconds"]
    m.cache_warm_s = w["vae"]["wall_seconds"] + w["text"]["wall_seconds"]
    m.warm_encoded = f"{w['vae']['encoded']} latents, {w['text']['encoded']} embeddings encoded"
    m.start_to_cached_s = cold["start_to_cached"]
    m.extra = {"warm_ingest_s": w["ingest"]["wall_seconds"], "imports_s": cold["imported"] + cold["heavy_imports"]}
    return m


# ---------------------------------------------------------------- SimpleTuner


def simpletuner_ready(venv: Path) -> bool:
    python = venv / "bin" / "python"
    return python.exists() and subprocess.run([str(python), "-c", "import simpletuner"], capture_output=True,
                                              check=False).returncode == 0


def ensure_simpletuner(venv: Path) -> None:
    if simpletuner_ready(venv):
        return
    print(f"creating the SimpleTuner venv at {venv} (benchmarks/simpletuner_setup.sh)", file=sys.stderr)
    subprocess.run(["bash", str(HERE / "simpletuner_setup.sh"), str(venv)], check=True)


def simpletuner_version(venv: Path) -> str:
    code = ("import importlib.metadata as m, torch; "
            "print(m.version('simpletuner'), torch.__version__, m.version('transformers'))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=False)
    parts = out.stdout.split()
    return f"SimpleTuner {parts[0]}, torch {parts[1]}, transformers {parts[2]}" if len(parts) == 3 else "unknown"


def prepare_simpletuner(s: Settings, resolution: int) -> Path:
    """A config folder, hook and fresh copy (hard links) of the data, since SimpleTuner writes into it."""
    work = s.root / f"simpletuner-{resolution}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "config").mkdir(parents=True)
    (work / "hook").mkdir()
    (work / "hook" / "sitecustomize.py").write_text(SIMPLETUNER_HOOK)
    data = work / "data"
    data.mkdir()
    for item in (s.root / "data").iterdir():
        os.link(item, data / item.name)
    config = {
        "model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": str(s.model),
        "output_dir": str(work / "output"), "data_backend_config": str(work / "config" / "multidatabackend.json"),
        "seed": 1, "train_batch_size": 1, "max_train_steps": 2, "num_train_epochs": 0, "learning_rate": 1e-4,
        "lr_scheduler": "constant", "optimizer": "torch-adamw", "mixed_precision": "no",
        "base_model_precision": "no_change", "base_model_default_dtype": "fp32", "lora_rank": 16, "vae_dtype": "fp32",
        "vae_batch_size": s.vae_batch, "text_encoder_batch_size": s.text_batch, "write_batch_size": s.write_batch,
        "checkpointing_steps": 100_000, "validation_step_interval": 100_000, "validation_disable": True,
        "report_to": "none", "resolution": resolution, "resolution_type": "pixel_area", "minimum_image_size": 0,
        "tokenizer_max_length": 154,
    }
    backends = [
        {**dataset_entry(data, resolution), "cache_dir_vae": str(work / "cache" / "vae")},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(work / "cache" / "text"), "write_batch_size": s.write_batch},
    ]
    (work / "config" / "config.json").write_text(json.dumps(config, indent=1))
    (work / "config" / "multidatabackend.json").write_text(json.dumps(backends, indent=1))
    return work


def run_simpletuner(s: Settings, work: Path, tag: str) -> dict[str, Any]:
    timings = work / f"timings-{tag}.jsonl"
    timings.unlink(missing_ok=True)
    shutil.rmtree(work / "output", ignore_errors=True)
    env = dict(os.environ, MIXED_PRECISION="no", CONFIG_BACKEND="json", CONFIG_PATH=str(work / "config" / "config"),
               PYTHONPATH=str(work / "hook"), BENCH_TIMINGS=str(timings), PYTHONWARNINGS="ignore")
    env.pop("VIRTUAL_ENV", None)
    started = time.time()
    with open(work / f"log-{tag}.txt", "w") as log:
        rc = subprocess.run([str(s.venv / "bin" / "python"), "-m", "simpletuner.train"], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        sys.exit(f"SimpleTuner run failed (rc {rc}); see {work / f'log-{tag}.txt'}")
    calls: dict[str, list[dict[str, Any]]] = {}
    for line in timings.read_text().splitlines():
        entry = json.loads(line)
        calls.setdefault(entry["name"], []).append(entry)
    return {"calls": calls, "wall": time.time() - started,
            "vae_files": len(list((work / "cache" / "vae").rglob("*.pt"))),
            "text_files": len(list((work / "cache" / "text").rglob("*.pt")))}


def _total(run: dict[str, Any], name: str) -> float:
    return sum(c["end"] - c["start"] for c in run["calls"].get(name, []))


def simpletuner_measured(cold: dict[str, Any], warm: dict[str, Any]) -> Measured:
    m = Measured()
    bucketing, captions = _total(cold, "compute_aspect_ratio_bucket_indices"), _total(cold, "get_all_captions")
    m.ingest_s = bucketing + captions
    m.vae_encode_s = _total(cold, "process_buckets")
    m.vae_encoded = cold["vae_files"]
    m.text_encode_s = _total(cold, "compute_embeddings_for_prompts")
    m.text_encoded = cold["text_files"]
    m.load_s = _total(cold, "load_vae") + _total(cold, "load_text_encoder")
    m.cache_cold_s = m.vae_encode_s + m.text_encode_s + m.load_s
    phases = [c for name in ("process_buckets", "compute_embeddings_for_prompts") for c in cold["calls"].get(name, [])]
    m.start_to_cached_s = max(c["end"] for c in phases) - cold["calls"]["process_start"][0]["start"]
    m.cache_warm_s = (_total(warm, "process_buckets") + _total(warm, "compute_embeddings_for_prompts")
                      + _total(warm, "load_vae") + _total(warm, "load_text_encoder"))
    m.warm_encoded = (f"{warm['vae_files'] - cold['vae_files']} new latent files, "
                      f"{warm['text_files'] - cold['text_files']} new embedding files")
    m.extra = {"bucketing_s": bucketing, "captions_s": captions, "wall_s": cold["wall"],
               "warm_ingest_s": _total(warm, "compute_aspect_ratio_bucket_indices") + _total(warm, "get_all_captions")}
    return m


# ---------------------------------------------------------------- report


def _ratio(ours: float, theirs: float, higher_is_better: bool) -> str:
    if not (ours > 0 and theirs > 0):
        return "n/a"
    return f"{(ours / theirs if higher_is_better else theirs / ours):.2f}×"


def rows_for(resolution: int, st: Measured, ref: Measured, images: int) -> list[tuple[str, str, str, str]]:
    def rate(n: int, seconds: float) -> float:
        return n / seconds if seconds > 0 else float("nan")

    ours_cache = st.vae_encode_s + st.text_encode_s
    ref_cache = ref.vae_encode_s + ref.text_encode_s
    return [
        (f"**{resolution} px pixel_area**", "", "", ""),
        ("ingest (s)", f"{st.ingest_s:.3f}", f"{ref.ingest_s:.3f}", _ratio(st.ingest_s, ref.ingest_s, False)),
        ("ingest throughput (images/s)", f"{rate(images, st.ingest_s):.0f}", f"{rate(images, ref.ingest_s):.0f}",
         _ratio(rate(images, st.ingest_s), rate(images, ref.ingest_s), True)),
        ("VAE caching (images/s, encode+write, load excluded)", f"{rate(st.vae_encoded, st.vae_encode_s):.1f}",
         f"{rate(ref.vae_encoded, ref.vae_encode_s):.1f}",
         _ratio(rate(st.vae_encoded, st.vae_encode_s), rate(ref.vae_encoded, ref.vae_encode_s), True)),
        ("text caching (captions/s, encode+write, load excluded)", f"{rate(st.text_encoded, st.text_encode_s):.1f}",
         f"{rate(ref.text_encoded, ref.text_encode_s):.1f}",
         _ratio(rate(st.text_encoded, st.text_encode_s), rate(ref.text_encoded, ref.text_encode_s), True)),
        ("caching, VAE + text, load excluded (s)", f"{ours_cache:.2f}", f"{ref_cache:.2f}",
         _ratio(ours_cache, ref_cache, False)),
        ("model loads for caching (s)", f"{st.load_s:.2f}", f"{ref.load_s:.2f}", _ratio(st.load_s, ref.load_s, False)),
        ("caching phase cold, loads included (s)", f"{st.cache_cold_s:.2f}", f"{ref.cache_cold_s:.2f}",
         _ratio(st.cache_cold_s, ref.cache_cold_s, False)),
        (
            "cold run: process start to both caches complete (s)",
            f"{st.start_to_cached_s:.1f}",
            f"{ref.start_to_cached_s:.1f}",
            _ratio(st.start_to_cached_s, ref.start_to_cached_s, False),
        ),
        ("caching phase warm rerun (s)", f"{st.cache_warm_s:.3f}", f"{ref.cache_warm_s:.3f}",
         _ratio(st.cache_warm_s, ref.cache_warm_s, False)),
        ("warm rerun: caching cold / warm (×)", f"{st.cache_cold_s / st.cache_warm_s:.0f}×",
         f"{ref.cache_cold_s / ref.cache_warm_s:.0f}×", ""),
        ("warm rerun: work done", st.warm_encoded, ref.warm_encoded, ""),
        ("entries cached cold (latents / embeddings)", f"{st.vae_encoded} / {st.text_encoded}",
         f"{ref.vae_encoded} / {ref.text_encoded}", ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--simpletuner-venv", type=Path, default=Path("/tmp/st-venv"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--resolution", type=int, nargs="+", default=[64])
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--text-batch", type=int, default=16)
    parser.add_argument("--write-batch", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    ensure_simpletuner(args.simpletuner_venv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="stagetune-vs-st-"))
    root.mkdir(parents=True, exist_ok=True)
    from stagetune.models.sd3.tiny import build_tiny_sd3

    model = root / "model"
    if not (model / "model_index.json").exists():
        build_tiny_sd3(model)
    make_data(root / "data", args.images)
    s = Settings(root=root, model=model, images=args.images, vae_batch=args.vae_batch, text_batch=args.text_batch,
                 write_batch=args.write_batch, venv=args.simpletuner_venv)

    import torch

    load = os.getloadavg()[0]
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip() or "unknown"
    rows: list[tuple[str, str, str, str]] = []
    extras: list[str] = []
    for resolution in args.resolution:
        store = root / f"store-{resolution}"
        shutil.rmtree(store, ignore_errors=True)
        work = prepare_simpletuner(s, resolution)
        print(f"[{resolution} px] stagetune cold …", file=sys.stderr)
        st_cold = run_stagetune(s, resolution, store, f"cold{resolution}")
        print(f"[{resolution} px] SimpleTuner cold …", file=sys.stderr)
        ref_cold = run_simpletuner(s, work, "cold")
        print(f"[{resolution} px] stagetune warm …", file=sys.stderr)
        st_warm = run_stagetune(s, resolution, store, f"warm{resolution}")
        print(f"[{resolution} px] SimpleTuner warm …", file=sys.stderr)
        ref_warm = run_simpletuner(s, work, "warm")
        st, ref = stagetune_measured(st_cold, st_warm), simpletuner_measured(ref_cold, ref_warm)
        rows += rows_for(resolution, st, ref, args.images)
        extras.append(
            f"{resolution} px: SimpleTuner ingest = bucketing {ref.extra['bucketing_s']:.3f} s + caption collection "
            f"{ref.extra['captions_s']:.3f} s; its whole cold run took {ref.extra['wall_s']:.1f} s wall. "
            f"stagetune imports (stagetune, grpc, then diffusers + transformers): {st.extra['imports_s']:.1f} s. "
            f"Warm ingest: stagetune {st.extra['warm_ingest_s']:.3f} s, SimpleTuner {ref.extra['warm_ingest_s']:.3f} s."
        )

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU, shared with other "
          f"jobs (1-min load average {load:.1f} at start); stagetune {commit} on Python {platform.python_version()}, "
          f"torch {torch.__version__}; {simpletuner_version(args.simpletuner_venv)} on Python 3.12. "
          f"{args.images} images, VAE batch {args.vae_batch}, text batch {args.text_batch}, "
          f"write batch {args.write_batch}, float32 VAE and text encoders on both sides.\n")
    print("| measure | stagetune | SimpleTuner | stagetune advantage |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    for line in extras:
        print(f"- {line}")


if __name__ == "__main__":
    main()

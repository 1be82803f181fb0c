"""End-to-end pipeline benchmark: cold start to first step, steady step time, caching throughput.

Method (see benchmarks/README.md): every measurement runs `stagetune`'s embedded pipeline in a fresh
Python process, so imports are cold, against a fresh store. The same dataset then runs a second time
against the same store to time the warm caching phase. Times come from the services' own Watch
events, taken on the client side.

    python benchmarks/bench_pipeline.py [--images 64] [--resolution 64] [--steps 30] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = float(sys.argv[1])
from pathlib import Path
from stagetune.core.store import open_store
from stagetune.pipeline import run_training, start_embedded
imported = time.time()
marks = {"imported": imported - t0}
steps = []
def on_event(phase, event):
    kind = event.WhichOneof("body")
    if phase == "trainer" and kind == "metric" and event.metric.name == "loss":
        steps.append(time.time() - t0)
store = open_store(sys.argv[3])
servers = start_embedded(store)
marks["servers_up"] = time.time() - t0
try:
    run = run_training(Path(sys.argv[2]), {n: s.address for n, s in servers.items()}, on_event=on_event)
finally:
    for s in servers.values():
        s.stop(0)
marks["done"] = time.time() - t0
print(json.dumps({"marks": marks, "steps": steps,
                  "phases": {p.name: {**p.outputs, "wall_seconds": p.seconds} for p in run.phases}}))
"""


def make_data(root: Path, images: int) -> None:
    import numpy as np
    from PIL import Image

    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = [(320, 320), (384, 256), (256, 384), (400, 300), (300, 400), (448, 256)]
    for i in range(images):
        w, h = shapes[i % len(shapes)]
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:05d}.jpg", quality=90)
        (folder / f"img_{i:05d}.txt").write_text(f"a photo number {i} of something {i % 7}")


def write_config(root: Path, model: Path, *, resolution: int, steps: int) -> Path:
    config = {
        "model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": str(model),
        "output_dir": str(root / "output"), "data_backend_config": str(root / "multidatabackend.json"),
        "seed": 1, "train_batch_size": 2, "max_train_steps": steps, "learning_rate": 1e-4,
        "lr_scheduler": "constant", "optimizer": "adamw", "mixed_precision": "no", "lora_rank": 16,
        "checkpointing_steps": 10_000, "resume_from_checkpoint": "latest", "vae_batch_size": 8,
        "text_encoder_batch_size": 16, "write_batch_size": 64, "gradient_checkpointing": False,
    }
    datasets = [
        {"id": "bench", "type": "local", "crop": True, "crop_aspect": "preserve", "crop_style": "center",
         "resolution": resolution, "resolution_type": "pixel_area", "minimum_image_size": 0,
         "instance_data_dir": str(root / "data"), "caption_strategy": "textfile"},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True},
    ]
    (root / "config.json").write_text(json.dumps(config, indent=1))
    (root / "multidatabackend.json").write_text(json.dumps(datasets, indent=1))
    return root / "config.json"


def run_child(config: Path, store: Path) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, repr(t0), str(config), str(store)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        sys.exit(f"benchmark run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rate(phase: dict) -> str:
    seconds = float(phase["seconds"]) - float(phase["load_seconds"])
    return f"{int(phase['encoded']) / seconds:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="stagetune-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    from stagetune.models.sd3.tiny import build_tiny_sd3

    model = root / "model"
    if not model.exists():
        build_tiny_sd3(model)
    make_data(root, args.images)
    config = write_config(root, model, resolution=args.resolution, steps=args.steps)

    import shutil

    shutil.rmtree(root / "store", ignore_errors=True)
    cold = run_child(config, root / "store")
    shutil.rmtree(root / "output", ignore_errors=True)
    warm = run_child(config, root / "store")

    steps = cold["steps"]
    steady = (steps[-1] - steps[4]) / (len(steps) - 5) if len(steps) > 5 else float("nan")
    cache_cold = max(cold["phases"]["vae"]["wall_seconds"], cold["phases"]["text"]["wall_seconds"])
    cache_warm = max(warm["phases"]["vae"]["wall_seconds"], warm["phases"]["text"]["wall_seconds"])
    rows = [
        ("machine", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch CPU"),
        ("images / resolution / steps", f"{args.images} / {args.resolution} px pixel_area / {args.steps}"),
        ("imports (s)", f"{cold['marks']['imported']:.2f}"),
        ("cold start to first step (s)", f"{steps[0]:.2f}"),
        ("steady step time (s/step, batch 2)", f"{steady:.4f}"),
        ("ingest (s)", f"{cold['phases']['ingest']['wall_seconds']:.2f}"),
        ("VAE caching, cold (images/s, after model load)", _rate(cold["phases"]["vae"])),
        ("text caching, cold (captions/s, after model load)", _rate(cold["phases"]["text"])),
        ("model load in the caching stages (s: vae / text)",
         f"{float(cold['phases']['vae']['load_seconds']):.2f} / {float(cold['phases']['text']['load_seconds']):.2f}"),
        ("caching phase cold / warm (s)", f"{cache_cold:.2f} / {cache_warm:.3f}"),
        ("warm rerun: entries encoded", f"{warm['phases']['vae']['encoded']} latents, "
                                        f"{warm['phases']['text']['encoded']} embeddings"),
    ]
    print("| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()

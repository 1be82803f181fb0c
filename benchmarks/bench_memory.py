"""Peak memory of stagetune's trainer by base-model precision (and SimpleTuner's on the same config files).

Method (see benchmarks/README.md): the compute-size random SD3 (`stagetune tiny-model sd3 --size compute`,
a 6 × 768 MMDiT) trains a LoRA (rank 16, torch-adamw, batch 2, 256 px) with `stagetune train --config`, once
per base precision:
- `bf16`: `mixed_precision: bf16`, `base_model_precision: no_change` (the base in bfloat16);
- `fp32`: `mixed_precision: no`, `no_change` (for reference; `--precisions` adds it);
- `int8-quanto`, `int4-quanto`, `fp8-quanto`: the base quantised by optimum-quanto over
  `base_model_default_dtype: bf16` (SimpleTuner's default), under bf16 mixed precision.
Runs are cold (fresh store, caches and output) and measured as bench_train_vs_simpletuner.py measures them:
the same step hook on PYTHONPATH, the process tree's RSS polled every 50 ms. With `--simpletuner`, SimpleTuner
4.10.1 trains on the same config files (paths changed only), alternating with stagetune.

On CPU the measure is peak RSS: of the whole `stagetune train` process (all five services run in it), and of
the same process between the first and the last training step (the trainer's share). Where CUDA is available
the step hook also records `torch.cuda.max_memory_allocated()`, and `--large` (the default there) adds an
SD3.5-Large-shaped random model (38 layers × 2432, qk RMSNorm; tiny text encoders and VAE) trained at
1024 px, batch 1, with MFU per step: the step's FLOPs (counted by torch's FlopCounterMode on the meta device
for the same LoRA forward and backward) / the median step time / the GPU's dense bf16 peak.

int4-quanto builds optimum-quanto's C++ extension at its first use after an install (needs g++; it is
written into the optimum-quanto package folder, so each venv builds it once): the first int4 run of each
side is a warm-up that is not counted, and its time is reported.

    python benchmarks/bench_memory.py [--precisions bf16,int8-quanto,int4-quanto,fp8-quanto] [--repeats 3]
        [--steps 8] [--simpletuner] [--simpletuner-venv /tmp/st-venv] [--large | --no-large] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_train_vs_simpletuner import (  # noqa: E402
    RunResult,
    add_quiet_options,
    bench_from_args,
    build_model,
    copy_pair,
    write_pair,
)
from bench_vs_simpletuner import make_data, simpletuner_ready, simpletuner_version  # noqa: E402

#: What each precision sets in the common config (bench_train_vs_simpletuner.common_config).
PRECISIONS: dict[str, dict[str, Any]] = {
    "fp32": {"mixed_precision": "no", "base_model_precision": "no_change"},
    "bf16": {"mixed_precision": "bf16", "base_model_precision": "no_change"},
    **{name: {"mixed_precision": "bf16", "base_model_precision": name, "base_model_default_dtype": "bf16"}
       for name in ("int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto")},
}
LORA = {"lora_type": "standard", "lora_rank": 16, "lora_alpha": 16}

#: Dense bf16 tensor peak (FLOP/s) by GPU name, for MFU; `--peak-tflops` overrides.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "4090": 165e12, "B200": 2250e12}

#: SD3.5 Large's MMDiT (stabilityai/stable-diffusion-3.5-large transformer/config.json), except the two input
#: widths that follow the tiny text encoders (joint_attention_dim, pooled_projection_dim).
#: caption_projection_dim is the width, heads × head width (2432).
SD35_LARGE = {"num_layers": 38, "num_attention_heads": 38, "attention_head_dim": 64, "qk_norm": "rms_norm",
              "pos_embed_max_size": 192, "sample_size": 128}


# ---------------------------------------------------------------- models and FLOPs


def large_transformer_config() -> dict[str, Any]:
    from stagetune.models.sd3.tiny import TINY_SD3, transformer_config

    config = {**transformer_config(TINY_SD3), **SD35_LARGE}
    config["caption_projection_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    return config


def build_large(workdir: Path) -> Path:
    """The tiny pipeline with its transformer replaced by an SD3.5-Large-shaped one (bf16, random; ~16 GB)."""
    import torch
    from diffusers import SD3Transformer2DModel

    model = workdir / "models" / "sd35-large-shaped"
    if (model / "transformer" / "config.json").exists() and (model / "model_index.json").exists():
        return model
    from stagetune.models.sd3.tiny import build_tiny_sd3

    shutil.rmtree(model, ignore_errors=True)
    build_tiny_sd3(model, size="tiny")
    shutil.rmtree(model / "transformer")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(**large_transformer_config()).to(torch.bfloat16)
    transformer.save_pretrained(model / "transformer", safe_serialization=True, max_shard_size="5GB")
    del transformer
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def lora_step_flops(config: dict[str, Any], *, batch: int, resolution: int, text_tokens: int = 77 + 154) -> float:
    """FLOPs of one LoRA training step (forward and backward, frozen base) counted on the meta device."""
    import torch
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    latent = resolution // 8
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        inputs = {
            "hidden_states": torch.randn(batch, config["in_channels"], latent, latent),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config["joint_attention_dim"]),
            "pooled_projections": torch.randn(batch, config["pooled_projection_dim"]),
            "timestep": torch.rand(batch) * 1000,
        }
        with FlopCounterMode(display=False) as counter:
            model(**inputs)[0].float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def peak_flops(override_tflops: float | None) -> float | None:
    import torch

    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def make_square_data(folder: Path, images: int, size: int) -> None:
    """Random square JPEGs at `size` px with distinct captions (for 1024 px training)."""
    import numpy as np
    from PIL import Image

    if folder.exists() and len(list(folder.glob("*.jpg"))) == images:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i:05d}.jpg",
                                                                                  quality=90)
        (folder / f"img_{i:05d}.txt").write_text(f"a photo number {i} of a scene with {i % 7} things")


# ---------------------------------------------------------------- report


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _fmt(value: float, digits: int) -> str:
    return "—" if value != value else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--precisions", default="bf16,int8-quanto,int4-quanto,fp8-quanto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--simpletuner", action="store_true", help="also run SimpleTuner on the same config files")
    parser.add_argument("--simpletuner-venv", type=Path, default=Path("/tmp/st-venv"))
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=None,
                        help="also train the SD3.5-Large-shaped model at 1024 px (default: when CUDA is available)")
    parser.add_argument("--large-steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--commit", default=None,
                        help="the stagetune commit measured (default: git describe where stagetune is imported from)")
    add_quiet_options(parser)
    args = parser.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    for name in precisions:
        if name not in PRECISIONS:
            parser.error(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")

    import torch

    import stagetune

    cuda = torch.cuda.is_available()
    large = cuda if args.large is None else args.large
    if args.simpletuner and not simpletuner_ready(args.simpletuner_venv):
        parser.error(f"no SimpleTuner venv at {args.simpletuner_venv} (benchmarks/simpletuner_setup.sh makes one)")
    workdir, bench = bench_from_args(args, "stagetune-memory-")
    load = os.getloadavg()[0]

    # (model name, model folder, resolution, batch, steps, pristine data, FLOPs per step)
    from stagetune.models.sd3.tiny import COMPUTE_SD3, transformer_config

    setups = [("compute", build_model(workdir, "compute"), 256, args.batch, args.steps, workdir / "data" / "compute",
               lora_step_flops(transformer_config(COMPUTE_SD3), batch=args.batch, resolution=256))]
    if not (workdir / "data" / "compute").exists():
        make_data(workdir / "data" / "compute", args.images)
    if large:
        make_square_data(workdir / "data" / "large", 8, 1024)
        setups.append(("sd35-large-shaped", build_large(workdir), 1024, 1, args.large_steps, workdir / "data" / "large",
                       lora_step_flops(large_transformer_config(), batch=1, resolution=1024)))
    peak = peak_flops(args.peak_tflops)

    sides = ["simpletuner", "stagetune"] if args.simpletuner else ["stagetune"]
    results: dict[tuple[str, str], dict[str, list[RunResult]]] = {}
    warmups: list[str] = []
    for model_name, model, resolution, batch, steps, pristine, _ in setups:
        for precision in precisions:
            overrides = {**LORA, **PRECISIONS[precision]}
            root = workdir / f"{model_name}-{precision}"
            st_root, our_root = root / "simpletuner", root / "stagetune"
            write_pair(st_root, model, overrides, resolution, steps, batch)
            copy_pair(st_root, our_root)
            runs: dict[str, list[RunResult]] = {side: [] for side in sides}
            results[(model_name, precision)] = runs
            if precision in ("int4-quanto", "int2-quanto"):
                for side in sides:  # builds optimum-quanto's extension if this venv has not yet (not counted)
                    started = time.time()
                    run = (bench.simpletuner(st_root, pristine, "compile") if side == "simpletuner"
                           else bench.stagetune_run(our_root, pristine, "compile"))  # no quiet wait: not measured
                    warmups.append(f"{model_name}/{precision} {side}: warm-up run (kernel compile if needed) "
                                   f"{time.time() - started:.0f} s{'' if run.ok else ', failed: ' + run.note}")
            for rep in range(args.repeats):
                for side in sides:
                    print(f"[{model_name}/{precision}] {side} run {rep + 1}/{args.repeats} …", file=sys.stderr,
                          flush=True)
                    run = bench.run(side, st_root if side == "simpletuner" else our_root, pristine, f"r{rep}")
                    runs[side].append(run)
                    print(f"    peak {_fmt(run.peak_rss_gb, 2)} GB, training {_fmt(run.train_rss_gb, 2)} GB, "
                          f"steady {_fmt(run.steady_s, 3)} s/step, CUDA {_fmt(run.cuda_max_gb, 2)} GB"
                          f"{'' if run.ok else ' — ' + run.note}", file=sys.stderr, flush=True)

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if cuda else "no GPU"
    commit = args.commit or subprocess.run(
        ["git", "-C", str(Path(stagetune.__file__).parent), "describe", "--always", "--dirty", "--abbrev=7"],
        capture_output=True, text=True, check=False).stdout.strip() or "unknown"
    st_version = f"; {simpletuner_version(args.simpletuner_venv)}" if args.simpletuner else ""
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {gpu}; 1-min load average "
          f"{load:.1f} at start. stagetune {commit} ({Path(stagetune.__file__).parent}) on Python "
          f"{platform.python_version()}, torch {torch.__version__}{st_version}. LoRA r16, torch-adamw; medians of "
          f"{args.repeats} runs; steady = median step gap after {args.warmup}.\n")
    header = ["model", "precision", "stagetune peak RSS (GB)", "stagetune RSS while training (GB)"]
    if args.simpletuner:
        header += ["SimpleTuner peak RSS (GB)", "SimpleTuner RSS while training (GB)", "SimpleTuner / stagetune (peak)"]
    header += ["stagetune s/step"] + (["SimpleTuner s/step"] if args.simpletuner else [])
    if cuda:
        header += ["stagetune CUDA max allocated (GB)"] + (["SimpleTuner CUDA max allocated (GB)"]
                                                          if args.simpletuner else [])
    header += ["stagetune TFLOP/s", "stagetune MFU"] if cuda else ["stagetune GFLOP/s"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    flops_by_model = {name: flops for name, *_, flops in setups}
    for (model_name, precision), runs in results.items():
        ours = [r for r in runs["stagetune"] if r.ok]
        theirs = [r for r in runs.get("simpletuner", []) if r.ok]

        def cell(rs: list[RunResult], attr: str, digits: int, side_runs: list[RunResult]) -> str:
            if not side_runs:
                return ""
            return _fmt(_median([getattr(r, attr) for r in rs]), digits) if rs else "failed"

        row = [model_name, precision, cell(ours, "peak_rss_gb", 2, runs["stagetune"]),
               cell(ours, "train_rss_gb", 2, runs["stagetune"])]
        if args.simpletuner:
            a, b = _median([r.peak_rss_gb for r in theirs]), _median([r.peak_rss_gb for r in ours])
            row += [cell(theirs, "peak_rss_gb", 2, runs["simpletuner"]),
                    cell(theirs, "train_rss_gb", 2, runs["simpletuner"]),
                    f"{a / b:.2f}×" if a > 0 and b > 0 else "—"]
        row.append(cell(ours, "steady_s", 3, runs["stagetune"]))
        if args.simpletuner:
            row.append(cell(theirs, "steady_s", 3, runs["simpletuner"]))
        if cuda:
            row.append(cell(ours, "cuda_max_gb", 2, runs["stagetune"]))
            if args.simpletuner:
                row.append(cell(theirs, "cuda_max_gb", 2, runs["simpletuner"]))
        step = _median([r.steady_s for r in ours])
        achieved = flops_by_model[model_name] / step if step > 0 else float("nan")
        if cuda:
            row += [_fmt(achieved / 1e12, 1), f"{achieved / peak:.1%}" if peak and achieved == achieved else "—"]
        else:
            row.append(_fmt(achieved / 1e9, 0))
        print("| " + " | ".join(row) + " |")
    print()
    for name, flops in flops_by_model.items():
        print(f"- {name}: {flops / 1e9:.0f} GFLOP per training step (FlopCounterMode, forward + backward, LoRA)")
    if cuda and not peak:
        print("- MFU: unknown peak for this GPU; pass --peak-tflops")
    for line in warmups:
        print(f"- {line}")
    for (model_name, precision), runs in results.items():
        for side, side_runs in runs.items():
            failed = [r for r in side_runs if not r.ok]
            if failed:
                print(f"- {model_name}/{precision}: {side} failed {len(failed)} of {len(side_runs)} runs; log "
                      f"{failed[0].log}: {failed[0].note}")
            loads = ", ".join(_fmt(r.foreign_load, 2) + (f" ({r.attempts} tries)" if r.attempts > 1 else "")
                              for r in side_runs)
            print(f"- {model_name}/{precision} {side}: peaks {', '.join(_fmt(r.peak_rss_gb, 2) for r in side_runs)} GB;"
                  f" other jobs' load {loads} cores")
    if args.json:
        args.json.write_text(json.dumps({f"{m}/{p}": {s: [vars(r) for r in rs] for s, rs in runs.items()}
                                         for (m, p), runs in results.items()}, indent=1))


if __name__ == "__main__":
    main()

"""Scaling of stagetune's training with 1 → N processes on one machine, at the same global batch.

Method (benchmarks/README.md): the SD3 LoRA config of bench_train_vs_simpletuner.py, run with
`num_processes` N and `train_batch_size` = global batch / N, so every run trains the same samples per step;
stagetune only (SimpleTuner's own launcher is accelerate's, not what this measures). Runs, timing hook, quiet
gate and RSS poller are bench_train_vs_simpletuner.py's; steady = median gap between rank 0's optimizer steps.

    python benchmarks/bench_processes.py [--sizes tiny,compute] [--processes 1,2] [--global-batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_train_vs_simpletuner import (  # noqa: E402
    SIZES,
    VARIANTS,
    RunResult,
    add_quiet_options,
    bench_from_args,
    build_model,
    make_data,
    write_pair,
)


def _median(results: list[RunResult], attribute: str) -> float:
    values = [getattr(r, attribute) for r in results if r.ok]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", default="tiny,compute")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: tiny 30, compute 12)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--workdir", type=Path, default=None)
    add_quiet_options(parser)
    args = parser.parse_args()
    args.simpletuner_venv = None
    import torch

    workdir, bench = bench_from_args(args, "stagetune-bench-processes-")
    rows = []
    for size in [s for s in args.sizes.split(",") if s]:
        model = build_model(workdir, size)
        pristine = workdir / "data" / size
        if not pristine.exists():
            make_data(pristine, args.images)
        steps = args.steps or SIZES[size]["steps"]
        for count in [int(n) for n in args.processes.split(",") if n]:
            if args.global_batch % count:
                sys.exit(f"--global-batch {args.global_batch} does not split over {count} processes")
            per = args.global_batch // count
            root = workdir / f"{size}-{count}"
            write_pair(root, model, {**VARIANTS["lora"], "num_processes": count, "lora_dropout": 0.0},
                       SIZES[size]["resolution"], steps, per)
            results = []
            for rep in range(args.repeats):
                print(f"[{size}] {count} process(es) × batch {per}, run {rep + 1}/{args.repeats} …", file=sys.stderr,
                      flush=True)
                result = bench.run("stagetune", root, pristine, f"r{rep}")
                print(f"    first step {result.first_step_s:.1f} s, steady {result.steady_s:.3f} s/step, peak "
                      f"{result.peak_rss_gb:.2f} GB, other jobs' load {result.foreign_load:.2f} cores"
                      f"{'' if result.ok else ' — ' + result.note}", file=sys.stderr, flush=True)
                results.append(result)
            rows.append((size, count, per, results))

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; torch {torch.__version__}; "
          f"global batch {args.global_batch}; medians of {args.repeats} runs.\n")
    print("| size | processes | batch per process | steady (s/step) | steps/s | samples/s | speed-up vs 1 process "
          "| first step (s) | peak RSS, all processes (GB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    single: dict[str, float] = {}
    for size, count, per, results in rows:
        steady = _median(results, "steady_s")
        if count == 1:
            single[size] = steady
        speedup = single.get(size, float("nan")) / steady
        print(f"| {size} | {count} | {per} | {steady:.3f} | {1 / steady:.2f} | {args.global_batch / steady:.1f} | "
              f"{speedup:.2f}× | {_median(results, 'first_step_s'):.1f} | {_median(results, 'peak_rss_gb'):.2f} |")


if __name__ == "__main__":
    main()

"""Time to the first training step when the services are already running (a deployment, `stagetune serve`),
against the cold `stagetune train` process that bench_train_vs_simpletuner.py measures.

Method (benchmarks/README.md): one process starts the five services once (the embedded mode's servers on
loopback, what `stagetune serve` runs) on one store. A first run on its own data warms them: libraries
imported, encoders loaded. Then, per repeat, a new run on new images and captions (nothing cached) and a
rerun of it (everything cached) are timed from `prepare_run` (the config checks `stagetune train` does) to the
first step's loss event, with the same config as the SD3 LoRA runs of bench_train_vs_simpletuner.py.

    python benchmarks/bench_warm_start.py [--size tiny] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_train_vs_simpletuner import SIZES, VARIANTS, build_model, make_data, write_pair  # noqa: E402


def first_step_seconds(config: Path, endpoints: dict[str, str], store) -> float:  # noqa: ANN001
    from stagetune.pipeline import run_training
    from stagetune.preflight import prepare_run

    started = time.perf_counter()
    first: list[float] = []

    def on_event(phase: str, event) -> None:  # noqa: ANN001
        if phase == "trainer" and event.WhichOneof("body") == "metric" and event.metric.name == "loss" and not first:
            first.append(time.perf_counter() - started)

    run_training(prepare_run(config, store=store), endpoints, on_event=on_event)
    return first[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from stagetune.core.store import open_store
    from stagetune.pipeline import start_embedded

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="stagetune-bench-warm-"))).resolve()
    model = build_model(workdir, args.size)
    store = open_store(str(workdir / "store"))
    servers = start_embedded(store)
    endpoints = {name: server.address for name, server in servers.items()}
    resolution, steps = SIZES[args.size]["resolution"], 4
    try:
        new, cached = [], []
        for rep in range(args.repeats + 1):  # run 0 warms the services
            root = workdir / f"run-{rep}"
            make_data(root / "data", args.images, seed=rep)  # other images and captions each time
            config = write_pair(root, model, VARIANTS["lora"], resolution, steps, 2)
            seconds = first_step_seconds(config, endpoints, store)
            config.write_text(json.dumps({**json.loads(config.read_text()), "output_dir": str(root / "again")}))
            again = first_step_seconds(config, endpoints, store)
            print(f"run {rep}{' (warm-up)' if rep == 0 else ''}: new data {seconds:.2f} s, cached {again:.2f} s",
                  file=sys.stderr, flush=True)
            if rep:
                new.append(seconds)
                cached.append(again)
        print(f"time to first step with the services running, medians of {args.repeats}: new data "
              f"{statistics.median(new):.2f} s ({', '.join(f'{s:.2f}' for s in new)}), everything cached "
              f"{statistics.median(cached):.2f} s ({', '.join(f'{s:.2f}' for s in cached)})")
    finally:
        for server in servers.values():
            server.stop(0)


if __name__ == "__main__":
    main()

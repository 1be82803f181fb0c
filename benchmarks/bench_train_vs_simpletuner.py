"""Training end to end, stagetune against SimpleTuner 4.10.1, on the same config files.

Method (see benchmarks/README.md): for each model size and variant, one SimpleTuner config pair
(config.json + multidatabackend.json, and a lycoris_config.json for LyCORIS) is written and SimpleTuner
trains on it; stagetune then trains with `stagetune train --config` on a copy in which only the paths differ
(output, data, caches). Each side gets its own copy of the images (SimpleTuner writes metadata into the
dataset folder), and every run starts cold: fresh output, caches, store and XDG cache folder.

Both sides run with the same `sitecustomize.py` on PYTHONPATH (written outside the repo), which appends the
wall-clock time of every finished optimizer step (torch's global optimizer step post-hook, so the same
event on both sides) to a file; for SimpleTuner it also makes `Tensor.pin_memory` a no-op (needed on CPU).
The benchmark polls the resident memory of the whole process tree every 50 ms (psutil); stagetune's
`train` runs its five services inside its one process. Per run:
- time to first step: process start (just before the command is spawned) to the end of the first step;
- steady seconds/step: the median gap between consecutive step ends, after `--warmup` steps;
- peak RSS: the largest sum of RSS over the process tree (and the process's own ru_maxrss at exit).
Runs alternate (SimpleTuner, stagetune, SimpleTuner, …) and the table gives medians of `--repeats` runs.

    python benchmarks/bench_train_vs_simpletuner.py [--variants lora,lycoris,int8] [--sizes tiny,compute]
        [--repeats 3] [--steps N] [--warmup 2] [--simpletuner-venv /tmp/st-venv] [--workdir DIR]

The model sizes are `stagetune tiny-model sd3 --size tiny|compute`: tiny trains at 64 px (overhead-bound),
compute (a 6 × 768 MMDiT) at 256 px, where a LoRA step at batch 2 takes about a second on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_vs_simpletuner import ensure_simpletuner, make_data, simpletuner_version  # noqa: E402

# Written next to the runs (never into the repo) and put first on both sides' PYTHONPATH.
HOOK = r'''
"""Benchmark hook (not SimpleTuner or stagetune code): the time of every finished optimizer step, appended
as JSON lines to $BENCH_STEPS; with $BENCH_NO_PIN_MEMORY, Tensor.pin_memory becomes a no-op (CPU)."""
import atexit, importlib.abc, importlib.util, json, os, resource, sys, time

_OUT = os.environ.get("BENCH_STEPS")


def _record(entry):
    with open(_OUT, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _after_step(optimizer, args, kwargs):
    entry = {"step": time.time(), "rank": os.environ.get("RANK", "0")}  # workers of a multi-process run too
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        entry["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    _record(entry)


def _patch(module):
    if module.__name__ == "torch.optim.optimizer":
        module.register_optimizer_step_post_hook(_after_step)
    elif module.__name__ == "torch" and os.environ.get("BENCH_NO_PIN_MEMORY"):
        module.Tensor.pin_memory = lambda self, *a, **k: self
    elif module.__name__ == "simpletuner.helpers.models.sana.model":
        # SimpleTuner 4.10.1 builds its Sana text-encoding pipeline without a scheduler and fails
        # ("SanaPipeline.__init__() missing ... 'scheduler'"); give it the model's own, as from_pretrained would.
        # Only prompt encoding uses that pipeline: the training maths is untouched.
        def _scheduler(self, pipeline_type):
            from diffusers import DPMSolverMultistepScheduler
            return DPMSolverMultistepScheduler.from_pretrained(self.config.pretrained_model_name_or_path,
                                                               subfolder="scheduler")
        module.Sana._load_scheduler_for_pipeline = _scheduler


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in ("torch", "torch.optim.optimizer", "simpletuner.helpers.models.sana.model"):
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def _at_exit():
    entry = {"exit": time.time(), "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        entry["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    _record(entry)


if _OUT:
    sys.meta_path.insert(0, _Finder())
    _record({"start": time.time()})
    atexit.register(_at_exit)
'''

#: SimpleTuner's documented LyCORIS example (LoKr, full-rank factor), as its LYCORIS.md writes it.
LYCORIS_CONFIG = {
    "algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
    "apply_preset": {"target_module": ["Attention", "FeedForward"],
                     "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}},
}

#: What each variant adds to the common config.
VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {"lora_type": "standard", "lora_rank": 16, "lora_alpha": 16},
    "lycoris": {"lora_type": "lycoris"},  # + lycoris_config, a path (written beside config.json)
    "int8": {"lora_type": "standard", "lora_rank": 16, "lora_alpha": 16, "base_model_precision": "int8-quanto",
             "base_model_default_dtype": "fp32"},
    # seed 003's Sana full-rank fine-tune (its complex human instruction on, SimpleTuner's default), and a LoRA.
    # Batch 1 and no caption dropout on both sides: SimpleTuner 4.10.1 caches each Sana caption's embedding at its
    # own length and fails to collate two of different lengths ("Expected size 39 but got size 37"; the empty
    # caption of dropout likewise).
    "sana-full": {"model_family": "sana", "model_type": "full", "caption_dropout_probability": 0.0,
                  "train_batch_size": 1},
    "sana-lora": {"model_family": "sana", "lora_type": "standard", "lora_rank": 16, "lora_alpha": 16,
                  "caption_dropout_probability": 0.0, "train_batch_size": 1},
}

#: Per model size: resolution, images, default steps.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"resolution": 64, "steps": 30},
    "compute": {"resolution": 256, "steps": 12},
}


@dataclass
class RunResult:
    side: str
    ok: bool
    first_step_s: float = float("nan")
    steady_s: float = float("nan")
    steps: int = 0
    peak_rss_gb: float = float("nan")
    train_rss_gb: float = float("nan")  # the tree's peak between the first and the last step
    wall_s: float = float("nan")
    processes: int = 1
    cuda_max_gb: float = float("nan")
    foreign_load: float = float("nan")  # other jobs' busy cores, averaged over the run
    attempts: int = 1
    note: str = ""
    log: str = ""


@dataclass
class Cell:
    """One (size, variant): the runs of both sides."""

    size: str
    variant: str
    runs: dict[str, list[RunResult]] = field(default_factory=lambda: {"simpletuner": [], "stagetune": []})


# ---------------------------------------------------------------- configs


def common_config(model: Path, root: Path, resolution: int, steps: int, batch: int) -> dict[str, Any]:
    """The seeds' SD3 LoRA config, made to run on a CPU: torch-adamw, no mixed precision, no validation."""
    return {
        "model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": str(model),
        "output_dir": str(root / "output"), "data_backend_config": str(root / "config" / "multidatabackend.json"),
        "seed": 42, "train_batch_size": batch, "gradient_accumulation_steps": 1, "max_train_steps": steps,
        "num_train_epochs": 0, "learning_rate": 1e-4, "lr_scheduler": "constant", "lr_warmup_steps": 0,
        "optimizer": "torch-adamw", "mixed_precision": "no", "base_model_precision": "no_change",
        "text_encoder_1_precision": "no_change", "text_encoder_2_precision": "no_change",
        "text_encoder_3_precision": "no_change", "gradient_checkpointing": False,
        "checkpointing_steps": 100_000, "validation_disable": True, "validation_steps": 100_000,
        "report_to": "none", "resolution": resolution, "resolution_type": "pixel_area", "minimum_image_size": 0,
        "tokenizer_max_length": 154, "vae_batch_size": 4, "text_encoder_batch_size": 8, "write_batch_size": 64,
        "disable_benchmark": True,
    }


def write_pair(root: Path, model: Path, overrides: dict[str, Any], resolution: int, steps: int, batch: int) -> Path:
    """SimpleTuner's config folder under root/config (the common config with `overrides`, e.g. a variant's);
    returns config.json."""
    (root / "config").mkdir(parents=True, exist_ok=True)
    config = {**common_config(model, root, resolution, steps, batch), **overrides}
    if config.get("lora_type") == "lycoris":
        (root / "config" / "lycoris_config.json").write_text(json.dumps(LYCORIS_CONFIG, indent=2))
        config["lycoris_config"] = str(root / "config" / "lycoris_config.json")
    backends = [
        {"id": "bench", "type": "local", "crop": True, "crop_aspect": "square", "crop_style": "center",
         "resolution": resolution, "resolution_type": "pixel_area", "minimum_image_size": 0,
         "maximum_image_size": resolution, "target_downsample_size": resolution,
         "instance_data_dir": str(root / "data"), "cache_dir_vae": str(root / "cache" / "vae"),
         "caption_strategy": "textfile", "metadata_backend": "discovery", "disabled": False},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(root / "cache" / "text"), "write_batch_size": 64, "disabled": False},
    ]
    (root / "config" / "config.json").write_text(json.dumps(config, indent=2))
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backends, indent=2))
    return root / "config" / "config.json"


def _replace_paths(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + "/") else value
    if isinstance(value, list):
        return [_replace_paths(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _replace_paths(v, old, new) for k, v in value.items()}
    return value


def copy_pair(src: Path, dst: Path) -> Path:
    """The same config files with only the paths under `src` moved to `dst`; returns config.json."""
    (dst / "config").mkdir(parents=True, exist_ok=True)
    for file in sorted((src / "config").glob("*.json")):
        data = _replace_paths(json.loads(file.read_text()), str(src), str(dst))
        (dst / "config" / file.name).write_text(json.dumps(data, indent=2))
    return dst / "config" / "config.json"


def fresh_data(pristine: Path, root: Path) -> None:
    """A fresh copy (hard links) of the images: SimpleTuner writes its bucket metadata into the folder."""
    shutil.rmtree(root / "data", ignore_errors=True)
    (root / "data").mkdir(parents=True)
    for item in pristine.iterdir():
        os.link(item, root / "data" / item.name)


def config_diff(a: Path, b: Path) -> list[str]:
    """Every key whose value differs between two config folders (what the README calls "only paths")."""
    out = []
    for file in sorted((a / "config").glob("*.json")):
        left, right = json.loads(file.read_text()), json.loads((b / "config" / file.name).read_text())
        items = (enumerate(zip(left, right, strict=True)) if isinstance(left, list) else [(None, (left, right))])
        for index, (x, y) in items:
            for key in sorted(set(x) | set(y)):
                if x.get(key) != y.get(key):
                    out.append(f"{file.name}{'' if index is None else f'[{index}]'}.{key}")
    return out


# ---------------------------------------------------------------- running


def _busy_cpu_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


class TreeMemory:
    """Polls the summed RSS of a process and its descendants until stopped, and the CPU time they use.

    `foreign_cpu_s` is the machine's busy CPU time during the run minus the tree's own: what other jobs took
    (the machine is shared; with 2 cores, another busy process slows torch's parallel regions a lot).
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import psutil

        self._root = psutil.Process(pid)
        self._interval = interval
        self.samples: list[tuple[float, int]] = []
        self.max_processes = 1
        self._cpu: dict[int, float] = {}
        self._busy0 = _busy_cpu_seconds()
        self._me = psutil.Process()
        self._mine0 = sum(self._me.cpu_times()[:2])  # this poller's own share, not another job's
        self.foreign_cpu_s = float("nan")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                    times = proc.cpu_times()
                    self._cpu[proc.pid] = times.user + times.system
                except psutil.Error:
                    pass
            self.max_processes = max(self.max_processes, len(procs))
            self.samples.append((time.time(), total))
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        mine = sum(self._me.cpu_times()[:2]) - self._mine0
        self.foreign_cpu_s = max(0.0, _busy_cpu_seconds() - self._busy0 - sum(self._cpu.values()) - mine)

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
        inside = [rss for t, rss in self.samples if start <= t <= end]
        return max(inside) if inside else 0


def run_one(side: str, command: list[str], env: dict[str, str], cwd: Path, log: Path, steps_file: Path,
            warmup: int, timeout: float) -> RunResult:
    steps_file.unlink(missing_ok=True)
    env = {**env, "BENCH_STEPS": str(steps_file)}
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        memory = TreeMemory(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        finally:
            memory.stop()
    ended = time.time()
    entries = [json.loads(line) for line in steps_file.read_text().splitlines()] if steps_file.exists() else []
    steps = [e["step"] for e in entries if "step" in e and e.get("rank", "0") == "0"]  # rank 0's steps
    exits = [e for e in entries if "exit" in e]
    result = RunResult(side=side, ok=rc == 0 and bool(steps), steps=len(steps), wall_s=ended - started,
                       processes=memory.max_processes, log=str(log),
                       foreign_load=memory.foreign_cpu_s / max(ended - started, 1e-9))
    own_peak = max((e["maxrss_kb"] * 1024 for e in exits), default=0)
    result.peak_rss_gb = max(memory.peak(), own_peak) / 1e9
    cuda = [e["cuda_max_allocated"] for e in entries if "cuda_max_allocated" in e]
    if cuda:
        result.cuda_max_gb = max(cuda) / 1e9
    if steps:
        result.first_step_s = steps[0] - started
        gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)][warmup:]
        if gaps:
            result.steady_s = statistics.median(gaps)
        result.train_rss_gb = memory.peak(steps[0], steps[-1]) / 1e9
    if rc != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
        result.note = f"rc {rc}: " + " / ".join(tail)[-400:]
    elif not steps:
        result.note = "no optimizer step recorded"
    return result


def wait_for_quiet(threshold: float, max_wait: float, window: float = 3.0) -> float:
    """Wait until other jobs use under `threshold` cores over `window` seconds (at most `max_wait` seconds);
    returns the load last seen. The machine is shared: torch's 2 OpenMP threads slow down many times over
    when another process takes a core, so runs start on a quiet machine where possible."""
    deadline = time.time() + max_wait
    while True:
        before = _busy_cpu_seconds()
        time.sleep(window)
        load = (_busy_cpu_seconds() - before) / window
        if load < threshold or time.time() >= deadline:
            return load


@dataclass
class Bench:
    workdir: Path
    venv: Path
    warmup: int
    timeout: float
    hook: Path
    stagetune: list[str]
    quiet: float = 0.0  # other jobs' cores under which a run starts (0: start at once)
    max_wait: float = 600.0
    retries: int = 0  # a run during which other jobs used more than `quiet` cores is run again, keeping the quietest

    def run(self, side: str, root: Path, pristine: Path, tag: str) -> RunResult:
        best: RunResult | None = None
        for attempt in range(self.retries + 1):
            if self.quiet > 0:
                wait_for_quiet(self.quiet, self.max_wait)
            runner = self.simpletuner if side == "simpletuner" else self.stagetune_run
            result = runner(root, pristine, tag if attempt == 0 else f"{tag}-retry{attempt}")
            result.attempts = attempt + 1
            if best is None or not (best.foreign_load <= result.foreign_load):
                best = result
            if not (self.quiet > 0 and result.foreign_load > self.quiet) or not result.ok:
                break
        assert best is not None
        return best

    def _env(self, root: Path) -> dict[str, str]:
        # Every run is cold: a fresh XDG cache (stagetune's fingerprint memos). optimum-quanto builds its C++
        # extension (int4/int2) into its own package folder, once per install, whatever this says.
        return dict(os.environ, XDG_CACHE_HOME=str(root / "xdg"), HF_HUB_OFFLINE="1")

    def simpletuner(self, root: Path, pristine: Path, tag: str) -> RunResult:
        for path in ("output", "cache", "xdg"):
            shutil.rmtree(root / path, ignore_errors=True)
        fresh_data(pristine, root)
        mixed = json.loads((root / "config" / "config.json").read_text()).get("mixed_precision", "no")
        env = dict(self._env(root), MIXED_PRECISION=mixed, CONFIG_BACKEND="json",
                   CONFIG_PATH=str(root / "config" / "config"), PYTHONPATH=str(self.hook), BENCH_NO_PIN_MEMORY="1",
                   PYTHONWARNINGS="ignore")
        env.pop("VIRTUAL_ENV", None)
        return run_one("simpletuner", [str(self.venv / "bin" / "python"), "-m", "simpletuner.train"], env, root,
                       root / f"log-{tag}.txt", root / f"steps-{tag}.jsonl", self.warmup, self.timeout)

    def stagetune_run(self, root: Path, pristine: Path, tag: str) -> RunResult:
        for path in ("output", "cache", "xdg", "store"):
            shutil.rmtree(root / path, ignore_errors=True)
        fresh_data(pristine, root)
        pythonpath = os.pathsep.join(p for p in (str(self.hook), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(self._env(root), PYTHONPATH=pythonpath)
        command = [*self.stagetune, "train", "--config", str(root / "config" / "config.json"),
                   "--store", str(root / "store")]
        return run_one("stagetune", command, env, root, root / f"log-{tag}.txt", root / f"steps-{tag}.jsonl",
                       self.warmup, self.timeout)


def add_quiet_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", type=float, default=0.3,
                        help="start each run once other jobs use fewer cores than this (0: do not wait)")
    parser.add_argument("--max-wait", type=float, default=600.0, help="longest wait for a quiet machine (s)")
    parser.add_argument("--retries", type=int, default=2,
                        help="rerun a run during which other jobs used more than --quiet cores (keeps the quietest)")


def stagetune_command() -> list[str]:
    script = Path(sys.executable).parent / "stagetune"
    if script.exists():
        return [str(script)]
    found = shutil.which("stagetune")
    return [found] if found else [sys.executable, "-m", "stagetune.cli"]


def build_model(workdir: Path, size: str, family: str = "sd3") -> Path:
    from stagetune.models.tiny import build_tiny

    model = workdir / "models" / (size if family == "sd3" else f"{family}-{size}")
    if not (model / "model_index.json").exists():
        shutil.rmtree(model, ignore_errors=True)
        build_tiny(family, model, size=size)
    return model


# ---------------------------------------------------------------- report


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _fmt(value: float, digits: int) -> str:
    return "—" if value != value else f"{value:.{digits}f}"


def _ratio(ours: float, theirs: float) -> str:
    """SimpleTuner / stagetune: how many times less time or memory stagetune needs."""
    return "—" if not (ours > 0 and theirs > 0) else f"{theirs / ours:.2f}×"


def table(cells: list[Cell]) -> list[str]:
    """One row per (size, variant): medians of each side, and SimpleTuner / stagetune (higher: stagetune better)."""
    lines = [
        "| size | variant | first step, SimpleTuner (s) | first step, stagetune (s) | SimpleTuner / stagetune | "
        "steady, SimpleTuner (s/step) | steady, stagetune (s/step) | throughput, stagetune / SimpleTuner | "
        "peak RSS, SimpleTuner (GB) | peak RSS, stagetune (GB) | SimpleTuner / stagetune |",
        "|" + " --- |" * 11,
    ]
    for cell in cells:
        row = [cell.size, cell.variant]
        st = [r for r in cell.runs["simpletuner"] if r.ok]
        ours = [r for r in cell.runs["stagetune"] if r.ok]
        for attr, digits in (("first_step_s", 1), ("steady_s", 3), ("peak_rss_gb", 2)):
            a = _median([getattr(r, attr) for r in st])
            b = _median([getattr(r, attr) for r in ours])
            row += [_fmt(a, digits) if st else "failed", _fmt(b, digits) if ours else "failed", _ratio(b, a)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def notes(cells: list[Cell]) -> list[str]:
    out = []
    for cell in cells:
        for side, runs in cell.runs.items():
            ok = [r for r in runs if r.ok]
            if len(ok) < len(runs):
                failed = next(r for r in runs if not r.ok)
                out.append(f"{cell.size}/{cell.variant}: {side} failed {len(runs) - len(ok)} of {len(runs)} runs; "
                           f"log {failed.log}: {failed.note}")
            if ok:
                firsts = ", ".join(_fmt(r.first_step_s, 1) for r in ok)
                steadies = ", ".join(_fmt(r.steady_s, 3) for r in ok)
                loads = ", ".join(_fmt(r.foreign_load, 2) + (f" ({r.attempts} tries)" if r.attempts > 1 else "")
                                  for r in ok)
                phases = ""
                if side == "stagetune":  # where its time to first step goes: the CLI's phase lines
                    text = Path(ok[0].log).read_text(errors="replace")
                    found = re.findall(r"(ingest|vae|text|trainer)\s+done in\s+([\d.]+)s", text)
                    phases = "; phases of run 1: " + ", ".join(f"{name} {sec} s" for name, sec in found)
                walls = ", ".join(_fmt(r.wall_s, 1) for r in ok)
                trains = ", ".join(_fmt(r.train_rss_gb, 2) for r in ok)
                out.append(f"{cell.size}/{cell.variant} {side}: first step {firsts} s; steady {steadies} s/step; "
                           f"wall {walls} s; peak RSS while training {trains} GB; "
                           f"{ok[0].steps} steps recorded; up to {max(r.processes for r in ok)} processes; other "
                           f"jobs' load {loads} cores{phases}")
    return out


def bench_from_args(args: Any, prefix: str) -> tuple[Path, Bench]:
    """The work folder (with the step-timing hook SimpleTuner's side loads) and the runner, from the options
    both benchmark scripts share."""
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "hook").mkdir(exist_ok=True)
    (workdir / "hook" / "sitecustomize.py").write_text(HOOK)
    bench = Bench(workdir=workdir, venv=args.simpletuner_venv, warmup=args.warmup, timeout=args.timeout,
                  hook=workdir / "hook", stagetune=stagetune_command(), quiet=args.quiet, max_wait=args.max_wait,
                  retries=args.retries)
    return workdir, bench


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--simpletuner-venv", type=Path, default=Path("/tmp/st-venv"))
    parser.add_argument("--variants", default="lora,lycoris,int8")
    parser.add_argument("--sizes", default="tiny,compute")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 30 tiny, 12 compute)")
    parser.add_argument("--warmup", type=int, default=2, help="step gaps left out of the steady median")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is killed")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write every run's numbers here")
    parser.add_argument("--commit", default=None,
                        help="the stagetune commit measured (default: git describe where stagetune is imported from)")
    add_quiet_options(parser)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    sizes = [s for s in args.sizes.split(",") if s]
    for name, known in (("variant", VARIANTS), ("size", SIZES)):
        for value in variants if name == "variant" else sizes:
            if value not in known:
                parser.error(f"unknown {name} {value!r}; choose from {', '.join(known)}")

    ensure_simpletuner(args.simpletuner_venv)
    workdir, bench = bench_from_args(args, "stagetune-train-vs-st-")

    import torch

    import stagetune

    load = os.getloadavg()[0]
    commit = args.commit or subprocess.run(
        ["git", "-C", str(Path(stagetune.__file__).parent), "describe", "--always", "--dirty", "--abbrev=7"],
        capture_output=True, text=True, check=False).stdout.strip() or "unknown"
    cells: list[Cell] = []
    for size in sizes:
        pristine = workdir / "data" / size
        if not pristine.exists():
            make_data(pristine, args.images)
        for variant in variants:
            model = build_model(workdir, size, VARIANTS[variant].get("model_family", "sd3"))
            steps = args.steps or SIZES[size]["steps"]
            cell = Cell(size, variant)
            cells.append(cell)
            st_root = workdir / f"{size}-{variant}" / "simpletuner"
            our_root = workdir / f"{size}-{variant}" / "stagetune"
            write_pair(st_root, model, VARIANTS[variant], SIZES[size]["resolution"], steps, args.batch)
            copy_pair(st_root, our_root)
            differ = config_diff(st_root, our_root)
            for rep in range(args.repeats):
                for side in ("simpletuner", "stagetune"):
                    print(f"[{size}/{variant}] {side} run {rep + 1}/{args.repeats} …", file=sys.stderr, flush=True)
                    run = bench.run(side, st_root if side == "simpletuner" else our_root, pristine, f"r{rep}")
                    cell.runs[side].append(run)
                    print(f"    first step {_fmt(run.first_step_s, 1)} s, steady {_fmt(run.steady_s, 3)} s/step, "
                          f"peak {_fmt(run.peak_rss_gb, 2)} GB, other jobs' load {_fmt(run.foreign_load, 2)} cores"
                          f"{'' if run.ok else ' — ' + run.note}",
                          file=sys.stderr, flush=True)
            print(f"[{size}/{variant}] the two config folders differ in: {', '.join(differ)}", file=sys.stderr)

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {gpu}; 1-min load average "
          f"{load:.1f} at start. stagetune {commit} ({Path(stagetune.__file__).parent}) on Python "
          f"{platform.python_version()}, torch {torch.__version__}; {simpletuner_version(args.simpletuner_venv)}. "
          f"{args.images} images, batch {args.batch}, steps {args.steps or 'tiny 30 / compute 12'}, steady = median "
          f"step gap after {args.warmup} gaps, medians of {args.repeats} runs per side, interleaved.\n")
    for line in table(cells):
        print(line)
    print()
    for line in notes(cells):
        print(f"- {line}")
    if args.json:
        args.json.write_text(json.dumps([{"size": c.size, "variant": c.variant,
                                          "runs": {s: [vars(r) for r in rs] for s, rs in c.runs.items()}}
                                         for c in cells], indent=1))


if __name__ == "__main__":
    main()

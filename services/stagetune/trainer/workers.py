"""A training job's worker processes (`num_processes` > 1): started, relayed and watched by the trainer job.

The workers are processes, never threads of the server: each holds its own model and process group, and a
crash (an OOM kill, a segfault) fails the job with that worker's own last words instead of hanging the server.
On this machine the job starts `num_processes / num_machines` workers with torchrun's variables; on several
machines every machine's trainer job (or a cluster's launcher) starts its share, rendezvousing at
`main_process_ip:main_process_port` (c10d semantics), and the job on machine 0 reports the run.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from stagetune.core import errors
from stagetune.core.errors import StagetuneError
from stagetune.core.jobs import JobCancelled
from stagetune.trainer.worker import CANCELLED_EXIT, parse_event, relay_event, write_spec

#: After one worker fails, how long the others get to stop on SIGTERM before they are killed.
STOP_GRACE_S = 10.0
STDERR_TAIL_LINES = 20
#: A folder that keeps every worker's stderr (else they go with the job's scratch folder).
LOG_DIR_ENV = "STAGETUNE_WORKER_LOG_DIR"


@dataclass
class Worker:
    rank: int
    local_rank: int
    process: subprocess.Popen
    stderr_path: Path
    ended: list[tuple[str, list[Any]]] = field(default_factory=list)  # its "outputs"/"error"/"cancelled" line

    def stderr_tail(self) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-STDERR_TAIL_LINES:])

    def reported_error(self) -> str | None:
        """The error a worker named before it exited (its "error" line), when it had one."""
        if self.ended:
            ended = dict(self.ended)
            return str(ended["error"][1]) if "error" in ended else None
        try:
            lines = self.stderr_path.with_suffix(".stdout").read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            parsed = parse_event(line)
            if parsed and parsed[0] == "error":
                return str(parsed[1][1])
        return None


def worker_env(cfg: Any, *, rank: int, local_rank: int, local_size: int, addr: str, port: int) -> dict[str, str]:
    """torchrun's variables. On a CPU each worker gets its share of the cores, unless the user chose."""
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(cfg.num_processes), LOCAL_RANK=str(local_rank),
               LOCAL_WORLD_SIZE=str(local_size), MASTER_ADDR=addr, MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local_size))
    return env


def rendezvous(cfg: Any) -> tuple[str, int]:
    """One machine: loopback and a free port, so runs never collide; several: the config's address."""
    from stagetune.trainer.distributed import free_port

    if cfg.num_machines == 1:
        return "127.0.0.1", free_port()
    return cfg.main_process_ip, cfg.main_process_port


def run_workers(ctx: Any, cfg: Any) -> dict[str, str]:
    """Start this machine's workers, relay local rank 0's events, and end as the run ended."""
    local_size = cfg.num_processes // cfg.num_machines
    addr, port = rendezvous(cfg)
    ctx.log(f"starting {local_size} training processes (ranks {cfg.machine_rank * local_size}–"
            f"{(cfg.machine_rank + 1) * local_size - 1} of {cfg.num_processes}), rendezvous {addr}:{port}")
    with tempfile.TemporaryDirectory(prefix="stagetune-workers-") as tmp, \
            _started(ctx, cfg, Path(tmp), local_size, addr, port) as workers:
        events: queue.Queue[tuple[str, list[Any]] | None] = queue.Queue()
        reader = threading.Thread(target=_read_events, args=(workers[0].process.stdout, events, workers[0]),
                                  name="trainer-worker-events", daemon=True)
        reader.start()
        first_failed = _supervise(ctx, workers, events)
        reader.join(timeout=5)
        _drain(ctx, events)
        return _outcome(workers, first_failed)


@contextmanager
def _started(ctx: Any, cfg: Any, folder: Path, local_size: int, addr: str, port: int) -> Iterator[list[Worker]]:
    spec = write_spec(folder / "spec.json", request=ctx.request, store_url=ctx.store.url, job_id=ctx.job_id)
    workers: list[Worker] = []
    try:
        for local_rank in range(local_size):
            rank = cfg.machine_rank * local_size + local_rank
            logs = Path(os.environ.get(LOG_DIR_ENV) or folder)  # kept where the operator asks, for post-mortems
            logs.mkdir(parents=True, exist_ok=True)
            stderr_path = logs / f"{ctx.job_id}-rank-{rank}.stderr"
            # local rank 0's events are relayed; the others' (their ending lines) are kept for the post-mortem
            stdout_path = stderr_path.with_suffix(".stdout")
            with open(stderr_path, "wb") as stderr, open(stdout_path, "wb") as stdout_file:
                process = subprocess.Popen(
                    [sys.executable, "-m", "stagetune.trainer.worker", str(spec)],
                    env=worker_env(cfg, rank=rank, local_rank=local_rank, local_size=local_size, addr=addr, port=port),
                    stdout=subprocess.PIPE if local_rank == 0 else stdout_file, stderr=stderr, text=True,
                )
            workers.append(Worker(rank, local_rank, process, stderr_path))
        yield workers
    finally:
        _stop(workers, signal.SIGKILL)


def _read_events(stream: IO[str] | None, events: queue.Queue, worker: Worker) -> None:
    if stream is None:
        return
    for line in stream:
        parsed = parse_event(line.rstrip("\n"))
        if parsed is None:
            events.put(("log", [line.rstrip(), "debug"]))
        elif parsed[0] in ("outputs", "error", "cancelled"):
            worker.ended.append(parsed)
        else:
            events.put(parsed)
    events.put(None)


def _drain(ctx: Any, events: queue.Queue) -> None:
    while True:
        try:
            item = events.get_nowait()
        except queue.Empty:
            return
        if item is not None:
            relay_event(ctx, *item)


def _supervise(ctx: Any, workers: list[Worker], events: queue.Queue) -> Worker | None:
    """Until every worker has exited: relay events, pass Cancel on, and stop the rest when one fails.
    Returns the worker that failed first (the others then fail because it is gone)."""
    signalled = False
    first_failed: Worker | None = None
    while any(w.process.poll() is None for w in workers):
        try:
            item = events.get(timeout=0.1)
            if item is not None:
                relay_event(ctx, *item)
        except queue.Empty:
            pass
        if ctx.cancelled.is_set() and not signalled:
            _stop(workers, signal.SIGTERM)  # every rank stops at the same step; rank 0 saves a checkpoint
            signalled = True
        failed = [w for w in workers if w.process.poll() not in (None, 0, CANCELLED_EXIT)]
        if failed and not signalled:
            first_failed = _culprit(failed)
            _stop(workers, signal.SIGTERM)
            signalled = True
            deadline = time.monotonic() + STOP_GRACE_S
            while any(w.process.poll() is None for w in workers) and time.monotonic() < deadline:
                time.sleep(0.1)
            _stop(workers, signal.SIGKILL)
    failed = [w for w in workers if w.process.returncode not in (0, CANCELLED_EXIT)]
    return first_failed or (_culprit(failed) if failed else None)


#: What a rank says when another rank died under it: not the cause.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")


def _culprit(failed: list[Worker]) -> Worker:
    """Of workers that failed together, the one that did not just lose its peer."""
    def lost_peer(worker: Worker) -> bool:
        return any(m in (worker.reported_error() or worker.stderr_tail()) for m in PEER_LOST)

    return next((w for w in failed if not lost_peer(w)), failed[0])


def _stop(workers: list[Worker], signum: int) -> None:
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signum)
    if signum == signal.SIGKILL:
        for worker in workers:
            worker.process.wait()


def _outcome(workers: list[Worker], first_failed: Worker | None) -> dict[str, str]:
    """The run's outputs, or its failure: the error of the worker that failed first (rank 0's own error class
    when it is the one), by rank, with its last lines."""
    first = workers[0]
    ended = dict(first.ended)
    codes = {w.rank: w.process.returncode for w in workers}
    if "error" in ended and first_failed in (None, first):
        name, message, field_name = ended["error"]
        cls = getattr(errors, name, StagetuneError)
        raise (cls if isinstance(cls, type) and issubclass(cls, StagetuneError) else StagetuneError)(
            message, field=field_name or None)
    if first_failed is not None:
        worker = first_failed
        tail = worker.stderr_tail()
        said = worker.reported_error() or (tail.splitlines()[-1] if tail else "")
        raise errors.UnavailableError(
            f"training process rank {worker.rank} (pid {worker.process.pid}) {_how(worker.process.returncode)}"
            f"{': ' + said if said else ''}; the next run resumes from the last checkpoint"
            + (f"\n{tail}" if tail else ""), field="num_processes")
    if "cancelled" in ended or CANCELLED_EXIT in codes.values():
        raise JobCancelled("training cancelled")
    if "outputs" not in ended:
        raise errors.UnavailableError("training process rank 0 exited without reporting its outputs",
                                      field="num_processes")
    return {str(k): str(v) for k, v in ended["outputs"][0].items()}


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"

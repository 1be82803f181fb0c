"""One training process of a multi-process run: `python -m stagetune.trainer.worker SPEC.json`.

The trainer service starts these (trainer/workers.py) with torchrun's variables set; a cluster's launcher can
start them the same way. A worker trains its rank of the run in-process (`train_in_process`) with a stand-in
for the job context: rank 0's progress, log lines and metrics go to stdout as one JSON object per line, which
the supervising job relays as its own events; every worker's last line says how it ended.
"""

from __future__ import annotations

import base64
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

#: Marks the lines the supervisor reads; anything else a library prints to stdout is passed on as a log line.
EVENT_PREFIX = "@stagetune-event "
#: Exit code of a worker stopped by Cancel, Ctrl-C or SIGTERM after saving a checkpoint (as the CLI's).
CANCELLED_EXIT = 130


def event_line(kind: str, *values: Any) -> str:
    return EVENT_PREFIX + json.dumps({"kind": kind, "values": list(values)}, default=str)


def parse_event(line: str) -> tuple[str, list[Any]] | None:
    if not line.startswith(EVENT_PREFIX):
        return None
    payload = json.loads(line[len(EVENT_PREFIX):])
    return str(payload["kind"]), list(payload["values"])


class WorkerContext:
    """What `train_in_process` asks of a job context. Only rank 0 speaks: the ranks train the same steps."""

    def __init__(self, request: Any, store: Any, job_id: str, *, speaks: bool) -> None:
        self.request = request
        self.store = store
        self.job_id = job_id
        self.cancelled = threading.Event()
        self._speaks = speaks

    def send(self, kind: str, *values: Any) -> None:
        print(event_line(kind, *values), flush=True)

    def progress(self, phase: str, done: int, total: int, unit: str = "") -> None:
        if self._speaks:
            self.send("progress", phase, done, total, unit)

    def log(self, message: str, level: str = "info") -> None:
        if self._speaks:
            self.send("log", message, level)

    def metric(self, name: str, value: float, step: int = 0) -> None:
        if self._speaks:
            self.send("metric", name, value, step)

    def record_step(self, *values: Any) -> None:
        """Prometheus' step metrics, for the job whose /metrics Prometheus scrapes."""
        if self._speaks:
            self.send("step", *values)

    def preview(self, name: str, png: bytes, step: int = 0, key: str = "") -> None:
        """The trainer sends no previews (validation does)."""

    def check_cancelled(self) -> None:
        from stagetune.core.jobs import JobCancelled

        if self.cancelled.is_set():
            raise JobCancelled("training cancelled")


def write_spec(path: Path, *, request: Any, store_url: str, job_id: str) -> Path:
    path.write_text(json.dumps({"request": base64.b64encode(request.SerializeToString()).decode(),
                                "store": store_url, "job_id": job_id}))
    return path


def main(argv: list[str] | None = None) -> int:
    from stagetune.core.config.train import config_from_json, load_train_config
    from stagetune.core.errors import StagetuneError
    from stagetune.core.jobs import JobCancelled
    from stagetune.core.store import open_store
    from stagetune.trainer.distributed import World
    from stagetune.trainer.service import train_in_process
    from stagetune.v1 import trainer_pb2

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stagetune.trainer.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    request = trainer_pb2.StartTrainingRequest.FromString(base64.b64decode(spec["request"]))
    world = World.from_env()
    ctx = WorkerContext(request, open_store(spec["store"]), spec["job_id"], speaks=world.is_main)
    for signum in (signal.SIGTERM, signal.SIGINT):  # stop at the next step, all ranks together, checkpointed
        signal.signal(signum, lambda *_: ctx.cancelled.set())
    try:
        cfg = load_train_config(config_from_json(request.config_json),
                                base_dir=Path(request.base_dir) if request.base_dir else None)
        world.start()
        outputs = train_in_process(ctx, cfg, world)
    except JobCancelled:
        ctx.send("cancelled")
        return CANCELLED_EXIT
    except StagetuneError as exc:
        ctx.send("error", type(exc).__name__, str(exc), getattr(exc, "field", "") or "")
        return 1
    finally:
        world.stop()
    ctx.send("outputs", outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
